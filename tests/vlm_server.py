"""A local stand-in for a VLM server speaking the OpenAI chat-completions protocol (what vLLM, SGLang, TGI and
Ollama serve), on real loopback sockets.

It decodes the image the client sends and answers like a careful judge would: `yes: ...` when a visible share of
the grid is missing-texture magenta, else `no: ...`. A script of behaviours is consumed one per request first:
    "503", "429", "400"     reply with that status
    "slow"                  answer after `slow_s` seconds (longer than the client's read timeout)
    "garbage"               a 200 chat completion whose text does not follow the answer format
    "not_json"              a 200 whose body is not JSON
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

from flux3d.stages.render_layout import magenta_mask
from tests.http_server import serving


def judge_image(jpeg: bytes) -> str:
    rgb = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float32) / 255
    share = magenta_mask(rgb).mean()
    return f"yes: {share:.0%} of the image is magenta" if share > 0.02 else "no: the surfaces carry textures"


class _Handler(BaseHTTPRequestHandler):
    server: "VLMServer"

    def log_message(self, *args: object) -> None:
        pass

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
            action = self.server.script.pop(0) if self.server.script else "ok"
        if self.path != "/v1/chat/completions":
            self._reply(404, b'{"error": "not found"}')
            return
        if action.isdigit():
            self._reply(int(action), json.dumps({"error": {"message": f"scripted {action}"}}).encode())
            return
        if action == "not_json":
            self._reply(200, b"<html>proxy error</html>")
            return
        if action == "slow":
            time.sleep(self.server.slow_s)
        url = body["messages"][0]["content"][1]["image_url"]["url"]
        text = "I think it might be fine?" if action == "garbage" else judge_image(
            base64.b64decode(url.split(",", 1)[1]))
        self._reply(200, json.dumps({"id": "cmpl-1", "object": "chat.completion", "model": body["model"],
                                     "choices": [{"index": 0, "finish_reason": "stop",
                                                  "message": {"role": "assistant", "content": text}}]}).encode())


class VLMServer(ThreadingHTTPServer):
    daemon_threads = True
    script: list[str]
    requests: list[dict]
    slow_s: float = 2.0
    url: str


@contextmanager
def serve_vlm(script: list[str] | None = None) -> Iterator[VLMServer]:
    """Serve on 127.0.0.1 at a free port; `server.url` is the API base (ends in /v1)."""
    server = VLMServer(("127.0.0.1", 0), _Handler)
    server.script, server.requests, server.lock = list(script or []), [], threading.Lock()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    with serving(server):
        yield server
