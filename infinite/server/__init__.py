"""OpenAI-compatible HTTP front-end (aiohttp): completions, chat, models, health, metrics, dashboard."""

from infinite.server.app import create_app, serve
from infinite.server.state import ServerSettings

__all__ = ["ServerSettings", "create_app", "serve"]
