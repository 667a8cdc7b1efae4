"""`myna serve` against broken and hostile clients, on live servers on 127.0.0.1: bodies that nest too deep or
are not Unicode, clients that hang up half-way or send too slowly, requests over the concurrency limit carrying
long prompts, a model that fails to load, and, without an API key, the requests a web page on another site could
make (text/plain posts, DNS rebinding). Raw sockets send what HTTP clients will not."""

import json
import logging
import socket
import sys
import threading

import pytest
from live_server import KEY, LiveServer, chat, error_of, hooks, wait_for

import myna.serve.api as api
import myna.serve.protocol as protocol
from myna.cli import main
from myna.moderation import Policy
from myna.serve.api import create_app
from myna.serve.config import ServeConfig

TIMEOUT = 0.5  # the test servers' header and body timeouts, in seconds


@pytest.fixture(scope="module")
def open_server(run_dir):
    """No API key, one extra Host name, short timeouts; one request at a time at 20 ms a forward."""
    config = ServeConfig(
        max_concurrency=1, policy=Policy.off(), body_timeout=TIMEOUT, allowed_hosts=("Myna.example",)
    )
    app = create_app(run_dir, config, on_load=hooks(slow=0.02, endless=True))
    server = LiveServer(app, header_timeout=TIMEOUT)
    server.wait_ready()
    yield server
    server.stop()


class Errors(logging.Handler):
    """The ERROR records uvicorn logs: an exception that left the app, with its traceback."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def errors():
    # attached after the servers the test uses were made: uvicorn's logging setup drops other handlers
    handler = Errors()
    logging.getLogger("uvicorn.error").addHandler(handler)
    yield handler.records
    logging.getLogger("uvicorn.error").removeHandler(handler)


def connect(server: LiveServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.settimeout(5)  # 10x the servers' timeouts: a socket still open by then stays open
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """All the server sends until it closes the connection; fails if it is still open after the socket's timeout."""
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except TimeoutError:
        pytest.fail(f"the server kept the connection open; it sent {data[:100]!r}")
    finally:
        sock.close()
    return data


def post(server: LiveServer, path: str, body: dict, headers: dict | None = None):
    return server.request("POST", path, body, headers)


# ---------------------------------------------------------------------------------------------------------------
# Bodies


def test_bodies_too_deep_or_not_unicode_are_400s(open_server, run_dir, errors):
    deep = "[" * 1100 + "]" * 1100  # 2 KB that Python's json cannot parse without running out of stack...
    json_headers = {"Content-Type": "application/json"}
    limit = sys.getrecursionlimit()
    for recursion_limit in (limit, 10_000):  # ...unless the process raised its limit (Hypothesis does)
        sys.setrecursionlimit(recursion_limit)
        try:
            for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
                r = open_server.request("POST", path, deep, json_headers)
                assert r.status == 400 and error_of(r)["message"] == protocol.TOO_DEEP, r.body
        finally:
            sys.setrecursionlimit(limit)
    # deep enough to refuse, shallow enough to parse: later steps would recurse into it
    nested = "[" * 40 + "1" + "]" * 40
    r = open_server.request(
        "POST", "/v1/completions", f'{{"model": "m", "temperature": {nested}}}', json_headers
    )
    assert r.status == 400 and error_of(r)["message"] == protocol.TOO_DEEP
    # a lone surrogate is valid JSON but no text: echoed back in an error or a reply it cannot be encoded
    for body in (
        {"model": "\ud800", "prompt": "hi"},
        {"model": run_dir.name, "prompt": "\udfff", "echo": True},
    ):
        r = post(open_server, "/v1/completions", body)
        assert r.status == 400 and "lone surrogate (\\ud" in error_of(r)["message"], r.body
    # a surrogate pair is how an ASCII-only encoder writes an emoji: that is text
    r = post(open_server, "/v1/completions", {"model": run_dir.name, "prompt": "hi 😀", "max_tokens": 1})
    assert r.status == 200, r.body
    assert not errors


def test_an_unexpected_error_is_a_json_500(open_server, run_dir, monkeypatch):
    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(api, "check_fields", broken)
    r = post(open_server, "/v1/completions", {"model": run_dir.name, "prompt": "hi"})
    assert r.status == 500 and error_of(r)["type"] == "server_error" and "a bug" not in r.body.decode()


def test_a_client_gone_mid_body_is_no_server_error(run_dir):
    ended = []

    async def app(scope, receive, send):  # notes when the server is done with each request
        try:
            await inner(scope, receive, send)
        finally:
            ended.append(scope.get("path"))

    inner = create_app(run_dir, ServeConfig(policy=Policy.off()))
    server = LiveServer(app)
    try:
        server.wait_ready()
        errors = Errors()  # after the server: its logging setup would drop a handler attached before
        logging.getLogger("uvicorn.error").addHandler(errors)
        sock = connect(server)
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"model": '
        )
        sock.close()
        wait_for(lambda: "/v1/chat/completions" in ended)
        server.health()  # the server has moved on past anything that request logs
        logging.getLogger("uvicorn.error").removeHandler(errors)
        assert not errors.records, [r.getMessage() for r in errors.records]
    finally:
        server.stop()


def test_a_body_that_stalls_gets_408(open_server, run_dir):
    sock = connect(open_server)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"model": '
    )
    head, _, body = read_until_closed(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "request_timeout"
    ok = open_server.client().completions.create(model=run_dir.name, prompt="hi", max_tokens=2)
    assert ok.usage.completion_tokens == 2


# ---------------------------------------------------------------------------------------------------------------
# Connections


def test_connections_that_send_no_complete_headers_are_closed(open_server, run_dir):
    silent = connect(open_server)
    partial = connect(open_server)
    partial.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    # after a response, uvicorn's keep-alive timeout ends once the next request starts
    kept = connect(open_server)
    kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert kept.recv(4096).startswith(b"HTTP/1.1 200")
    kept.sendall(b"GET /health HTTP/1.1\r\nHo")
    for sock in (silent, partial, kept):
        read_until_closed(sock)
    # a request whose headers came in time runs as long as it needs: 40 tokens at 20 ms each
    stream = open_server.client().completions.create(
        model=run_dir.name, prompt="hi", max_tokens=40, stream=True, stream_options={"include_usage": True}
    )
    assert list(stream)[-1].usage.completion_tokens == 40


# ---------------------------------------------------------------------------------------------------------------
# The concurrency limit comes before the work


def test_over_the_limit_is_refused_before_the_prompt_is_read(open_server, run_dir, monkeypatch):
    threads = []  # the thread of every tokenizer and moderation call
    tok = open_server.app.state.server.loaded.tokenizer
    encode, moderate = tok.encode, api.moderate_exchange

    def counted(fn):
        return lambda *args: threads.append(threading.current_thread()) or fn(*args)

    monkeypatch.setattr(tok, "encode", counted(encode))
    monkeypatch.setattr(api, "moderate_exchange", counted(moderate))
    long = "so tired today " * 20_000
    requests = [
        ("/v1/chat/completions", {"messages": chat(long), "max_tokens": 1}),
        ("/v1/completions", {"prompt": long, "max_tokens": 1}),
        ("/v1/embeddings", {"input": [long[:300]] * 100}),
    ]
    conn = open_server.connect()
    try:
        body = {"model": run_dir.name, "prompt": "hello", "max_tokens": 100, "stream": True}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        assert conn.getresponse().readline().startswith(b"data: ")  # the one slot is taken
        threads.clear()
        for path, body in requests:
            r = post(open_server, path, {"model": run_dir.name, **body})
            assert r.status == 429 and error_of(r)["code"] == "rate_limit_exceeded", r.body
        assert threads == []
    finally:
        conn.close()
    wait_for(lambda: open_server.health()["active_requests"] == 0)
    # admitted, the same work runs off the event loop, which streams the other replies meanwhile
    for path, body in requests:
        r = post(open_server, path, {"model": run_dir.name, **body})
        assert r.status in (200, 400), r.body  # a prompt too long for a completion is a 400, once tokenized
    assert threads and open_server.thread not in threads


# ---------------------------------------------------------------------------------------------------------------
# What an unauthenticated caller learns, and who may call a server without a key


def test_a_failed_load_shows_no_paths(run_dir, tmp_path):
    def fail(loaded):
        (tmp_path / "missing" / "tokenizer.json").read_text()

    server = LiveServer(create_app(run_dir, ServeConfig(policy=Policy.off()), on_load=fail))
    try:
        wait_for(lambda: server.health()["status"] == "error")
        for r in (server.request("GET", "/health"), server.request("GET", "/v1/models")):
            assert r.status == 503 and "FileNotFoundError" in r.body.decode(), r.body
            assert str(tmp_path) not in r.body.decode() and str(run_dir) not in r.body.decode()
    finally:
        server.stop()


def test_without_a_key_only_json_from_loopback_names(open_server, run_dir):
    body = json.dumps({"model": run_dir.name, "prompt": "hi", "max_tokens": 1})
    # what a page on another site can post without asking (a form, fetch in no-cors mode)
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        r = open_server.request("POST", "/v1/completions", body, {"Content-Type": kind} if kind else {})
        assert r.status == 415 and error_of(r)["code"] == "unsupported_media_type", (kind, r.body)
        assert "Content-Type: expected application/json" in error_of(r)["message"]
    port = open_server.port
    json_body = {"Content-Type": "application/json; charset=utf-8"}
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}", "127.0.0.2"):
        assert open_server.request("POST", "/v1/completions", body, {**json_body, "Host": host}).status == 200
    assert open_server.request("GET", "/health", headers={"Host": "myna.example:8000"}).status == 200
    # a page whose own name was pointed at 127.0.0.1 (DNS rebinding) sends its own name
    for host in ("evil.example", f"evil.example:{port}", "localhost.evil.example", "127.0.0.1@evil.example"):
        for method, path in (
            ("GET", "/"),
            ("GET", "/health"),
            ("GET", "/v1/models"),
            ("POST", "/v1/completions"),
        ):
            r = open_server.request(
                method, path, body if method == "POST" else None, {**json_body, "Host": host}
            )
            assert r.status == 403 and error_of(r)["code"] == "host_not_allowed", (host, path, r.body)
            assert repr(host) in error_of(r)["message"]
    # the official client, plain and streamed
    client = open_server.client(key=None)
    assert (
        client.completions.create(model=run_dir.name, prompt="hi", max_tokens=2).usage.completion_tokens == 2
    )
    assert "".join(c.choices[0].text for c in client.completions.create(**json.loads(body), stream=True))


def test_with_a_key_the_key_is_the_protection(run_dir):
    server = LiveServer(create_app(run_dir, ServeConfig(api_key=KEY, policy=Policy.off())))
    try:
        server.wait_ready()
        body = json.dumps({"model": run_dir.name, "prompt": "hi", "max_tokens": 1})
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain", "Host": "myna.example"}
        assert server.request("POST", "/v1/completions", body, headers).status == 200
        r = server.request("POST", "/v1/completions", body, {**headers, "Authorization": ""})
        assert r.status == 401
    finally:
        server.stop()


def test_serve_flags_reach_the_server(monkeypatch):
    seen = {}
    monkeypatch.setattr(api, "serve", lambda ckpt, config: seen.update(vars(config)))
    main(["serve", "--ckpt", "RUN", "--allow-host", "a.example", "--allow-host", "b.example"])
    assert seen["allowed_hosts"] == ("a.example", "b.example")
    assert seen["header_timeout"] == 10 and seen["body_timeout"] == 30
    main(["serve", "--ckpt", "RUN", "--header-timeout", "2.5", "--body-timeout", "4"])
    assert seen["allowed_hosts"] == () and seen["header_timeout"] == 2.5 and seen["body_timeout"] == 4
