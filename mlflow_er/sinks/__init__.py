"""Built-in sinks: where records land. Each module is a plugin registered by entry point."""

from .base import Sink

__all__ = ["Sink"]
