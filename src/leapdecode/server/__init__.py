"""An OpenAI-compatible HTTP server over the batch engine (`leapdecode serve`).

The HTTP stack is imported on first use, so the rest of the command line never waits for it."""
from __future__ import annotations

__all__ = ["BackgroundServer", "ServerConfig", "create_app"]


def __getattr__(name: str):
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
