"""End-to-end suite driven by the official `openai` Python SDK.

    SDK client ──> openai-stream-proxy (the binary) ──> mock upstream (replays SSE bytes)

A non-streaming `client.chat.completions.create(...)` / `client.responses.create(...)` through the
proxy must give the same object as the SDK's own streaming helper (`.stream(...)` →
`get_final_completion()` / `get_final_response()`) run directly against the mock on the same bytes,
compared as in §5 of `../shared/spec/openai-stream-semantics.md`. The proxy's raw JSON must equal
the fixture's `NAME.json`. Streaming calls through the proxy must yield exactly what the upstream
sent.

The recorded streams live in `../shared/fixtures/` (third-party data, read at test time, never
copied here); without that folder those tests are skipped with a message. The synthetic streams
below are this project's own and always run.

Environment: `OSP_BINARY` (the proxy binary; default `target/debug/openai-stream-proxy`),
`OSP_FIXTURES_DIR` (default `<repo>/../shared/fixtures`). Run through `scripts/sdk-e2e.sh`.
"""

from __future__ import annotations

import copy
import json
import os
import queue
import re
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest
from openai.types.chat import ChatCompletion

from mock_upstream import MockUpstream

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(os.environ.get("OSP_FIXTURES_DIR") or REPO.parent / "shared" / "fixtures")
SKIP_NO_FIXTURES = (
    "skipped: ../shared/fixtures not found (third-party fixtures are not part of this repository)"
)
BINARY = Path(os.environ.get("OSP_BINARY") or REPO / "target" / "debug" / "openai-stream-proxy")

READY_TIMEOUT_SECONDS = 10
CLIENT_TIMEOUT_SECONDS = 30
PROXY_UPSTREAM_TIMEOUT_SECONDS = 20
MESSAGES = [{"role": "user", "content": "hi"}]
MODEL = "gpt-4o"


# ---------------------------------------------------------------------------------------------
# Fixture discovery (at collection time, so every file is its own test)
# ---------------------------------------------------------------------------------------------


def _fixture_params(*globs: str) -> list[Any]:
    """One param per matching fixture (path relative to FIXTURES), or one skipped param."""
    if not FIXTURES.is_dir():
        return [pytest.param(None, id="no-shared-fixtures", marks=pytest.mark.skip(reason=SKIP_NO_FIXTURES))]
    names = sorted({p.relative_to(FIXTURES).as_posix() for g in globs for p in FIXTURES.glob(g)})
    if not names:
        # The folder exists but holds none of them: that is a broken checkout, not a skip.
        return [pytest.param(None, id="none-found")]
    return [pytest.param(n, id=n.rsplit("/", 1)[-1].rsplit(".", 1)[0]) for n in names]


# Top-level captured streams: the SDK's accumulation is a valid oracle for each.
CHAT_SDK_ORACLE = _fixture_params("captured/chat_real_*.sse", "reference/chat_completions_sse.txt")
RESPONSES_SDK_ORACLE = _fixture_params("captured/responses_real_*.sse", "reference/responses_sse.txt")
# Every captured stream that has a NAME.json, sdk-divergent ones included.
CHAT_EXPECTED_JSON = _fixture_params("captured/chat_real_*.sse", "captured/sdk-divergent/chat_real_*.sse")
RESPONSES_EXPECTED_JSON = _fixture_params("captured/responses_real_*.sse")
# Streaming passthrough: every recorded stream the SDK can iterate.
CHAT_STREAMS = _fixture_params(
    "captured/chat_real_*.sse", "captured/sdk-divergent/chat_real_*.sse", "reference/chat_completions_sse.txt"
)
RESPONSES_STREAMS = _fixture_params("captured/responses_real_*.sse", "reference/responses_*.txt")
ALL_STREAMS = _fixture_params(
    "captured/*.sse", "captured/sdk-divergent/*.sse", "reference/*.txt"
)


def _need(name: str | None) -> str:
    assert name, f"{FIXTURES} exists but holds no matching fixture"
    return name


def _expected_json(name: str) -> Any:
    return json.loads((FIXTURES / name).with_suffix(".json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# The project's own synthetic streams (hand-written here; no third-party content)
# ---------------------------------------------------------------------------------------------


def _sse(frames: list[tuple[str | None, Any]], *, crlf: bool = False, done: bool = False) -> bytes:
    """frames: (event name or None, JSON value or a raw ': comment' string)."""
    nl = "\r\n" if crlf else "\n"
    out = []
    for event, data in frames:
        if isinstance(data, str) and data.startswith(":"):
            out.append(data + nl)
            continue
        if event:
            out.append(f"event: {event}{nl}")
        out.append(f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}{nl}{nl}")
    if done:
        out.append(f"data: [DONE]{nl}{nl}")
    return "".join(out).encode("utf-8")


def _chat_chunk(cid: str, choices: list[Any], **extra: Any) -> dict[str, Any]:
    chunk = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": 1712345678,
        "model": "osp-synth-mini",
        "system_fingerprint": "fp_osp_synth",
        "choices": choices,
    }
    chunk.update(extra)
    return chunk


def _delta(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}


SYNTH_USAGE = {
    "prompt_tokens": 11,
    "completion_tokens": 9,
    "total_tokens": 20,
    "prompt_tokens_details": {"cached_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0},
}


def _synthetic_chat() -> dict[str, tuple[bytes, dict[str, Any]]]:
    """name -> (stream bytes, the exact body the proxy must answer with)."""
    streams: dict[str, tuple[bytes, dict[str, Any]]] = {}

    # 1. Plain text with multi-byte UTF-8, finish stop, then a usage chunk with `choices: []`.
    cid = "chatcmpl-osp-synth-plain"
    pieces = ["Tea ", "brewing: ", "steep 3–4 ", "minutes ☕", "."]
    frames: list[tuple[str | None, Any]] = [
        (None, _chat_chunk(cid, [_delta(0, {"role": "assistant", "content": "", "refusal": None})]))
    ]
    frames += [(None, _chat_chunk(cid, [_delta(0, {"content": p})])) for p in pieces]
    frames.append((None, _chat_chunk(cid, [_delta(0, {}, "stop")])))
    frames.append((None, _chat_chunk(cid, [], usage=SYNTH_USAGE)))
    streams["chat_plain_usage"] = (
        _sse(frames, done=True),
        {
            "id": cid,
            "object": "chat.completion",
            "created": 1712345678,
            "model": "osp-synth-mini",
            "system_fingerprint": "fp_osp_synth",
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "".join(pieces),
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": SYNTH_USAGE,
        },
    )

    # 2. One tool call with streamed arguments, CRLF line endings, usage on the finish chunk.
    cid = "chatcmpl-osp-synth-tool"
    args = ['{"harbour":', '"Kiel",', '"day":"tomorrow"}']
    frames = [
        (
            None,
            _chat_chunk(
                cid,
                [
                    _delta(
                        0,
                        {
                            "role": "assistant",
                            "content": None,
                            "tool_calls": [
                                {
                                    "index": 0,
                                    "id": "call_osp_synth_1",
                                    "type": "function",
                                    "function": {"name": "lookup_tide", "arguments": ""},
                                }
                            ],
                        },
                    )
                ],
            ),
        )
    ]
    frames += [
        (None, _chat_chunk(cid, [_delta(0, {"tool_calls": [{"index": 0, "function": {"arguments": a}}]})]))
        for a in args
    ]
    frames.append((None, _chat_chunk(cid, [_delta(0, {}, "tool_calls")], usage=SYNTH_USAGE)))
    streams["chat_tool_call_crlf"] = (
        _sse(frames, crlf=True, done=True),
        {
            "id": cid,
            "object": "chat.completion",
            "created": 1712345678,
            "model": "osp-synth-mini",
            "system_fingerprint": "fp_osp_synth",
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": None,
                        "refusal": None,
                        "annotations": [],
                        "tool_calls": [
                            {
                                "id": "call_osp_synth_1",
                                "type": "function",
                                "function": {"name": "lookup_tide", "arguments": "".join(args)},
                            }
                        ],
                    },
                    "logprobs": None,
                    "finish_reason": "tool_calls",
                }
            ],
            "usage": SYNTH_USAGE,
        },
    )

    # 3. Two choices interleaved, SSE comment lines between events, trailing usage chunk.
    cid = "chatcmpl-osp-synth-two"
    frames = [
        (None, ": keep-alive from the synthetic upstream"),
        (None, _chat_chunk(cid, [_delta(0, {"role": "assistant", "content": ""})])),
        (None, _chat_chunk(cid, [_delta(1, {"role": "assistant", "content": ""})])),
        (None, _chat_chunk(cid, [_delta(0, {"content": "Left "})])),
        (None, ": another comment"),
        (None, _chat_chunk(cid, [_delta(1, {"content": "Right "})])),
        (None, _chat_chunk(cid, [_delta(1, {"content": "side"})])),
        (None, _chat_chunk(cid, [_delta(0, {"content": "side"})])),
        (None, _chat_chunk(cid, [_delta(0, {}, "stop")])),
        (None, _chat_chunk(cid, [_delta(1, {}, "stop")])),
        (None, _chat_chunk(cid, [], usage=SYNTH_USAGE)),
    ]

    def choice(i: int, text: str) -> dict[str, Any]:
        return {
            "index": i,
            "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
            "logprobs": None,
            "finish_reason": "stop",
        }

    streams["chat_two_choices_comments"] = (
        _sse(frames, done=True),
        {
            "id": cid,
            "object": "chat.completion",
            "created": 1712345678,
            "model": "osp-synth-mini",
            "system_fingerprint": "fp_osp_synth",
            "choices": [choice(0, "Left side"), choice(1, "Right side")],
            "usage": SYNTH_USAGE,
        },
    )
    return streams


def _synthetic_responses() -> dict[str, tuple[bytes, dict[str, Any]]]:
    """name -> (stream bytes, the exact body the proxy must answer with: the completed response)."""
    streams: dict[str, tuple[bytes, dict[str, Any]]] = {}
    usage = {
        "input_tokens": 7,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 6,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 13,
    }

    def base(rid: str, status: str, output: list[Any], use: Any) -> dict[str, Any]:
        return {
            "id": rid,
            "object": "response",
            "created_at": 1712345678,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "max_output_tokens": None,
            "model": "osp-synth-mini",
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": use,
            "user": None,
            "metadata": {},
        }

    def frames_with_seq(events: list[dict[str, Any]]) -> list[tuple[str | None, Any]]:
        out: list[tuple[str | None, Any]] = []
        for seq, ev in enumerate(events):
            ev = {"type": ev["type"], "sequence_number": seq, **{k: v for k, v in ev.items() if k != "type"}}
            out.append((ev["type"], ev))
        return out

    # 1. A message with text deltas (multi-byte UTF-8).
    rid, mid = "resp_osp_synth_text", "msg_osp_synth_1"
    pieces = ["Fog ", "lifts ", "by noon — ", "probably."]
    text = "".join(pieces)
    part_done = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    item_done = {"id": mid, "type": "message", "status": "completed", "role": "assistant", "content": [part_done]}
    completed = base(rid, "completed", [item_done], usage)
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": base(rid, "in_progress", [], None)},
        {"type": "response.in_progress", "response": base(rid, "in_progress", [], None)},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {"id": mid, "type": "message", "status": "in_progress", "role": "assistant", "content": []},
        },
        {
            "type": "response.content_part.added",
            "item_id": mid,
            "output_index": 0,
            "content_index": 0,
            "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []},
        },
    ]
    events += [
        {
            "type": "response.output_text.delta",
            "item_id": mid,
            "output_index": 0,
            "content_index": 0,
            "delta": p,
            "logprobs": [],
        }
        for p in pieces
    ]
    events += [
        {
            "type": "response.output_text.done",
            "item_id": mid,
            "output_index": 0,
            "content_index": 0,
            "text": text,
            "logprobs": [],
        },
        {"type": "response.content_part.done", "item_id": mid, "output_index": 0, "content_index": 0, "part": part_done},
        {"type": "response.output_item.done", "output_index": 0, "item": item_done},
        {"type": "response.completed", "response": completed},
    ]
    streams["responses_text"] = (_sse(frames_with_seq(events)), completed)

    # 2. A function call with argument deltas, CRLF line endings.
    rid, fid = "resp_osp_synth_fn", "fc_osp_synth_1"
    args = ['{"harbour":', '"Kiel"}']
    item_done = {
        "id": fid,
        "type": "function_call",
        "status": "completed",
        "call_id": "call_osp_synth_2",
        "name": "lookup_tide",
        "arguments": "".join(args),
    }
    completed = base(rid, "completed", [item_done], usage)
    events = [
        {"type": "response.created", "response": base(rid, "in_progress", [], None)},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**item_done, "status": "in_progress", "arguments": ""},
        },
    ]
    events += [
        {"type": "response.function_call_arguments.delta", "item_id": fid, "output_index": 0, "delta": a}
        for a in args
    ]
    events += [
        {
            "type": "response.function_call_arguments.done",
            "item_id": fid,
            "output_index": 0,
            "arguments": "".join(args),
        },
        {"type": "response.output_item.done", "output_index": 0, "item": item_done},
        {"type": "response.completed", "response": completed},
    ]
    streams["responses_function_call_crlf"] = (_sse(frames_with_seq(events), crlf=True), completed)
    return streams


SYNTH_CHAT = _synthetic_chat()
SYNTH_RESPONSES = _synthetic_responses()


# ---------------------------------------------------------------------------------------------
# The proxy process
# ---------------------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PROXY_ENV_DROP = {
    "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
    "NO_PROXY", "no_proxy", "LOG_LEVEL",
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProxyProcess:
    """The proxy binary with one rule: 127.0.0.1:<free port> -> the mock upstream."""

    def __init__(self, binary: Path, upstream_url: str, workdir: Path) -> None:
        self.binary = binary
        self.upstream_url = upstream_url
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: list[str] = []
        self._lines: "queue.Queue[str | None]" = queue.Queue()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _drain(self, proc: subprocess.Popen[bytes], lines: "queue.Queue[str | None]") -> None:
        # Keep reading for the whole session: a full stderr pipe would block the proxy's logging.
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = _ANSI.sub("", raw.decode("utf-8", "replace")).rstrip("\n")
            self.log.append(line)
            lines.put(line)
        lines.put(None)

    def start(self) -> None:
        if not self.binary.is_file():
            pytest.fail(f"proxy binary not found: {self.binary} (build it, or set OSP_BINARY)")
        env = {k: v for k, v in os.environ.items() if k not in _PROXY_ENV_DROP}
        env.update({"RUST_LOG": "info", "NO_COLOR": "1"})
        problems = []
        for attempt in range(5):  # the free port may be taken between probe and bind
            self.port = _free_port()
            config = self.workdir / f"proxy-config-{attempt}.json"
            config.write_text(
                json.dumps(
                    {
                        "timeoutSeconds": PROXY_UPSTREAM_TIMEOUT_SECONDS,
                        "rules": [
                            {"listenPort": self.port, "listenAddress": "127.0.0.1", "upstreamUrl": self.upstream_url}
                        ],
                    }
                )
            )
            self.log = []
            lines: "queue.Queue[str | None]" = queue.Queue()
            proc = subprocess.Popen(
                [str(self.binary), "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
                cwd=self.workdir,
            )
            threading.Thread(target=self._drain, args=(proc, lines), daemon=True).start()
            deadline = time.monotonic() + READY_TIMEOUT_SECONDS
            ready = False
            while time.monotonic() < deadline:
                try:
                    line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if line is None:
                    break
                if "proxy rule" in line:
                    ready = True
                    break
            if ready:
                self.proc = proc
                return
            self._kill(proc)
            log = "\n".join(self.log)
            problems.append(f"attempt {attempt} (port {self.port}):\n{log}")
            if "in use" not in log.lower():
                break
        pytest.fail(
            f"the proxy did not report 'proxy rule' within {READY_TIMEOUT_SECONDS}s:\n" + "\n".join(problems)
        )

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
        """Stops the proxy; returns the exit code it had if it had died on its own, else None."""
        if self.proc is None:
            return None
        died = self.proc.poll()
        self._kill(self.proc)
        return died


# ---------------------------------------------------------------------------------------------
# Session fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mock() -> Iterator[MockUpstream]:
    upstream = MockUpstream(FIXTURES if FIXTURES.is_dir() else None).start()
    for name, (data, _) in {**SYNTH_CHAT, **SYNTH_RESPONSES}.items():
        upstream.register(name, data)
    yield upstream
    upstream.stop()


@pytest.fixture(scope="session")
def proxy(mock: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    process = ProxyProcess(BINARY, mock.url, tmp_path_factory.mktemp("proxy"))
    process.start()
    yield process
    died = process.stop()
    if died is not None:
        pytest.fail(f"the proxy exited by itself during the session (code {died}):\n" + "\n".join(process.log))


def _client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=base_url,
        api_key="sk-dummy-for-tests",
        max_retries=0,
        timeout=CLIENT_TIMEOUT_SECONDS,
        http_client=openai.DefaultHttpxClient(trust_env=False, timeout=CLIENT_TIMEOUT_SECONDS),
    )


@pytest.fixture(scope="session")
def via_proxy(proxy: ProxyProcess) -> Iterator[openai.OpenAI]:
    client = _client(proxy.url + "/v1")
    yield client
    client.close()


@pytest.fixture(scope="session")
def direct(mock: MockUpstream) -> Iterator[openai.OpenAI]:
    client = _client(mock.url + "/v1")
    yield client
    client.close()


def _headers(fixture: str) -> tuple[str, dict[str, str]]:
    """A request id for the mock's records, and the headers that select `fixture`."""
    rid = uuid.uuid4().hex
    return rid, {"x-mock-fixture": fixture, "x-mock-request-id": rid}


def _one_request(mock: MockUpstream, rid: str) -> Any:
    seen = mock.requests_for(rid)
    assert len(seen) == 1, f"the mock upstream saw {len(seen)} requests for one call"
    return seen[0]


# ---------------------------------------------------------------------------------------------
# Comparison (spec §5)
# ---------------------------------------------------------------------------------------------


def _diff(a: Any, b: Any, path: str = "$") -> list[str]:
    """Paths where two JSON values differ (bool is not a number; 1 == 1.0)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a:
                out.append(f"{path}.{k}: missing on the left, right has {json.dumps(b[k])[:200]}")
            elif k not in b:
                out.append(f"{path}.{k}: missing on the right, left has {json.dumps(a[k])[:200]}")
            else:
                out += _diff(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: list length {len(a)} != {len(b)}"]
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += _diff(x, y, f"{path}[{i}]")
        return out
    if isinstance(a, bool) != isinstance(b, bool) or a != b:
        return [f"{path}: {json.dumps(a)[:200]} != {json.dumps(b)[:200]}"]
    return []


def assert_same(actual: Any, expected: Any, what: str) -> None:
    diffs = _diff(actual, expected)
    assert not diffs, f"{what} differ (left = proxy, right = expected):\n  " + "\n  ".join(diffs[:30])


def normalise_chat(dump: dict[str, Any]) -> dict[str, Any]:
    """§5: drop `parsed`, `parsed_arguments`, `tool_calls[].index`; annotations null ≡ []."""
    d = copy.deepcopy(dump)
    for choice in d.get("choices") or []:
        message = choice.get("message") or {}
        message.pop("parsed", None)
        if message.get("annotations") is None:
            message["annotations"] = []
        for call in message.get("tool_calls") or []:
            call.pop("index", None)
            if isinstance(call.get("function"), dict):
                call["function"].pop("parsed_arguments", None)
    return d


def normalise_response(dump: dict[str, Any]) -> dict[str, Any]:
    """§5: drop the SDK-only `parsed_arguments` (function calls) and `parsed` (output_text)."""
    d = copy.deepcopy(dump)
    for item in d.get("output") or []:
        item.pop("parsed_arguments", None)
        for part in item.get("content") or [] if isinstance(item.get("content"), list) else []:
            if isinstance(part, dict):
                part.pop("parsed", None)
    return d


def check_chat_raw_body(body: dict[str, Any]) -> None:
    """§5's checks on the proxy's raw chat body, before any SDK parsing."""
    assert body.get("object") == "chat.completion"
    assert "obfuscation" not in body
    for choice in body["choices"]:
        message = choice["message"]
        assert "refusal" in message, f"choice {choice.get('index')}: `refusal` is missing"
        assert "parsed" not in message
        for call in message.get("tool_calls") or []:
            assert "index" not in call, "tool_calls[].index must not reach the body"
            assert "parsed_arguments" not in call.get("function", {})


# ---------------------------------------------------------------------------------------------
# Oracles: the SDK's own streaming helpers, run directly against the mock
# ---------------------------------------------------------------------------------------------


def sdk_chat_oracle(direct: openai.OpenAI, fixture: str) -> dict[str, Any]:
    _, headers = _headers(fixture)
    with direct.chat.completions.stream(model=MODEL, messages=MESSAGES, extra_headers=headers) as stream:
        final = stream.get_final_completion()
    return normalise_chat(final.model_dump(mode="json"))


def sdk_responses_oracle(direct: openai.OpenAI, fixture: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model_dump, to_dict) of get_final_response(), both normalised."""
    _, headers = _headers(fixture)
    with direct.responses.stream(model=MODEL, input="hi", extra_headers=headers) as stream:
        final = stream.get_final_response()
    return normalise_response(final.model_dump(mode="json")), normalise_response(final.to_dict())


def proxy_chat(via_proxy: openai.OpenAI, mock: MockUpstream, fixture: str) -> tuple[Any, dict[str, Any]]:
    """client.chat.completions.create(...) through the proxy; also checks what the upstream got."""
    rid, headers = _headers(fixture)
    raw = via_proxy.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, extra_headers=headers)
    assert raw.http_response.status_code == 200, raw.http_response.text
    assert raw.http_response.headers["content-type"].split(";")[0].strip() == "application/json"
    completion = raw.parse()
    assert isinstance(completion, ChatCompletion)

    upstream = _one_request(mock, rid).json
    assert upstream["stream"] is True, "the proxy must ask the upstream for a stream"
    assert upstream.get("stream_options", {}).get("include_usage") is True, (
        f"chat must get stream_options.include_usage: true, upstream got {upstream.get('stream_options')!r}"
    )
    assert upstream["model"] == MODEL and upstream["messages"] == MESSAGES
    return completion, raw.http_response.json()


def proxy_responses(via_proxy: openai.OpenAI, mock: MockUpstream, fixture: str) -> tuple[Any, dict[str, Any]]:
    """client.responses.create(...) through the proxy; also checks what the upstream got."""
    rid, headers = _headers(fixture)
    raw = via_proxy.responses.with_raw_response.create(model=MODEL, input="hi", extra_headers=headers)
    assert raw.http_response.status_code == 200, raw.http_response.text
    assert raw.http_response.headers["content-type"].split(";")[0].strip() == "application/json"
    response = raw.parse()

    upstream = _one_request(mock, rid).json
    assert upstream["stream"] is True, "the proxy must ask the upstream for a stream"
    assert "stream_options" not in upstream, "Responses calls must not get stream_options"
    assert upstream["model"] == MODEL and upstream["input"] == "hi"
    return response, raw.http_response.json()


# ---------------------------------------------------------------------------------------------
# Non-streaming calls through the proxy == the SDK's own stream accumulation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", CHAT_SDK_ORACLE)
def test_chat_create_equals_sdk_stream_helper(fixture, mock, via_proxy, direct):
    fixture = _need(fixture)
    completion, _ = proxy_chat(via_proxy, mock, fixture)
    assert_same(normalise_chat(completion.model_dump(mode="json")), sdk_chat_oracle(direct, fixture), "model_dump")


@pytest.mark.parametrize("fixture", CHAT_EXPECTED_JSON)
def test_chat_raw_body_equals_expected_json(fixture, mock, via_proxy):
    fixture = _need(fixture)
    _, body = proxy_chat(via_proxy, mock, fixture)
    check_chat_raw_body(body)
    assert_same(body, _expected_json(fixture), "raw JSON bodies")
    ChatCompletion.model_validate(body)  # every chat body validates strictly (spec §4)


def test_chat_length_equals_sdk_snapshot(mock, via_proxy, direct):
    """finish_reason `length`: get_final_completion() raises, so the oracle is the last snapshot."""
    fixture = "captured/sdk-divergent/chat_real_length.sse"
    if not FIXTURES.is_dir():
        pytest.skip(SKIP_NO_FIXTURES)
    completion, _ = proxy_chat(via_proxy, mock, fixture)
    _, headers = _headers(fixture)
    with direct.chat.completions.stream(model=MODEL, messages=MESSAGES, extra_headers=headers) as stream:
        with pytest.raises(openai.LengthFinishReasonError):
            stream.get_final_completion()
        snapshot = stream.current_completion_snapshot
    assert_same(
        normalise_chat(completion.model_dump(mode="json")),
        normalise_chat(snapshot.model_dump(mode="json")),
        "model_dump",
    )


@pytest.mark.parametrize("fixture", RESPONSES_SDK_ORACLE)
def test_responses_create_equals_sdk_stream_helper(fixture, mock, via_proxy, direct):
    fixture = _need(fixture)
    response, _ = proxy_responses(via_proxy, mock, fixture)
    oracle_dump, oracle_dict = sdk_responses_oracle(direct, fixture)
    assert_same(normalise_response(response.model_dump(mode="json")), oracle_dump, "model_dump")
    assert_same(normalise_response(response.to_dict()), oracle_dict, "to_dict")


@pytest.mark.parametrize("fixture", RESPONSES_EXPECTED_JSON)
def test_responses_raw_body_equals_expected_json(fixture, mock, via_proxy):
    fixture = _need(fixture)
    _, body = proxy_responses(via_proxy, mock, fixture)
    assert body.get("object") == "response"
    assert_same(body, _expected_json(fixture), "raw JSON bodies")


# ---------------------------------------------------------------------------------------------
# Streaming calls pass through unchanged
# ---------------------------------------------------------------------------------------------


def _stream_chat(client: openai.OpenAI, mock: MockUpstream, fixture: str) -> tuple[list[Any], bytes]:
    rid, headers = _headers(fixture)
    with client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, extra_headers=headers) as s:
        chunks = [chunk.to_dict() for chunk in s]
    return chunks, _one_request(mock, rid).body


def _stream_responses(client: openai.OpenAI, mock: MockUpstream, fixture: str) -> tuple[list[Any], bytes]:
    rid, headers = _headers(fixture)
    with client.responses.create(model=MODEL, input="hi", stream=True, extra_headers=headers) as s:
        events = [event.to_dict() for event in s]
    return events, _one_request(mock, rid).body


@pytest.mark.parametrize("fixture", CHAT_STREAMS)
def test_chat_streaming_passthrough(fixture, mock, via_proxy, direct):
    fixture = _need(fixture)
    through, sent_through = _stream_chat(via_proxy, mock, fixture)
    straight, sent_straight = _stream_chat(direct, mock, fixture)
    assert through, "no chunk came through"
    assert len(through) == len(straight)
    assert_same(through, straight, "streamed chunks")
    assert sent_through == sent_straight, "a streaming request body must reach the upstream unchanged"


@pytest.mark.parametrize("fixture", RESPONSES_STREAMS)
def test_responses_streaming_passthrough(fixture, mock, via_proxy, direct):
    fixture = _need(fixture)
    through, sent_through = _stream_responses(via_proxy, mock, fixture)
    straight, sent_straight = _stream_responses(direct, mock, fixture)
    assert through, "no event came through"
    assert len(through) == len(straight)
    assert_same(through, straight, "streamed events")
    assert sent_through == sent_straight, "a streaming request body must reach the upstream unchanged"


def _raw_stream_bytes(client: openai.OpenAI, fixture: str) -> tuple[int, str, bytes]:
    _, headers = _headers(fixture)
    if "responses" in fixture:
        call = client.responses.with_streaming_response.create(model=MODEL, input="hi", stream=True, extra_headers=headers)
    else:
        call = client.chat.completions.with_streaming_response.create(
            model=MODEL, messages=MESSAGES, stream=True, extra_headers=headers
        )
    with call as response:
        return response.status_code, response.headers.get("content-type", ""), b"".join(response.iter_bytes())


@pytest.mark.parametrize("fixture", ALL_STREAMS)
def test_streaming_passthrough_is_byte_exact(fixture, via_proxy):
    fixture = _need(fixture)
    status, content_type, body = _raw_stream_bytes(via_proxy, fixture)
    assert status == 200
    assert content_type.startswith("text/event-stream")
    expected = (FIXTURES / fixture).read_bytes()
    assert body == expected, f"streamed bytes differ from the upstream's: {len(body)} vs {len(expected)} bytes"


# ---------------------------------------------------------------------------------------------
# The project's own synthetic streams (run without ../shared/fixtures)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SYNTH_CHAT))
def test_synthetic_chat(name, mock, via_proxy, direct):
    fixture = f"inline:{name}"
    completion, body = proxy_chat(via_proxy, mock, fixture)
    check_chat_raw_body(body)
    assert_same(body, SYNTH_CHAT[name][1], "raw JSON bodies")
    ChatCompletion.model_validate(body)
    assert_same(normalise_chat(completion.model_dump(mode="json")), sdk_chat_oracle(direct, fixture), "model_dump")


@pytest.mark.parametrize("name", sorted(SYNTH_RESPONSES))
def test_synthetic_responses(name, mock, via_proxy, direct):
    fixture = f"inline:{name}"
    response, body = proxy_responses(via_proxy, mock, fixture)
    assert_same(body, SYNTH_RESPONSES[name][1], "raw JSON bodies")
    oracle_dump, oracle_dict = sdk_responses_oracle(direct, fixture)
    assert_same(normalise_response(response.model_dump(mode="json")), oracle_dump, "model_dump")
    assert_same(normalise_response(response.to_dict()), oracle_dict, "to_dict")


@pytest.mark.parametrize("name", sorted(SYNTH_CHAT) + sorted(SYNTH_RESPONSES))
def test_synthetic_streaming_passthrough(name, mock, via_proxy, direct):
    fixture = f"inline:{name}"
    stream = _stream_responses if name.startswith("responses") else _stream_chat
    through, sent_through = stream(via_proxy, mock, fixture)
    straight, sent_straight = stream(direct, mock, fixture)
    assert through
    assert_same(through, straight, "streamed items")
    assert sent_through == sent_straight
    status, content_type, body = _raw_stream_bytes(via_proxy, fixture)
    assert status == 200 and content_type.startswith("text/event-stream")
    all_synth = {**SYNTH_CHAT, **SYNTH_RESPONSES}
    assert body == all_synth[name][0], "streamed bytes differ from the upstream's"
