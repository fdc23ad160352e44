"""Image -> 3D Gaussians with trained models: `flux3d generate`.

    image (RGBA or RGB)  --alpha or matting, recentre (features/photo.py), FLUX encoder-->  cond latents (1, 16, h, w)
    [stage 1] cond latents --structure flow (an SMDiT over the VAE's latent grid) + sampler--> latent (8, 16^3)
      --structure VAE decoder--> occupancy logits (64^3) --> sparse layout (N, 3): the cells with logit > 0
    [stage 2] sparse layout (N, 3) --SMDiT + Euler/CFG sampler-->  per-voxel FLUX latents (N, 16)
      --decoder-->  Gaussians  --> 3DGS .ply  +  a turntable (PNG grid, optional GIF)

The paper's protocol gives the layout (a voxelized ground-truth mesh); here it comes from a voxel file
(`voxels/<sha>.npy`), a feature file (`features/<encoder>/<sha>.npz`) or a shard sample, or from stage 1.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass

import numpy as np
import torch

from flux3d.models.decoder import GaussianDecoder
from flux3d.models.flow_matching import SamplerConfig, sample
from flux3d.models.gaussians import Gaussians
from flux3d.models.rasterizer import rasterize
from flux3d.models.smdit import SMDiT
from flux3d.models.sparse import SparseBatch
from flux3d.models.structure import StructureVAE, from_tokens, grid_tokens, layouts


def read_layout(path: str) -> np.ndarray:
    """uint8 (N, 3) voxel coordinates from a .npy voxel file, a feature .npz, or `shard.tar#<key>` (a sample)."""
    if "#" in path:
        tar_path, key = path.split("#", 1)
        with tarfile.open(tar_path) as tar:
            member = tar.extractfile(f"{key}.coords.npy")
            if member is None:
                raise ValueError(f"{tar_path} has no sample {key!r}")
            coords = np.load(io.BytesIO(member.read()), allow_pickle=False)
    elif path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as f:
            coords = f["coords"]
    elif path.endswith(".npy"):
        coords = np.load(path, allow_pickle=False)
    else:
        raise ValueError(f"{path}: a layout is a .npy voxel file, a features .npz or shard.tar#key")
    if coords.ndim != 2 or coords.shape[1] != 3 or len(coords) == 0:
        raise ValueError(f"{path}: voxel coordinates must be a non-empty (N, 3) array, got {coords.shape}")
    return coords.astype(np.uint8)


def load_image(path: str, resolution: int, background: float = 1.0) -> torch.Tensor:
    """(1, 3, R, R) in [0, 1]: RGBA composited over a uniform background (as the conditioning renders are)."""
    from PIL import Image

    from flux3d.features.vae import over_background

    image = Image.open(path).convert("RGBA").resize((resolution, resolution), Image.Resampling.LANCZOS)
    return torch.from_numpy(over_background(np.asarray(image), background))[None]


@dataclass
class Generated:
    latents: torch.Tensor  # (N, C): FLUX features (16), or an encoder-decoder's latent (8)
    gaussians: Gaussians


@torch.no_grad()
def decode_gaussians(decoder: GaussianDecoder, coords_N3: np.ndarray | torch.Tensor,
                     latents_NC: np.ndarray | torch.Tensor, latent: bool = False) -> Gaussians:
    """One asset's per-voxel latents (not normalised) -> its Gaussians, on the decoder's device: FLUX features, or
    with `latent` an encoder-decoder's own latent (its SMDiT's samples)."""
    dev = next(decoder.parameters()).device
    coords = torch.as_tensor(coords_N3).cpu()  # packing happens on the host, then the batch moves
    batch = SparseBatch.from_list([coords], [torch.as_tensor(latents_NC, dtype=torch.float32).cpu()]).to(dev)
    out = decoder(batch.feats, batch.coords, batch.offsets, latent=latent)
    (gaussians,) = decoder.to_gaussians(out.raw, batch.coords, batch.offsets)
    return gaussians


@torch.no_grad()
def generate(smdit: SMDiT, decoder: GaussianDecoder, cond_latents: torch.Tensor, coords_N3: np.ndarray | torch.Tensor,
             sampler: SamplerConfig, seed: int = 0, latent: bool = False) -> Generated:
    """Latents sampled for one conditioning image on the layout `coords_N3`, and the decoder's Gaussians of them;
    `latent`: the SMDiT diffuses `decoder`'s own latent (`flow.latents`, the Enc-Dec variant)."""
    device = next(smdit.parameters()).device
    batch = SparseBatch.from_list([torch.as_tensor(coords_N3).cpu()], [torch.zeros(len(coords_N3), 1)]).to(device)
    gen = torch.Generator(device).manual_seed(seed)
    latents = sample(smdit, batch.coords, batch.offsets, cond_latents.to(device), sampler, gen)
    return Generated(latents, decode_gaussians(decoder, coords_N3, latents, latent))


@torch.no_grad()
def predict_layout(flow: SMDiT, vae: StructureVAE, cond_latents: torch.Tensor, sampler: SamplerConfig,
                   seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """Stage 1: the sparse layout (N, 3) uint8 predicted for one conditioning image, and the occupancy logits
    (1, 1, R, R, R) it was thresholded from. An empty prediction is an error (nothing to put latents on)."""
    device = next(flow.parameters()).device
    r = vae.cfg.latent_resolution
    coords, offsets = grid_tokens(1, r, device)
    gen = torch.Generator(device).manual_seed(seed)
    z = sample(flow, coords, offsets, cond_latents.to(device), sampler, gen)
    logits = vae.decode(from_tokens(z, 1, r).to(next(vae.parameters()).device))
    (layout,) = layouts(logits)
    if len(layout) == 0:
        raise ValueError("the structure model predicted an empty layout (no cell with occupancy logit > 0)")
    return layout, logits


@torch.no_grad()
def turntable(g: Gaussians, views: int = 8, resolution: int = 256, background: float = 1.0,
              elevation_deg: float = 20.0) -> np.ndarray:
    """uint8 (V, R, R, 3) renders around the asset (the render stage's radius 2 and FoV 40 degrees)."""
    from flux3d.stages.cameras import orbit_cameras

    K, w2c = orbit_cameras(views, 2.0, 40.0, resolution, elevation_deg)
    dev = g.means.device
    out = rasterize(g, torch.from_numpy(w2c).float().to(dev), torch.from_numpy(K).float().to(dev), resolution,
                    resolution, background=torch.full((3,), background, device=dev))
    return (out.rgb.clamp(0, 1) * 255).round().byte().cpu().numpy()


def save_turntable(frames: np.ndarray, path: str) -> None:
    """A PNG grid (one row) or, for a .gif path, an animation."""
    from PIL import Image

    if path.endswith(".gif"):
        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=120, loop=0)
    else:
        Image.fromarray(np.concatenate(list(frames), axis=1)).save(path)
