"""End-to-end WebSocket proxying with a third-party client and server: the `websockets` library.

    websockets client ──> openai-stream-proxy (the binary) ──> websockets server (the mock upstream)

Checks what a Realtime client relies on: the path and query reach the upstream, credentials and
the subprotocol offer are forwarded and the upstream's choice comes back, messages echo unchanged,
close codes and reasons cross in both directions, and a refused handshake reaches the client as
the upstream's HTTP status and body.

Environment: `OSP_BINARY` (the proxy binary; default `target/debug/openai-stream-proxy`). Run
through `scripts/sdk-e2e.sh`.
"""

from __future__ import annotations

import http
import json
import os
import queue
import re
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Request, Response
from websockets.sync.client import connect
from websockets.sync.server import Server, ServerConnection, serve

REPO = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("OSP_BINARY") or REPO / "target" / "debug" / "openai-stream-proxy")
READY_TIMEOUT_SECONDS = 10
WAIT_SECONDS = 10
REFUSAL = json.dumps(
    {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"}}
).encode()

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PROXY_ENV_DROP = {
    "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
    "NO_PROXY", "no_proxy", "LOG_LEVEL",
}


# ---------------------------------------------------------------------------------------------
# The mock upstream: a `websockets` server
# ---------------------------------------------------------------------------------------------


class Upstream:
    """Echoes messages; `close <code> <reason>` makes it close with that code and reason.

    A request whose `Authorization` is `Bearer bad` is refused with 401 and a JSON body. It picks
    the `realtime` subprotocol when offered. Every session is recorded.
    """

    def __init__(self) -> None:
        self.sessions: "queue.Queue[dict[str, Any]]" = queue.Queue()
        self.server: Server = serve(
            self._handler,
            "127.0.0.1",
            0,
            process_request=self._process_request,
            select_subprotocol=lambda _conn, offered: "realtime" if "realtime" in offered else None,
            max_size=4 * 1024 * 1024,
        )
        self.port = self.server.socket.getsockname()[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @staticmethod
    def _process_request(_conn: ServerConnection, request: Request) -> Response | None:
        if request.headers.get("Authorization") == "Bearer bad":
            headers = Headers(
                [("Content-Type", "application/json"), ("Content-Length", str(len(REFUSAL))), ("X-Request-Id", "req-1")]
            )
            return Response(http.HTTPStatus.UNAUTHORIZED.value, "Unauthorized", headers, REFUSAL)
        return None

    def _handler(self, conn: ServerConnection) -> None:
        record: dict[str, Any] = {
            "path": conn.request.path if conn.request else None,
            "headers": dict(conn.request.headers.raw_items()) if conn.request else {},
            "subprotocol": conn.subprotocol,
        }
        try:
            for message in conn:
                if isinstance(message, str) and message.startswith("close "):
                    _, code, reason = message.split(" ", 2)
                    conn.close(int(code), reason)
                    break
                conn.send(message)
        except ConnectionClosed:
            pass
        rcvd = conn.protocol.close_rcvd
        record["close_rcvd"] = (rcvd.code, rcvd.reason) if rcvd else None
        self.sessions.put(record)

    def next_session(self) -> dict[str, Any]:
        return self.sessions.get(timeout=WAIT_SECONDS)

    def stop(self) -> None:
        self.server.shutdown()
        self._thread.join(timeout=WAIT_SECONDS)


# ---------------------------------------------------------------------------------------------
# The proxy binary (a small copy of test_sdk_e2e.py's starter, kept independent of it)
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proxy:
    def __init__(self, upstream_url: str, workdir: Path) -> None:
        self.upstream_url = upstream_url
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: list[str] = []

    def _drain(self, proc: subprocess.Popen[bytes], lines: "queue.Queue[str | None]") -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = _ANSI.sub("", raw.decode("utf-8", "replace")).rstrip("\n")
            self.log.append(line)
            lines.put(line)
        lines.put(None)

    def start(self) -> None:
        if not BINARY.is_file():
            pytest.fail(f"proxy binary not found: {BINARY} (build it, or set OSP_BINARY)")
        env = {k: v for k, v in os.environ.items() if k not in _PROXY_ENV_DROP}
        env.update({"RUST_LOG": "info", "NO_COLOR": "1"})
        problems = []
        for attempt in range(5):  # the free port may be taken between probe and bind
            self.port = _free_port()
            config = self.workdir / f"ws-proxy-config-{attempt}.json"
            config.write_text(
                json.dumps(
                    {
                        "timeoutSeconds": 5,
                        "rules": [
                            {"listenPort": self.port, "listenAddress": "127.0.0.1", "upstreamUrl": self.upstream_url}
                        ],
                    }
                )
            )
            self.log = []
            lines: "queue.Queue[str | None]" = queue.Queue()
            proc = subprocess.Popen(
                [str(BINARY), "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
                cwd=self.workdir,
            )
            threading.Thread(target=self._drain, args=(proc, lines), daemon=True).start()
            deadline = time.monotonic() + READY_TIMEOUT_SECONDS
            while time.monotonic() < deadline:
                try:
                    line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if line is None:
                    break
                if "proxy rule" in line:
                    self.proc = proc
                    return
            self._kill(proc)
            log = "\n".join(self.log)
            problems.append(f"attempt {attempt} (port {self.port}):\n{log}")
            if "in use" not in log.lower():
                break
        pytest.fail(f"the proxy did not report 'proxy rule' within {READY_TIMEOUT_SECONDS}s:\n" + "\n".join(problems))

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        died = self.proc.poll()
        self._kill(self.proc)
        return died

    def ws_url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    process = Proxy(upstream.url + "/openai", tmp_path_factory.mktemp("ws-proxy"))
    process.start()
    yield process
    died = process.stop()
    if died is not None:
        pytest.fail(f"the proxy exited by itself (code {died}):\n" + "\n".join(process.log))


def _connect(proxy: Proxy, path: str, **kwargs: Any) -> Any:
    return connect(
        proxy.ws_url(path),
        open_timeout=WAIT_SECONDS,
        close_timeout=WAIT_SECONDS,
        max_size=4 * 1024 * 1024,
        proxy=None,
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


def test_echo_subprotocol_and_headers(proxy: Proxy, upstream: Upstream) -> None:
    offer = ["realtime", "openai-insecure-api-key.sk-x", "openai-beta.realtime-v1"]
    with _connect(
        proxy,
        "/v1/realtime?model=gpt-realtime",
        subprotocols=offer,
        additional_headers={"Authorization": "Bearer sk-test", "OpenAI-Beta": "realtime=v1"},
        user_agent_header="ws-e2e/1.0",
    ) as ws:
        assert ws.subprotocol == "realtime"
        for message in ["hello", "héllo ✓", b"\x00\x01\xffbinary", "x" * 200_000, b"\x07" * 1_000_000]:
            ws.send(message)
            assert ws.recv(timeout=WAIT_SECONDS) == message
        # A ping is answered by the proxy.
        assert ws.ping(b"are you there").wait(timeout=WAIT_SECONDS)
        ws.send("still up")
        assert ws.recv(timeout=WAIT_SECONDS) == "still up"
    session = upstream.next_session()
    assert session["path"] == "/openai/v1/realtime?model=gpt-realtime"
    assert session["subprotocol"] == "realtime"
    headers = {k.lower(): v for k, v in session["headers"].items()}
    assert headers["sec-websocket-protocol"] == ", ".join(offer)
    assert headers["authorization"] == "Bearer sk-test"
    assert headers["openai-beta"] == "realtime=v1"
    assert headers["user-agent"] == "ws-e2e/1.0"
    assert headers["host"] == f"127.0.0.1:{upstream.port}"
    # The client's plain close (1000) reached the upstream.
    assert session["close_rcvd"] == (1000, "")


def test_upstream_close_code_and_reason_reach_the_client(proxy: Proxy, upstream: Upstream) -> None:
    for code, reason in [(4001, "bye"), (1000, "done")]:
        with _connect(proxy, "/v1/realtime") as ws:
            ws.send(f"close {code} {reason}")
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=WAIT_SECONDS)
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (code, reason)
        upstream.next_session()


def test_client_close_code_and_reason_reach_the_upstream(proxy: Proxy, upstream: Upstream) -> None:
    with _connect(proxy, "/v1/realtime") as ws:
        ws.send("warm-up")
        assert ws.recv(timeout=WAIT_SECONDS) == "warm-up"
        ws.close(4000, "client done")
    assert upstream.next_session()["close_rcvd"] == (4000, "client done")


def test_a_refused_handshake_reaches_the_client_as_http(proxy: Proxy, upstream: Upstream) -> None:
    with pytest.raises(InvalidStatus) as refused:
        _connect(proxy, "/v1/realtime", additional_headers={"Authorization": "Bearer bad"})
    response = refused.value.response
    assert response.status_code == 401
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["X-Request-Id"] == "req-1"
    assert response.body == REFUSAL
