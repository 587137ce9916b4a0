"""The runtime's C++ kernels, built on first use with torch's extension builder: the row-invariant attention
(kernels/row_attention.cpp) and the matmul with 4- and 8-bit weight groups (kernels/group_matmul.cpp).

Built once per machine into torch's extensions folder (`TORCH_EXTENSIONS_DIR`, by default under
`~/.cache/torch_extensions`; about a minute with g++), then loaded from there. Where no C++ compiler is available
the exact runtime falls back to Python routines: for attention `attention.py`'s, row-invariant too but with other
bits, so one process uses one or the other for every pass, never both; for the matmul `quantized.py`'s reference,
which computes the kernel's bits exactly (much more slowly).
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

_NAME = "leapdecode_kernels"
_SOURCES = [Path(__file__).parent / "kernels" / f for f in ("bindings.cpp", "row_attention.cpp", "group_matmul.cpp",
                                                                "rms_norm.cpp")]
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
            print("leapdecode: building the C++ kernels (once per machine, about a minute)",
                  file=sys.stderr, flush=True)
        return cpp_extension.load(name=_NAME, sources=[str(s) for s in _SOURCES],
                                  extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no ninja: the Python routine serves instead
        log.warning("the C++ kernels could not be built (%s); using the slower Python routines",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
