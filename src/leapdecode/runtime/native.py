"""The runtime's C++ kernel (kernels/row_attention.cpp), built on first use with torch's extension builder.

Built once per machine into torch's extensions folder (`TORCH_EXTENSIONS_DIR`, by default under
`~/.cache/torch_extensions`; about a minute with g++), then loaded from there. Where no C++ compiler is available
the exact runtime falls back to its Python routine (`attention.py`), which is row-invariant too but slower; one
process uses one or the other for every pass, never both, so bitwise comparisons within a process hold either way.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

_NAME = "leapdecode_row_attention"
_SOURCE = Path(__file__).parent / "kernels" / "row_attention.cpp"
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-march=native", "-fopenmp"]
_LOCK = threading.Lock()
_STATE: dict = {}
log = logging.getLogger(__name__)


def kernels():
    """The built extension module, or None when it cannot be built here (or `LEAPDECODE_NATIVE=0`)."""
    with _LOCK:
        if "module" not in _STATE:
            _STATE["module"] = _build()
        return _STATE["module"]


def _build():
    if os.environ.get("LEAPDECODE_NATIVE", "1") == "0":
        return None
    try:
        from torch.utils import cpp_extension

        folder = Path(cpp_extension._get_build_directory(_NAME, verbose=False))
        if not any(folder.glob("*.so")):  # tell the user why the first load pauses
            print("leapdecode: building the C++ attention kernel (once per machine, about a minute)",
                  file=sys.stderr, flush=True)
        return cpp_extension.load(name=_NAME, sources=[str(_SOURCE)],
                                  extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no ninja: the Python routine serves instead
        log.warning("the C++ attention kernel could not be built (%s); using the slower Python routine",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
