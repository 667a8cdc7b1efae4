"""A live `myna serve` for tests: a uvicorn server on a free port of 127.0.0.1 in a thread, set up as the command
sets it up, plain HTTP exchanges, and on-load hooks that make a tiny model slow or endless (test_serve.py,
test_serve_hardening.py and test_web.py use them)."""

import http.client
import json
import socket
import threading
import time
from dataclasses import dataclass

import openai
import torch
import uvicorn

from myna.serve.api import header_deadline
from myna.serve.config import ServeConfig

KEY = "test-key"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


class LiveServer:
    """A uvicorn server for `app` on a free port of 127.0.0.1, in a thread, set up as `myna serve` sets it up."""

    def __init__(self, app, header_timeout: float = ServeConfig.header_timeout):
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        http = header_deadline(header_timeout)
        self.server = uvicorn.Server(
            uvicorn.Config(app, http=http, log_level="warning", timeout_graceful_shutdown=1)
        )
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)

    def connect(self, timeout: float = 30) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.url.removeprefix("http://"), timeout=timeout)

    def request(self, method: str, path: str, body=None, headers=None) -> "Reply":
        """One plain HTTP exchange (for what the openai client does not let us send or see)."""
        conn = self.connect()
        try:
            if isinstance(body, dict):
                body, headers = json.dumps(body), {"Content-Type": "application/json", **(headers or {})}
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()

    def health(self) -> dict:
        return self.request("GET", "/health").json()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while (health := self.health())["status"] != "ready":
            assert health["status"] == "loading", health
            assert time.monotonic() < deadline, "model did not load"
            time.sleep(0.02)

    def client(self, key: str | None = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "unused", max_retries=0, timeout=30)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def hooks(*, slow: float = 0.0, endless: bool = False):
    """An on_load hook for test servers. slow: every forward pass takes that many seconds longer (streams slow
    enough to watch and to walk away from). endless: the model never writes a special token, so every reply runs
    to max_tokens (lengths the tests can count on, whatever this tiny model learned)."""

    def on_load(loaded) -> None:
        if slow:
            loaded.model.register_forward_pre_hook(lambda *_: time.sleep(slow))
        if endless:
            specials = torch.tensor(sorted(loaded.tokenizer.special_ids.values()))

            def mask(module, args, out):
                logits = out[0] if isinstance(out, tuple) else out
                logits[..., specials] = float("-inf")

            loaded.model.register_forward_hook(mask)

    return on_load


def wait_for(predicate, timeout: float = 5.0) -> float:
    """Seconds until predicate() held; fails after timeout."""
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, "condition not met in time"
        time.sleep(0.01)
    return time.monotonic() - t0


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def error_of(response: Reply) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]
