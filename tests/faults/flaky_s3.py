"""A flaky S3: an HTTP proxy on 127.0.0.1 in front of a real S3 server (moto) that injects faults.

For a configurable fraction of requests (seeded, so a run is reproducible) it does one of:

- ``drop``: reads the request and closes the connection without answering (a reset);
- ``lost``: forwards the request (the server applies it) and closes without answering: the response is lost,
  so the client's retry meets the effect of its own first attempt;
- ``500`` / ``503``: answers with S3's ``InternalError`` / ``SlowDown`` XML, without forwarding;
- ``slow``: waits ``slow_s`` seconds, then forwards.

``counts`` says how many of each were injected. Use as a context manager; it stops its server thread on exit.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("drop", "lost", "500", "503", "slow")


class FlakyS3Proxy:
    def __init__(self, upstream: str, rate: float = 0.2, faults: tuple[str, ...] = FAULTS, seed: int = 0,
                 slow_s: float = 0.5):
        self.upstream = urlsplit(upstream)
        self.rate, self.faults, self.slow_s = rate, faults, slow_s
        self.rng = random.Random(seed)
        self.counts: Counter[str] = Counter()
        self.requests = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                fault = proxy._draw()
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault in ("500", "503"):
                    code, name = ("InternalError", "Internal Server Error") if fault == "500" else ("SlowDown", "Slow Down")
                    xml = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>"
                           f"<Message>injected by the flaky proxy</Message></Error>").encode()
                    self.send_response(int(fault), name)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    self.wfile.write(xml)
                    return
                if fault == "slow":
                    time.sleep(proxy.slow_s)
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding",)}
                    if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or body:
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                if fault == "lost":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _draw(self) -> str | None:
        with self._lock:
            self.requests += 1
            if self.rng.random() >= self.rate:
                return None
            fault = self.rng.choice(self.faults)
            self.counts[fault] += 1
            return fault

    @property
    def injected(self) -> int:
        return sum(self.counts.values())

    def __enter__(self) -> "FlakyS3Proxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)
