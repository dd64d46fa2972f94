"""A small threaded HTTP/1.1 mock upstream that replays SSE bodies (stdlib only).

POST /v1/chat/completions and POST /v1/responses answer 200 `text/event-stream` with the bytes of
the stream named by the request header ``x-mock-fixture``:

- ``inline:NAME`` names a stream registered with :meth:`MockUpstream.register` (the suite's own
  synthetic streams);
- anything else is a path relative to the fixtures directory given to the constructor, e.g.
  ``captured/chat_real_plain_usage.sse``. Paths outside that directory are refused.

The body is sent with ``Transfer-Encoding: chunked`` in small pieces split at pseudo-random byte
boundaries (seeded per request, so a failure can be replayed), each one flushed on its own, so
that the proxy's SSE parser sees events cut anywhere, including inside a UTF-8 sequence or a CRLF.

Every request is recorded (method, path, headers, raw body, parsed JSON body) under the value of
its ``x-mock-request-id`` header so that a test can assert what the upstream received, e.g.
``"stream": true`` and ``stream_options.include_usage``.

A request whose JSON body does not say ``"stream": true`` is answered 400: this upstream only
streams, so a proxy that forgot to convert a call fails loudly instead of parsing SSE as JSON.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

STREAM_PATHS = ("/v1/chat/completions", "/v1/responses")
IO_TIMEOUT_SECONDS = 30


class Recorded:
    """One request as the mock received it."""

    def __init__(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        try:
            self.json: Any = json.loads(body) if body else None
        except ValueError:
            self.json = None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = IO_TIMEOUT_SECONDS
    server: "_Server"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # keep pytest output clean; requests are recorded instead

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # --- request body -------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size_line = self.rfile.readline(1024)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # trailers, up to the empty line
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline(16)  # CRLF after the chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    # --- responses ----------------------------------------------------------------------------

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _error(self, status: int, message: str) -> None:
        self._send_json(status, {"error": {"message": f"mock upstream: {message}", "type": "mock_error"}})

    def _send_chunked(self, data: bytes, seed: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        for piece in split_randomly(data, seed):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        body = self._read_body()
        path = self.path.split("?", 1)[0]
        headers = {k.lower(): v for k, v in self.headers.items()}
        record = Recorded("POST", path, headers, body)
        self.server.mock._record(headers.get("x-mock-request-id"), record)

        if path not in STREAM_PATHS:
            self._error(404, f"unknown path {path}")
            return
        if not isinstance(record.json, dict) or record.json.get("stream") is not True:
            self._error(400, 'this upstream only streams: the body must have "stream": true')
            return
        name = headers.get("x-mock-fixture")
        if not name:
            self._error(400, "missing x-mock-fixture header")
            return
        try:
            data = self.server.mock._stream_bytes(name)
        except LookupError as e:
            self._error(404, str(e))
            return
        seed_header = headers.get("x-mock-seed")
        seed = int(seed_header) if seed_header else zlib.crc32(name.encode())
        self._send_chunked(data, seed)

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self.server.mock._record(self.headers.get("x-mock-request-id"), Recorded("GET", self.path, {}, b""))
        self._error(404, f"unknown path {self.path}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    mock: "MockUpstream"

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A peer that closes a kept-alive connection (or stops reading a stream) is normal here.
        import sys

        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


def split_randomly(data: bytes, seed: int) -> list[bytes]:
    """Cuts `data` at pseudo-random points: mostly tiny pieces (1-7 bytes), some larger ones."""
    rng = random.Random(seed)
    pieces = []
    i = 0
    while i < len(data):
        size = rng.randint(1, 7) if rng.random() < 0.5 else rng.randint(8, 400)
        pieces.append(data[i : i + size])
        i += size
    return pieces


class MockUpstream:
    """Start with :meth:`start`, stop with :meth:`stop`; ``url`` is ``http://127.0.0.1:PORT``."""

    def __init__(self, fixtures_dir: Path | None = None) -> None:
        self.fixtures_dir = fixtures_dir.resolve() if fixtures_dir else None
        self._inline: dict[str, bytes] = {}
        self._records: dict[str, list[Recorded]] = {}
        self._anonymous: list[Recorded] = []
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> "MockUpstream":
        server = _Server(("127.0.0.1", 0), _Handler)
        server.mock = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- streams ------------------------------------------------------------------------------

    def register(self, name: str, data: bytes) -> str:
        """Registers a synthetic stream; returns the header value that selects it."""
        with self._lock:
            self._inline[name] = data
        return f"inline:{name}"

    def _stream_bytes(self, name: str) -> bytes:
        if name.startswith("inline:"):
            with self._lock:
                try:
                    return self._inline[name[len("inline:") :]]
                except KeyError:
                    raise LookupError(f"no inline stream {name!r}") from None
        if self.fixtures_dir is None:
            raise LookupError(f"no fixtures directory for {name!r}")
        path = (self.fixtures_dir / name).resolve()
        if self.fixtures_dir not in path.parents or not path.is_file():
            raise LookupError(f"no fixture {name!r}")
        return path.read_bytes()

    # --- records ------------------------------------------------------------------------------

    def _record(self, request_id: str | None, record: Recorded) -> None:
        with self._lock:
            if request_id:
                self._records.setdefault(request_id, []).append(record)
            else:
                self._anonymous.append(record)

    def requests_for(self, request_id: str) -> list[Recorded]:
        """Every request received with ``x-mock-request-id: request_id``, oldest first."""
        with self._lock:
            return list(self._records.get(request_id, []))



# --- command line (for suites in other languages, e.g. tests/node) ------------------------------
#
# Additive only: nothing above depends on it, and importing this module (as the Python suite does)
# never runs it.


class _JsonLinesRecordingMock(MockUpstream):
    """A MockUpstream that also appends every request, as one JSON line, to a file."""

    def __init__(self, fixtures_dir: Path | None, records_path: Path) -> None:
        super().__init__(fixtures_dir)
        self._records_file = open(records_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in stop()

    def _record(self, request_id: str | None, record: Recorded) -> None:
        import base64

        super()._record(request_id, record)
        line = json.dumps(
            {
                "request_id": request_id,
                "method": record.method,
                "path": record.path,
                "headers": record.headers,
                "body_base64": base64.b64encode(record.body).decode("ascii"),
                "json": record.json,
            }
        )
        with self._lock:
            # Written and flushed before the response is sent, so a client that has its answer
            # can read the line.
            self._records_file.write(line + "\n")
            self._records_file.flush()

    def stop(self) -> None:
        super().stop()
        with self._lock:
            self._records_file.close()


def main(argv: list[str] | None = None) -> int:
    """Serves until stdin reaches EOF (the parent closed it or died) or SIGTERM/SIGINT.

    Prints one JSON line ``{"url": ..., "port": ...}`` on stdout once listening on 127.0.0.1:0.
    ``--inline-dir``: every regular file in it is registered as ``inline:<file name>``.
    ``--records``: every request is appended there as a JSON line (``request_id``, ``method``,
    ``path``, ``headers``, ``body_base64``, ``json``).
    """
    import argparse
    import signal
    import sys

    parser = argparse.ArgumentParser(description="Mock upstream that replays SSE bodies.")
    parser.add_argument("--fixtures", type=Path, help="fixtures directory (ignored when absent)")
    parser.add_argument("--inline-dir", type=Path, help="files to register as inline:<name>")
    parser.add_argument("--records", type=Path, required=True, help="JSON-lines file for requests")
    args = parser.parse_args(argv)

    fixtures = args.fixtures if args.fixtures is not None and args.fixtures.is_dir() else None
    mock = _JsonLinesRecordingMock(fixtures, args.records)
    if args.inline_dir is not None:
        for path in sorted(args.inline_dir.iterdir()):
            if path.is_file():
                mock.register(path.name, path.read_bytes())

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def wait_for_stdin_eof() -> None:
        try:
            while sys.stdin.buffer.read(4096):
                pass
        finally:
            stop.set()

    mock.start()
    threading.Thread(target=wait_for_stdin_eof, daemon=True).start()
    print(json.dumps({"url": mock.url, "port": mock.port}), flush=True)
    while not stop.wait(0.5):
        pass
    mock.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
