"""`myna serve`: a trained run behind OpenAI's HTTP API, with a web chat page on the same server.

config.py holds its settings, protocol.py OpenAI's request and response shapes, api.py the app and the server."""
