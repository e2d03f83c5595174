"""The node's HTTP server (aiohttp)."""

from .app import create_app, server_settings

__all__ = ["create_app", "server_settings"]
