"""`leapdecode serve --replicas N`: the same server as N replicas behind Ray Serve (the optional `ray` extra).

```
client ──► Ray Serve's HTTP proxy (--host/--port) ──► one of N replicas (Ray's router: the less loaded of two)
replica: its own process, its own `load()` and `BatchEngine`, the same FastAPI app as `leapdecode serve`
         (endpoints, streaming, API key, error bodies), every response naming it in `x-leapdecode-replica`
```
Each replica sets its torch threads explicitly (`--threads`, else the CPUs Ray gives it) instead of leaving
torch to read `OMP_NUM_THREADS`, which Ray sets from the CPUs it assigns. Ray and Ray Serve are imported here
only, so the rest of the package never needs them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..errors import LeapdecodeError
from .app import ServerConfig

REPLICA_HEADER = "x-leapdecode-replica"
APP_NAME = "leapdecode"


@dataclass(frozen=True)
class ReplicaSpec:
    """What every replica builds its engine from (sent to the replicas, so plain values only)."""

    model: str
    server: ServerConfig
    methods: dict = field(default_factory=dict)
    weights: str = "auto"
    draft_weights: str = "auto"
    device: str = "cpu"
    draft_model: str | None = None
    max_batch_size: int = 8
    step_draft_budget: int = 16
    fit_width: bool = True
    threads: int = 1  # torch intra-op threads per replica (also the CPUs Ray reserves for it)


def build_app(spec: ReplicaSpec, replica: str):
    """The FastAPI app of one replica: its own model and batch engine, and a header that names it."""
    import torch

    from .. import load
    from ..batching import BatchEngine
    from .app import create_app

    torch.set_num_threads(spec.threads)
    target = load(spec.model, device=spec.device, weights=spec.weights, progress=False)
    draft = (load(spec.draft_model, device=spec.device, weights=spec.draft_weights, progress=False, draft=True)
             if spec.draft_model else None)
    engine = BatchEngine(target, spec.methods, draft=draft, max_batch_size=spec.max_batch_size,
                         step_draft_budget=spec.step_draft_budget, fit_width=spec.fit_width)
    app = create_app(engine, spec.server)

    @app.middleware("http")  # added last, so it is outermost: errors and streams carry the header too
    async def name_replica(request, call_next):
        response = await call_next(request)
        response.headers[REPLICA_HEADER] = replica
        return response

    return app


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise LeapdecodeError("serve --replicas needs Ray Serve: pip install 'leapdecode[ray]' "
                              "(or pip install 'ray[serve]')") from None
    return ray, serve


def deployment(spec: ReplicaSpec, replicas: int):
    """The Ray Serve application: `replicas` copies of the server, each reserving `spec.threads` CPUs."""
    _, serve = _ray()

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": spec.threads},
                      max_ongoing_requests=max(8, 4 * spec.max_batch_size))
    @serve.ingress()
    class LeapdecodeReplica:
        def __init__(self, spec: ReplicaSpec):
            self.spec = spec

        def __serve_build_asgi_app__(self):
            context = serve.get_replica_context()
            return build_app(self.spec, str(context.replica_id.unique_id))

    return LeapdecodeReplica.bind(spec)


class Replicas:
    """N replicas serving on host:port until `stop()`; starts a local Ray instance unless given an address."""

    def __init__(self, spec: ReplicaSpec, replicas: int, host: str = "127.0.0.1", port: int = 8000,
                 address: str | None = None, num_cpus: int | None = None):
        if replicas < 1:
            raise LeapdecodeError("--replicas must be >= 1")
        if spec.threads < 1:
            raise LeapdecodeError("--threads must be >= 1")
        self.spec, self.replicas, self.host, self.port = spec, replicas, host, port
        self.address, self.num_cpus = address, num_cpus
        self.started_ray = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "Replicas":
        ray, serve = _ray()
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(num_cpus=self.num_cpus, include_dashboard=False, log_to_driver=False)
            self.started_ray = True
        serve.start(http_options={"host": self.host, "port": self.port})
        serve.run(deployment(self.spec, self.replicas), name=APP_NAME, route_prefix="/", blocking=False)
        return self

    def stop(self) -> float:
        """Shut the replicas down (and the Ray instance this object started); returns the seconds it took."""
        ray, serve = _ray()
        began = time.monotonic()
        serve.shutdown()
        if self.started_ray:
            ray.shutdown()
        return time.monotonic() - began

    def __enter__(self) -> "Replicas":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_forever(replicas: Replicas) -> int:
    """Run until Ctrl-C or SIGTERM, then shut down and say how long it took."""
    import signal
    import threading

    stop = threading.Event()
    replicas.start()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # after ray.init, which installs its own handler
    print(f"leapdecode: {replicas.replicas} replicas of {replicas.spec.server.model_name} "
          f"({replicas.spec.threads} torch threads each) on {replicas.url}/v1", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    seconds = replicas.stop()
    print(f"leapdecode: replicas shut down in {seconds:.1f} s", flush=True)
    return 0
