"""leapdecode: faster decoding for Hugging Face causal language models, lossless methods proven by tests."""
from .engine import Decoder, GenerationStream, generate
from .errors import LeapdecodeError
from .loading import LoadedModel
from .methods import all_methods, get_method
from .sampling import SamplingParams
from .stats import GenerationResult, GenerationStats
from .tree import DraftTree

__all__ = [
    "Decoder", "DraftTree", "GenerationResult", "GenerationStats", "GenerationStream", "LeapdecodeError",
    "LoadedModel", "SamplingParams", "all_methods", "generate", "get_method", "load",
]
__version__ = "0.1.0"


def load(spec: str, **options) -> LoadedModel:
    """Load a preset, a .gguf file, a local folder or a cached hub id (see `leapdecode.loading.load`)."""
    from .loading import load as _load

    return _load(spec, **options)
