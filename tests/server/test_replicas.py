"""`server/replicas.py`: a replica's app (its own engine, a header naming it, torch threads set) and, with Ray
installed (slow), `serve --replicas 2` on a local Ray instance driven by the official `openai` client: 20
requests reach both replicas, greedy output is byte-identical to the single-process server, streaming, the API
key and error bodies behave the same, and shutdown takes under 60 s."""
from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from conftest import saved_tiny
from leapdecode.server import BackgroundServer, ServerConfig
from leapdecode.server.replicas import REPLICA_HEADER, ReplicaSpec, build_app

KEY = "sekret"
PROMPTS = [" ".join(f"w{(i * 5 + j * 3) % 60 + 1}" for j in range(6 + i % 4)) for i in range(20)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_tiny(tmp_path_factory.mktemp("replicas") / "model", scale=6.0)


def spec_for(model_dir: str, **kw) -> ReplicaSpec:
    config = ServerConfig(model_name="tiny", default_method="pld", max_tokens_limit=32, api_key=KEY)
    settings = {"weights": "fp32", "max_batch_size": 1, "threads": 1, **kw}
    return ReplicaSpec(model=model_dir, server=config, methods={"pld": {}, "ar": {}}, **settings)


def client_for(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def ask(client: openai.OpenAI, prompt: str) -> tuple[str, str]:
    raw = client.completions.with_raw_response.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
    return raw.parse().choices[0].text, raw.headers.get(REPLICA_HEADER)


def test_replica_app_names_itself_and_sets_threads(model_dir):
    before = torch.get_num_threads()
    try:
        app = build_app(spec_for(model_dir, threads=2), "replica-a")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with BackgroundServer(app) as server:
        text, name = ask(client_for(server.url), PROMPTS[0])
        assert name == "replica-a" and text
        denied = httpx.get(server.url + "/v1/models")
        assert denied.status_code == 401 and denied.headers[REPLICA_HEADER] == "replica-a"
        with client_for(server.url).completions.with_streaming_response.create(
                model="tiny", prompt=PROMPTS[1], max_tokens=8, stream=True) as stream:
            assert stream.headers[REPLICA_HEADER] == "replica-a"
            assert sum(1 for line in stream.iter_lines() if line.startswith("data: ")) >= 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_model_spec() -> ReplicaSpec:
    """The default preset on its exact int4 runtime (row-invariant passes: batches of 4 change no token)."""
    from leapdecode.presets import DEFAULT_MODEL, get_preset, is_installed

    if not is_installed(get_preset(DEFAULT_MODEL)):
        pytest.skip(f"{DEFAULT_MODEL} is not installed")
    config = ServerConfig(model_name="tiny", default_method="pld", max_tokens_limit=32, api_key=KEY)
    return ReplicaSpec(model=DEFAULT_MODEL, server=config, methods={"pld": {}, "ar": {}}, max_batch_size=4,
                       threads=1)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["tiny", "default-model"])
def test_two_replicas_on_a_local_ray_instance(model_dir, which):
    pytest.importorskip("ray.serve")
    from leapdecode.server.replicas import Replicas

    spec = spec_for(model_dir) if which == "tiny" else default_model_spec()
    with BackgroundServer(build_app(spec, "single")) as single:
        expected = [ask(client_for(single.url), p)[0] for p in PROMPTS]
        bad = httpx.post(single.url + "/v1/completions", json={"model": "tiny", "prompt": "w1", "max_tokens": 0},
                         headers={"Authorization": f"Bearer {KEY}"})
    replicas = Replicas(spec, 2, port=_free_port(), num_cpus=2).start()
    try:
        client = client_for(replicas.url)
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda p: ask(client, p), PROMPTS))
        assert [text for text, _ in answers] == expected  # byte-identical to the single-process server
        per_replica = {}
        for _, name in answers:
            per_replica[name] = per_replica.get(name, 0) + 1
        print(f"requests per replica: {sorted(per_replica.values())}")
        assert len(per_replica) == 2 and None not in per_replica, per_replica
        pieces = [c.choices[0].text for c in client.completions.create(
            model="tiny", prompt=PROMPTS[3], max_tokens=16, temperature=0, stream=True)]
        assert "".join(pieces) == expected[3] and len(pieces) >= 2
        with pytest.raises(openai.AuthenticationError):
            client_for(replicas.url, "wrong").models.list()
        again = httpx.post(replicas.url + "/v1/completions", json={"model": "tiny", "prompt": "w1", "max_tokens": 0},
                           headers={"Authorization": f"Bearer {KEY}"})
        assert (again.status_code, again.json()) == (bad.status_code, bad.json()) and bad.status_code == 400
    finally:
        seconds = replicas.stop()
    print(f"shutdown: {seconds:.1f} s")
    assert seconds < 60


def test_serve_parser_takes_replicas():
    from leapdecode.cli import build_parser

    args = build_parser().parse_args(["serve", "--replicas", "2", "--ray-address", "10.0.0.1:6379"])
    assert args.replicas == 2 and args.ray_address == "10.0.0.1:6379"
    assert build_parser().parse_args(["serve"]).replicas == 1
