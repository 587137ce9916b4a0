"""An OpenAI-compatible HTTP server over the batch engine (`leapdecode serve`)."""
from .app import BackgroundServer, ServerConfig, create_app

__all__ = ["BackgroundServer", "ServerConfig", "create_app"]
