"""The server's batch engine, by responsibility: `scheduler` (BatchEngine: admission, the step loop, the worker
thread), `ragged_cache` (the batched KV cache and the step's scorer over it), `requests` (handles and updates)
and `metrics` (counters). The decoding step itself is `leapdecode.step`, shared with `Decoder`."""
from .metrics import EngineMetrics
from .ragged_cache import RaggedCache
from .requests import SequenceHandle, SequenceUpdate
from .scheduler import BatchEngine

__all__ = ["BatchEngine", "EngineMetrics", "RaggedCache", "SequenceHandle", "SequenceUpdate"]
