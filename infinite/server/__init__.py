"""OpenAI-compatible HTTP front-end (aiohttp): completions, chat, models, health, metrics, dashboard."""

from infinite.server.app import ServerSettings, create_app, serve

__all__ = ["ServerSettings", "create_app", "serve"]
