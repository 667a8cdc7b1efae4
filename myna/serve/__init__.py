"""`myna serve`: a trained run behind OpenAI's HTTP API, with a web chat page on the same server."""

from myna.serve.api import create_app, serve

__all__ = ["create_app", "serve"]
