"""A real HTTP server on loopback for download tests: real sockets, Range requests, scripted failures.

Each path serves a body; an optional script of behaviours is consumed one per request, then the plain body:
    "503", "429", "404", ...   reply with that status
    "cut"                      promise the whole body, send half, close the connection
    "stall"                    send headers, then nothing for longer than the client's read timeout
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Route:
    body: bytes
    script: list[str] = field(default_factory=list)
    support_range: bool = True


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.requests.append((self.path, dict(self.headers)))
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404)
            return
        action = route.script.pop(0) if route.script else "ok"
        if action.isdigit():
            self.send_response(int(action))
            if action == "429":
                self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body, start = route.body, 0
        rng = self.headers.get("Range")
        if rng and route.support_range and action == "ok":
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if action == "cut":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if action == "stall":
            time.sleep(self.server.stall_s)
            return
        self.wfile.write(body[start:])


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    routes: dict[str, Route]
    requests: list[tuple[str, dict[str, str]]]
    stall_s: float = 3.0


@contextmanager
def serve(routes: dict[str, Route]) -> Iterator[_Server]:
    """Serve `routes` on 127.0.0.1 at a free port; `server.url` is the base URL."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.routes = routes
    server.requests = []
    server.url = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    with serving(server):
        yield server


@contextmanager
def serving(server: ThreadingHTTPServer) -> Iterator[None]:
    """Run `server` on a daemon thread for the block; shut it down and free the port after."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
