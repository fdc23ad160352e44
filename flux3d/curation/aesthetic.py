"""Aesthetic score: OpenAI CLIP ViT-L/14 image embeddings (open_clip), L2-normalised, through the LAION
improved-aesthetic-predictor head (christophschuhmann/improved-aesthetic-predictor, Apache-2.0).

The head is the upstream MLP (768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropout, its ReLUs commented out upstream),
so in eval mode it is one affine map of the unit embedding; `tests/test_curation.py` checks that against the real
weights. A scorer is built once per worker (`AestheticScorer.load`) and scores batches of PIL images.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from flux3d.config.pipeline import CurateConfig

BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "grey": (128, 128, 128)}


def head_module() -> Any:
    """The upstream MLP, layer for layer, so the state dict's keys (layers.0 ... layers.7) load unchanged."""
    from torch import nn

    class AestheticHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.Sequential(
                nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

        def forward(self, x: Any) -> Any:
            return self.layers(x)

    return AestheticHead()


def fetch_weights(location: str) -> str:
    """A local path for `location`: itself if it is a file, else an http(s) download cached by URL hash."""
    if os.path.isfile(location):
        return location
    if not location.startswith(("http://", "https://")):
        raise ValueError(f"weights file {location!r} does not exist (and is not an http(s) URL)")
    cache = Path(os.environ.get("FLUX3D_WEIGHTS_CACHE", Path.home() / ".cache" / "flux3d"))
    target = cache / f"{hashlib.sha256(location.encode()).hexdigest()[:16]}-{location.rsplit('/', 1)[-1]}"
    if not target.is_file():
        import requests

        cache.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".tmp-{os.getpid()}-{target.name}")
        with requests.get(location, stream=True, timeout=(10, 120)) as r:
            r.raise_for_status()
            with open(tmp, "wb") as f:
                for chunk in r.iter_content(1 << 20):
                    f.write(chunk)
        os.replace(tmp, target)
    return str(target)


def load_head(location: str) -> Any:
    import torch

    head = head_module()
    # The upstream file was saved from cuda:0; weights_only keeps an untrusted pickle from running code.
    state = torch.load(fetch_weights(location), map_location="cpu", weights_only=True)
    head.load_state_dict(state)
    return head.eval()


def composite(rgba: Any, background: str) -> Any:
    """An RGBA PIL image flattened onto the configured background colour (renders have transparent film)."""
    from PIL import Image

    base = Image.new("RGB", rgba.size, BACKGROUNDS[background])
    base.paste(rgba, mask=rgba.getchannel("A") if rgba.mode == "RGBA" else None)
    return base


class AestheticScorer:
    """open_clip image tower + LAION head; `score(images)` -> one score per image (AVA-style, roughly 1-10)."""

    def __init__(self, model: Any, preprocess: Any, head: Any, device: str, background: str, batch_size: int,
                 name: str) -> None:
        self.model, self.preprocess, self.head = model, preprocess, head
        self.device, self.background, self.batch_size, self.name = device, background, batch_size, name

    @classmethod
    def load(cls, cfg: CurateConfig) -> AestheticScorer:
        import open_clip
        import torch

        if cfg.clip_model_config:
            open_clip.add_model_config(cfg.clip_model_config)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        pretrained = cfg.clip_pretrained or None
        model, _, preprocess = open_clip.create_model_and_transforms(
            cfg.clip_model, pretrained=pretrained, device=device,
            precision="fp16" if device == "cuda" else "fp32")
        model.eval()
        head = load_head(cfg.aesthetic_head).to(device)
        name = f"{cfg.clip_model}/{os.path.basename(cfg.clip_pretrained) or 'random'}"
        return cls(model, preprocess, head, device, cfg.background, cfg.batch_size, name)

    def embed(self, images: list[Any]) -> np.ndarray:
        """Unit-norm CLIP image embeddings (N, D) of RGBA or RGB PIL images, float32."""
        import torch

        out = []
        # The precision `load` asked for: open_clip's fp16 keeps embeddings and norms in fp32, so the first
        # parameter's dtype is fp32 while the patch convolution's is fp16 (the input must match the latter).
        dtype = torch.float16 if str(self.device).startswith("cuda") else torch.float32
        with torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                batch = torch.stack([self.preprocess(composite(im, self.background))
                                     for im in images[i:i + self.batch_size]])
                emb = self.model.encode_image(batch.to(self.device, dtype)).float()
                out.append(torch.nn.functional.normalize(emb, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.empty((0, 768), np.float32)

    def head_scores(self, unit_embeddings: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(unit_embeddings, dtype=np.float32)).to(self.device)
            return self.head(x).squeeze(-1).float().cpu().numpy()

    def score(self, images: list[Any]) -> np.ndarray:
        return self.head_scores(self.embed(images))
