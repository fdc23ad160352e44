"""The VLM judge: asks a vision-language model behind an OpenAI-compatible chat-completions endpoint (vLLM,
SGLang, TGI, Ollama all serve one) whether an asset's textures are missing, from a grid of its curation views.

The prompt is fixed and versioned (`PROMPT_VERSION` goes into the curate stage's params and every verdict), so
a verdict can be traced to the exact question asked. Answers are parsed strictly: one line, `yes: <reason>` or
`no: <reason>`. Anything else is re-asked `vlm.parse_attempts` times, then the asset is `failed:vlm_unparseable`.
Transport trouble (timeouts, refused connections, 429, 5xx) is retried with exponential backoff up to
`vlm.max_attempts`; a 4xx other than 429 is a configuration error and is not retried.

Failure reasons: vlm_timeout, vlm_unreachable, vlm_http_<status>, vlm_unparseable, vlm_bad_response.
"""

from __future__ import annotations

import base64
import io
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from flux3d.config.pipeline import VLMConfig
from flux3d.curation.aesthetic import composite

PROMPT_VERSION = "texture-v1"
PROMPT = (
    "The image shows several rendered views of one 3D model on a plain background. When a 3D model's texture "
    "files are missing, the renderer paints the affected surfaces bright pink/magenta, or plain white or grey "
    "with no surface detail. Are this model's textures missing? Answer with exactly one line: 'yes: <short "
    "reason>' if textures are missing or the surfaces look untextured, or 'no: <short reason>' if the model "
    "looks properly textured or coloured."
)
_ANSWER = re.compile(r"^\s*(yes|no)\s*[:.,\-\u2013\u2014]\s*(\S.{0,300}?)\s*$", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True, slots=True)
class Verdict:
    missing: bool
    reason: str


class VLMError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


def parse_answer(text: str) -> Verdict:
    """`yes: reason` / `no: reason` (case-insensitive, one line; a trailing period is fine); ValueError otherwise."""
    text = text.strip().strip("`").strip()
    if "\n" in text:
        raise ValueError(f"expected one line, got {text[:200]!r}")
    m = _ANSWER.match(text)
    if m is None:
        raise ValueError(f"expected 'yes: <reason>' or 'no: <reason>', got {text[:200]!r}")
    return Verdict(m.group(1).lower() == "yes", m.group(2).rstrip("."))


def view_grid(views: list[np.ndarray], tile: int, background: str) -> bytes:
    """JPEG bytes of the views (RGBA arrays) flattened onto `background`, tiled in rows of up to 3."""
    from PIL import Image

    cols = min(3, len(views))
    rows = -(-len(views) // cols)
    grid = Image.new("RGB", (cols * tile, rows * tile))
    for i, rgba in enumerate(views):
        im = composite(Image.fromarray(rgba, "RGBA"), background).resize((tile, tile), Image.LANCZOS)
        grid.paste(im, ((i % cols) * tile, (i // cols) * tile))
    buf = io.BytesIO()
    grid.save(buf, "JPEG", quality=90)
    return buf.getvalue()


class VLMJudge:
    """One client per worker; thread-safe (a requests session per thread)."""

    def __init__(self, cfg: VLMConfig, sleep: Any = time.sleep) -> None:
        if not cfg.endpoint:
            raise ValueError("vlm.endpoint is not set")
        self.cfg = cfg
        self.url = cfg.endpoint.rstrip("/") + "/chat/completions"
        self._local = threading.local()
        self._sleep = sleep

    def _session(self) -> Any:
        import requests

        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
            key = os.environ.get(self.cfg.api_key_env)
            if key:
                self._local.session.headers["Authorization"] = f"Bearer {key}"
        return self._local.session

    def _body(self, image_jpeg: bytes) -> dict[str, Any]:
        url = "data:image/jpeg;base64," + base64.b64encode(image_jpeg).decode("ascii")
        return {"model": self.cfg.model, "temperature": 0.0, "max_tokens": self.cfg.max_tokens,
                "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT},
                                                          {"type": "image_url", "image_url": {"url": url}}]}]}

    def _complete(self, body: dict[str, Any]) -> str:
        """One chat completion's text, retrying transport failures; raises VLMError when they persist."""
        import requests

        cfg = self.cfg
        last = VLMError("vlm_unreachable", "no attempt made")
        for attempt in range(cfg.max_attempts):
            if attempt:
                self._sleep(cfg.backoff_s * 2 ** (attempt - 1))
            try:
                r = self._session().post(self.url, json=body, timeout=(cfg.connect_timeout_s, cfg.timeout_s))
            except requests.Timeout as e:
                last = VLMError("vlm_timeout", f"{self.url}: {type(e).__name__} after {cfg.timeout_s} s")
                continue
            except requests.ConnectionError as e:
                last = VLMError("vlm_unreachable", f"{self.url}: {e}")
                continue
            if r.status_code == 429 or r.status_code >= 500:
                last = VLMError(f"vlm_http_{r.status_code}", f"{self.url}: HTTP {r.status_code} {r.text[:300]}")
                continue
            if r.status_code != 200:
                raise VLMError(f"vlm_http_{r.status_code}", f"{self.url}: HTTP {r.status_code} {r.text[:300]}")
            try:
                return r.json()["choices"][0]["message"]["content"] or ""
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise VLMError("vlm_bad_response", f"not a chat completion: {r.text[:300]!r} ({e})") from None
        raise last

    def judge(self, image_jpeg: bytes) -> Verdict:
        """The verdict on one grid image; raises VLMError (reason as in the module docstring)."""
        body = self._body(image_jpeg)
        answers = []
        for _ in range(self.cfg.parse_attempts):
            text = self._complete(body)
            try:
                return parse_answer(text)
            except ValueError:
                answers.append(text[:200])
        raise VLMError("vlm_unparseable", f"{len(answers)} answer(s) did not parse: {answers}")
