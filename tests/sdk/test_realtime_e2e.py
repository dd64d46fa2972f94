"""End-to-end Realtime sessions driven by the official openai Python SDK through the proxy.

    openai SDK (client.realtime.connect) ──> openai-stream-proxy (the binary) ──> mock Realtime upstream

The mock upstream is a `websockets` server that speaks enough of the (GA) Realtime protocol, with
the event names of the installed SDK's `openai.types.realtime` models: it sends `session.created`
on connect, answers `session.update` with `session.updated`, acknowledges
`conversation.item.create` with `conversation.item.added` / `conversation.item.done`, and answers
`response.create` with `response.created`, `response.output_item.added`,
`response.content_part.added`, several `response.output_text.delta`, `response.output_text.done`,
`response.content_part.done`, `response.output_item.done` and `response.done`. The reply text is
built from the user's message, so the assembled deltas prove the message crossed the proxy intact.

The SDK derives its WebSocket URL from `base_url` (http -> ws, `/realtime` appended, `model` in the
query), so pointing `base_url` at the proxy is all a user has to do. The upstream checks that the
path, the query and `Authorization: Bearer ...` arrived unchanged, and records the close frame it
received so that a client-side close can be checked as a normal (1000) close.

Environment: `OSP_BINARY` (the proxy binary; default `target/debug/openai-stream-proxy`). Run
through `scripts/sdk-e2e.sh`.
"""

from __future__ import annotations

import asyncio
import http
import itertools
import json
import os
import queue
import re
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Iterator, TypeVar
from urllib.parse import parse_qs, urlsplit

import openai
import pytest
from openai.types.realtime import (
    ResponseDoneEvent,
    ResponseTextDeltaEvent,
    SessionCreatedEvent,
    SessionUpdatedEvent,
)
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.sync.server import Server, ServerConnection, serve

REPO = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("OSP_BINARY") or REPO / "target" / "debug" / "openai-stream-proxy")
READY_TIMEOUT_SECONDS = 10
WAIT_SECONDS = 10
MODEL = "gpt-realtime"
API_KEY = "sk-test-realtime"
USER_TEXT = "Say hi to the proxy — héllo ✓"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PROXY_ENV_DROP = {
    "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
    "NO_PROXY", "no_proxy", "WS_PROXY", "ws_proxy", "WSS_PROXY", "wss_proxy", "LOG_LEVEL",
}

T = TypeVar("T")


def reply_for(user_text: str) -> str:
    return f"You said: {user_text}"


def _chunks(text: str, size: int = 5) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


# ---------------------------------------------------------------------------------------------
# The mock Realtime upstream: a `websockets` server
# ---------------------------------------------------------------------------------------------


def _json_refusal(status: http.HTTPStatus, code: str, message: str) -> Response:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "code": code}}).encode()
    headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return Response(status.value, status.phrase, headers, body)


class RealtimeUpstream:
    """A minimal Realtime server. Every session is recorded and put on `sessions` when it ends.

    The handshake is refused (404 / 401, JSON body) unless the path is `/v1/realtime` with a
    `model` query parameter and the request carries `Authorization: Bearer <key>`.
    """

    def __init__(self) -> None:
        self.sessions: "queue.Queue[dict[str, Any]]" = queue.Queue()
        self.refused: "queue.Queue[dict[str, Any]]" = queue.Queue()
        self._ids = itertools.count(1)
        self.server: Server = serve(
            self._handler,
            "127.0.0.1",
            0,
            process_request=self._process_request,
            max_size=4 * 1024 * 1024,
        )
        self.port = self.server.socket.getsockname()[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids):04d}"

    def _process_request(self, _conn: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        query = parse_qs(url.query)
        auth = request.headers.get("Authorization", "")
        if url.path != "/v1/realtime" or not query.get("model"):
            self.refused.put({"path": request.path, "why": "path"})
            return _json_refusal(http.HTTPStatus.NOT_FOUND, "not_found", f"unexpected path {request.path}")
        if not auth.startswith("Bearer ") or len(auth) <= len("Bearer "):
            self.refused.put({"path": request.path, "why": "auth"})
            return _json_refusal(http.HTTPStatus.UNAUTHORIZED, "invalid_api_key", "missing bearer token")
        return None

    def _handler(self, conn: ServerConnection) -> None:
        assert conn.request is not None
        url = urlsplit(conn.request.path)
        model = parse_qs(url.query)["model"][0]
        record: dict[str, Any] = {
            "path": conn.request.path,
            "model": model,
            "headers": {k.lower(): v for k, v in conn.request.headers.raw_items()},
            "events": [],
            "close_rcvd": None,
            "error": None,
        }
        session: dict[str, Any] = {
            "type": "realtime",
            "id": self._id("sess"),
            "object": "realtime.session",
            "model": model,
            "output_modalities": ["audio"],
            "instructions": "",
        }
        items: list[dict[str, Any]] = []

        def send(event_type: str, **fields: Any) -> None:
            conn.send(json.dumps({"type": event_type, "event_id": self._id("event"), **fields}))

        try:
            send("session.created", session=session)
            for message in conn:
                event = json.loads(message)
                record["events"].append(event)
                kind = event.get("type")
                if kind == "session.update":
                    session.update(event.get("session") or {})
                    send("session.updated", session=session)
                elif kind == "conversation.item.create":
                    item = {**event["item"], "id": self._id("item"), "object": "realtime.item", "status": "completed"}
                    previous = items[-1]["id"] if items else None
                    items.append(item)
                    send("conversation.item.added", previous_item_id=previous, item=item)
                    send("conversation.item.done", previous_item_id=previous, item=item)
                elif kind == "response.create":
                    self._respond(send, session, items)
                else:
                    send(
                        "error",
                        error={
                            "type": "invalid_request_error",
                            "code": "unknown_event",
                            "message": f"the mock does not handle {kind!r}",
                            "event_id": event.get("event_id"),
                        },
                    )
        except ConnectionClosed:
            pass
        except Exception as exc:  # surfaced by the test through the record
            record["error"] = repr(exc)
        rcvd = conn.protocol.close_rcvd
        record["close_rcvd"] = (rcvd.code, rcvd.reason) if rcvd else None
        self.sessions.put(record)

    def _respond(self, send: Any, session: dict[str, Any], items: list[dict[str, Any]]) -> None:
        user_text = ""
        for item in reversed(items):
            if item.get("role") == "user":
                user_text = "".join(
                    part.get("text", "") for part in item.get("content", []) if part.get("type") == "input_text"
                )
                break
        text = reply_for(user_text)
        response_id = self._id("resp")
        item_id = self._id("item")
        base = {"id": response_id, "object": "realtime.response", "conversation_id": "conv_0001"}
        modalities = session.get("output_modalities") or ["audio"]
        send("response.created", response={**base, "status": "in_progress", "output": [], "output_modalities": modalities})
        message = {"id": item_id, "object": "realtime.item", "type": "message", "role": "assistant"}
        send("response.output_item.added", response_id=response_id, output_index=0,
             item={**message, "status": "in_progress", "content": []})
        where = {"response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0}
        send("response.content_part.added", **where, part={"type": "text", "text": ""})
        for delta in _chunks(text):
            send("response.output_text.delta", **where, delta=delta)
        send("response.output_text.done", **where, text=text)
        send("response.content_part.done", **where, part={"type": "text", "text": text})
        done_item = {**message, "status": "completed", "content": [{"type": "output_text", "text": text}]}
        items.append(done_item)
        send("response.output_item.done", response_id=response_id, output_index=0, item=done_item)
        send(
            "response.done",
            response={
                **base,
                "status": "completed",
                "output": [done_item],
                "output_modalities": modalities,
                "usage": {"input_tokens": 7, "output_tokens": len(_chunks(text)), "total_tokens": 7 + len(_chunks(text))},
            },
        )

    def next_session(self) -> dict[str, Any]:
        record = self.sessions.get(timeout=WAIT_SECONDS)
        assert record["error"] is None, f"the mock upstream failed: {record['error']}"
        return record

    def stop(self) -> None:
        self.server.shutdown()
        self._thread.join(timeout=WAIT_SECONDS)


# ---------------------------------------------------------------------------------------------
# The proxy binary (a small copy of test_websocket_e2e.py's starter, kept independent of it)
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
        self._drainer: threading.Thread | None = None

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
            config = self.workdir / f"realtime-proxy-config-{attempt}.json"
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
            self._drainer = threading.Thread(target=self._drain, args=(proc, lines), daemon=True)
            self._drainer.start()
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
        if self._drainer is not None:
            self._drainer.join(timeout=5)
        if self.proc.stderr is not None and (self._drainer is None or not self._drainer.is_alive()):
            self.proc.stderr.close()
        return died

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@pytest.fixture(scope="module")
def upstream() -> Iterator[RealtimeUpstream]:
    server = RealtimeUpstream()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(upstream: RealtimeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    process = Proxy(upstream.url, tmp_path_factory.mktemp("realtime-proxy"))
    process.start()
    yield process
    died = process.stop()
    if died is not None:
        pytest.fail(f"the proxy exited by itself (code {died}):\n" + "\n".join(process.log))


@pytest.fixture(autouse=True)
def _no_env_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    # websockets >= 15 picks up proxies from the environment; everything here is 127.0.0.1.
    for name in _PROXY_ENV_DROP:
        monkeypatch.delenv(name, raising=False)
    for name in ("OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID"):
        monkeypatch.delenv(name, raising=False)


def _run(coro: Awaitable[T], seconds: float = 3 * WAIT_SECONDS) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout=seconds)

    return asyncio.run(bounded())


def _async_client(proxy: Proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base_url, api_key=API_KEY, max_retries=0)


def _assert_handshake(session: dict[str, Any], upstream: RealtimeUpstream) -> None:
    assert session["path"] == f"/v1/realtime?model={MODEL}"
    assert session["model"] == MODEL
    headers = session["headers"]
    assert headers["authorization"] == f"Bearer {API_KEY}"
    assert "openai/python" in headers.get("user-agent", "").lower()
    assert headers["host"] == f"127.0.0.1:{upstream.port}"


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


def test_async_realtime_session_through_the_proxy(proxy: Proxy, upstream: RealtimeUpstream) -> None:
    async def session() -> dict[str, Any]:
        client = _async_client(proxy)
        seen: list[str] = []
        deltas: list[str] = []
        async with client.realtime.connect(model=MODEL) as conn:
            created = await conn.recv()
            assert isinstance(created, SessionCreatedEvent), created
            assert created.session.model == MODEL

            await conn.session.update(
                session={"type": "realtime", "output_modalities": ["text"], "instructions": "Answer briefly."}
            )
            updated = await conn.recv()
            assert isinstance(updated, SessionUpdatedEvent), updated
            assert updated.session.output_modalities == ["text"]
            assert updated.session.instructions == "Answer briefly."

            await conn.conversation.item.create(
                item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": USER_TEXT}]}
            )
            await conn.response.create()

            done: ResponseDoneEvent | None = None
            async for event in conn:
                seen.append(event.type)
                if isinstance(event, ResponseTextDeltaEvent):
                    deltas.append(event.delta)
                elif event.type == "error":
                    pytest.fail(f"the upstream answered an error: {event}")
                elif isinstance(event, ResponseDoneEvent):
                    done = event
                    break
            assert done is not None, f"the event stream ended before response.done: {seen}"
        await client.close()
        return {"seen": seen, "deltas": deltas, "done": done}

    result = _run(session())
    expected = reply_for(USER_TEXT)
    assert "".join(result["deltas"]) == expected
    assert len(result["deltas"]) == len(_chunks(expected)) > 1
    seen = result["seen"]
    assert seen[0] == "conversation.item.added"
    assert seen.index("response.created") < seen.index("response.output_text.delta")
    assert seen[-1] == "response.done"
    done = result["done"]
    assert done.response.status == "completed"
    assert done.response.output[0].content[0].text == expected
    assert done.response.usage is not None and done.response.usage.total_tokens > 0

    recorded = upstream.next_session()
    _assert_handshake(recorded, upstream)
    events = recorded["events"]
    assert [e["type"] for e in events] == ["session.update", "conversation.item.create", "response.create"]
    assert events[0]["session"]["output_modalities"] == ["text"]
    assert events[1]["item"]["content"][0]["text"] == USER_TEXT
    # Leaving `async with` closed the connection normally, and the upstream saw that close.
    assert recorded["close_rcvd"] == (1000, "")


def test_client_close_reaches_the_upstream_as_a_normal_close(proxy: Proxy, upstream: RealtimeUpstream) -> None:
    async def session() -> list[str]:
        client = _async_client(proxy)
        after_close: list[str] = []
        async with client.realtime.connect(model=MODEL) as conn:
            assert isinstance(await conn.recv(), SessionCreatedEvent)
            await conn.close(reason="client done")
            # With the connection closed normally, iterating ends quietly instead of raising.
            async for event in conn:
                after_close.append(event.type)
        await client.close()
        return after_close

    assert _run(session()) == []
    recorded = upstream.next_session()
    _assert_handshake(recorded, upstream)
    assert recorded["events"] == []
    assert recorded["close_rcvd"] == (1000, "client done")


def test_sync_realtime_session_through_the_proxy(proxy: Proxy, upstream: RealtimeUpstream) -> None:
    def session() -> list[str]:
        client = openai.OpenAI(base_url=proxy.base_url, api_key=API_KEY, max_retries=0)
        deltas: list[str] = []
        with client.realtime.connect(model=MODEL) as conn:
            assert isinstance(conn.recv(), SessionCreatedEvent)
            conn.conversation.item.create(
                item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "sync"}]}
            )
            conn.response.create()
            for event in conn:
                if isinstance(event, ResponseTextDeltaEvent):
                    deltas.append(event.delta)
                elif event.type == "error":
                    raise AssertionError(f"the upstream answered an error: {event}")
                elif event.type == "response.done":
                    break
        client.close()
        return deltas

    # The sync API blocks without a deadline: run it on a thread and bound the wait.
    outcome: "queue.Queue[tuple[bool, Any]]" = queue.Queue()

    def worker() -> None:
        try:
            outcome.put((True, session()))
        except BaseException as exc:  # re-raised below
            outcome.put((False, exc))

    threading.Thread(target=worker, daemon=True).start()
    try:
        ok, value = outcome.get(timeout=3 * WAIT_SECONDS)
    except queue.Empty:
        pytest.fail(f"the sync Realtime session did not finish within {3 * WAIT_SECONDS}s")
    if not ok:
        raise value
    assert "".join(value) == reply_for("sync")
    recorded = upstream.next_session()
    _assert_handshake(recorded, upstream)
    assert [e["type"] for e in recorded["events"]] == ["conversation.item.create", "response.create"]
    assert recorded["close_rcvd"] == (1000, "")
