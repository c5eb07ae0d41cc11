"""Built-in backends: how records travel. Each module is a plugin registered by entry point."""

from .base import Backend

__all__ = ["Backend"]
