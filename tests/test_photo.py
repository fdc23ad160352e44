"""flux3d.features.photo: photos framed like the conditioning renders, on synthetic images (no Blender, CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from flux3d.features.photo import FRAME_FILL, KEY_LOW, PhotoError, _plain_alpha, conditioning_image, prepare_photo

H, W = 180, 220
CENTRE = (95.0, 100.0)  # the ellipse's centre (y, x) in photo pixels
SEMI = (40.0, 60.0)  # its semi-axes (y, x): a 120 x 80 px alpha box
PATCH = (250.0, 250.0, 250.0)  # a near-white highlight at the object's centre, closer to white than KEY_LOW
SPECK = (slice(14, 17), slice(200, 203))  # 3 x 3 px of dust on the background, far from the object


def _coverage(inside, ss: int = 4) -> np.ndarray:
    """(H, W) anti-aliased coverage of a region given as a predicate on sub-pixel centres (ss x ss per pixel)."""
    y, x = np.mgrid[0:H * ss, 0:W * ss]
    return inside((y + 0.5) / ss, (x + 0.5) / ss).reshape(H, ss, W, ss).mean(axis=(1, 3))


def _object(transpose: bool = False) -> np.ndarray:
    """(H, W, 4) float straight RGBA in 0-255: a textured, anti-aliased ellipse with a near-white highlight."""
    cy, cx = CENTRE
    cov = _coverage(lambda y, x: ((y - cy) / SEMI[0]) ** 2 + ((x - cx) / SEMI[1]) ** 2 <= 1)
    patch = _coverage(lambda y, x: (y - cy) ** 2 + (x - cx) ** 2 <= 7.0 ** 2)[..., None]
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    texture = np.stack([200 + 30 * np.sin(x / 5), 60 + 20 * np.sin(y / 7), 40 + 15 * np.sin((x + y) / 9)], -1)
    rgba = np.concatenate([patch * np.array(PATCH) + (1 - patch) * texture, 255 * cov[..., None]], -1)
    return rgba.transpose(1, 0, 2) if transpose else rgba


def _photo(background: tuple[float, float, float], speck: bool = True, noise: float = 2.0,
           transpose: bool = False) -> Image.Image:
    """The object composited on a plain background as an 8-bit RGB photo, with sensor noise and a speck of dust."""
    rgba = _object(transpose)
    a = rgba[..., 3:] / 255
    rgb = a * rgba[..., :3] + (1 - a) * np.array(background)
    if speck:
        rgb[SPECK] = 40.0
    rgb += np.random.default_rng(0).normal(0, noise, rgb.shape)
    return Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8))


def _rgba_image(transpose: bool = False) -> Image.Image:
    return Image.fromarray(np.round(_object(transpose)).astype(np.uint8))


def _box(alpha: np.ndarray) -> tuple[float, float, float, float]:
    """(centre y, centre x, height, width) of alpha > 127 in pixel-edge coordinates."""
    ys, xs = np.nonzero(alpha > 127)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    return (y0 + y1) / 2, (x0 + x1) / 2, y1 - y0, x1 - x0


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a > 127) & (b > 127)).sum() / ((a > 127) | (b > 127)).sum())


def test_frame_fill_follows_the_render_camera() -> None:
    # longest side 1 at distance 2 behind a 40-degree FoV: 1 / (4 tan 20deg)
    assert FRAME_FILL == pytest.approx(0.6869, abs=1e-4)


@pytest.mark.parametrize("resolution, fill, transpose", [(128, FRAME_FILL, False), (96, 0.5, True)])
def test_alpha_input_is_recentred_and_rescaled(tmp_path: Path, resolution: int, fill: float, transpose: bool) -> None:
    path = tmp_path / "object.png"
    _rgba_image(transpose).save(path)
    prepared = prepare_photo(path, resolution, fill=fill)
    assert prepared.alpha_source == "alpha" and prepared.background_rgb is None
    assert prepared.rgba.shape == (resolution, resolution, 4) and prepared.rgba.dtype == np.uint8
    cy, cx, h, w = _box(prepared.rgba[..., 3])
    assert cy == pytest.approx(resolution / 2, abs=1) and cx == pytest.approx(resolution / 2, abs=1)
    longer, shorter = (h, w) if transpose else (w, h)  # the ellipse's long axis follows the transpose
    assert longer == pytest.approx(fill * resolution, abs=1.5)
    assert shorter == pytest.approx(fill * resolution * SEMI[0] / SEMI[1], abs=2)
    # colours survive the premultiplied resize: the opaque body keeps the texture's red, not black or grey
    body = prepared.rgba[prepared.rgba[..., 3] == 255]
    assert body[:, 0].mean() > 150 and body[:, 1].mean() < 120
    # edges stay anti-aliased
    assert ((prepared.rgba[..., 3] > 0) & (prepared.rgba[..., 3] < 255)).sum() > 50


def test_plain_white_background_matches_the_alpha_path() -> None:
    assert np.linalg.norm(255 - np.array(PATCH)) < KEY_LOW  # the highlight really is keyed out before hole filling
    reference = prepare_photo(_rgba_image(), 128).rgba
    prepared = prepare_photo(_photo((255, 255, 255)), 128)
    assert prepared.alpha_source == "plain_background"
    assert prepared.background_rgb == pytest.approx((1.0, 1.0, 1.0), abs=0.01)
    alpha = prepared.rgba[..., 3]
    assert _iou(alpha, reference[..., 3]) >= 0.95
    # the near-white highlight at the object's centre (mapped to the frame's centre) is kept, opaque and white
    centre = prepared.rgba[61:67, 61:67]  # the highlight's radius is ~5 px there
    assert (centre[..., 3] == 255).all() and (centre[..., :3] > 235).all()
    # the speck is dropped: one component, and the box (hence scale and centre) is the alpha path's
    assert ndimage.label(alpha > 0, structure=np.ones((3, 3)))[1] == 1
    assert _box(alpha) == pytest.approx(_box(reference[..., 3]), abs=1.5)
    # soft edges survive the key
    assert ((alpha > 0) & (alpha < 255)).sum() > 50


def test_opaque_rgba_is_keyed_like_rgb() -> None:
    prepared = prepare_photo(_photo((255, 255, 255)).convert("RGBA"), 64)
    assert prepared.alpha_source == "plain_background"


def test_coloured_background() -> None:
    background = (70.0, 130.0, 190.0)
    reference = prepare_photo(_rgba_image(), 128)
    prepared = prepare_photo(_photo(background), 128)
    assert prepared.alpha_source == "plain_background"
    assert prepared.background_rgb == pytest.approx(tuple(v / 255 for v in background), abs=0.01)
    assert _iou(prepared.rgba[..., 3], reference.rgba[..., 3]) >= 0.95
    # over a white background the edges look like the true object's, not dark or tinted by the photo's blue
    edge = ndimage.binary_dilation((reference.rgba[..., 3] > 0) & (reference.rgba[..., 3] < 255), iterations=1)
    got, want = conditioning_image(prepared)[0], conditioning_image(reference)[0]
    assert float((got - want).abs()[:, torch.from_numpy(edge)].mean()) < 0.06
    assert float((got[2] - want[2])[torch.from_numpy(edge)].mean()) < 0.03  # no blue fringe


def test_edge_colours_are_unmixed_from_the_background() -> None:
    # a*fg + (1-a)*bg reproduces the photo at fractional alpha, so a composite over a new background swaps the
    # photo's background out instead of leaving it (a*(1-a)*bg) in the edges; kept as is, the error is ~6/255 here
    rgb = np.asarray(_photo((70, 130, 190))).astype(np.float32)
    alpha, fg, background = _plain_alpha(rgb)
    soft = (alpha > 0) & (alpha < 1)
    assert soft.sum() > 30
    a = alpha[..., None]
    assert float(np.abs(a * fg + (1 - a) * background - rgb)[soft].mean()) < 1.5  # 0-255 units, clipping aside


def test_textured_background_is_refused() -> None:
    rgba = _object()
    a = rgba[..., 3:] / 255
    clutter = np.random.default_rng(1).integers(0, 256, (H, W, 3))
    photo = Image.fromarray(np.round(a * rgba[..., :3] + (1 - a) * clutter).astype(np.uint8))
    with pytest.raises(PhotoError, match="not plain"):
        prepare_photo(photo, 64)


def test_blank_images_have_no_object(tmp_path: Path) -> None:
    with pytest.raises(PhotoError, match="no object"):
        prepare_photo(Image.new("RGB", (160, 120), (255, 255, 255)), 64)
    with pytest.raises(PhotoError, match="no object"):  # an alpha channel that is transparent everywhere
        prepare_photo(Image.new("RGBA", (160, 120), (200, 0, 0, 0)), 64)


def test_unreadable_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    with pytest.raises(PhotoError, match="broken.png"):
        prepare_photo(broken, 64)
    with pytest.raises(PhotoError, match="absent.png"):
        prepare_photo(tmp_path / "absent.png", 64)


class _RedMask(torch.nn.Module):
    """A stand-in matting model: alpha 1 on strongly red pixels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x[:, 0:1] > 0.6) & (x[:, 1:2] < 0.4)).float()


class _WrongShape(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _two_objects() -> Image.Image:
    """A small red square and a larger blue bar on white: the key keeps the bar, the red mask the square."""
    rgb = np.full((160, 200, 3), 255, np.uint8)
    rgb[30:70, 30:70] = (220, 30, 30)
    rgb[100:130, 80:170] = (30, 40, 220)
    return Image.fromarray(rgb)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_matting_model(tmp_path: Path) -> None:
    path = tmp_path / "red.pt"
    torch.jit.script(_RedMask()).save(str(path))
    prepared = prepare_photo(_two_objects(), 100, matting=str(path))
    assert prepared.alpha_source == "matting_model" and prepared.background_rgb is None
    cy, cx, h, w = _box(prepared.rgba[..., 3])
    assert h == pytest.approx(FRAME_FILL * 100, abs=1.5) and w == pytest.approx(FRAME_FILL * 100, abs=1.5)
    body = prepared.rgba[prepared.rgba[..., 3] == 255]
    assert body[:, 0].mean() > 200 and body[:, 2].mean() < 60
    # without the model the plain key finds the larger blue bar instead (3:1)
    keyed = prepare_photo(_two_objects(), 100)
    _, _, kh, kw = _box(keyed.rgba[..., 3])
    assert kw / kh == pytest.approx(3, rel=0.1)
    assert keyed.rgba[keyed.rgba[..., 3] == 255][:, 2].mean() > 200


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_matting_model_errors(tmp_path: Path) -> None:
    with pytest.raises(PhotoError, match="missing.pt"):
        prepare_photo(_two_objects(), 64, matting=str(tmp_path / "missing.pt"))
    path = tmp_path / "wrong.pt"
    torch.jit.script(_WrongShape()).save(str(path))
    with pytest.raises(PhotoError, match="expected"):
        prepare_photo(_two_objects(), 64, matting=str(path))


def test_conditioning_image() -> None:
    prepared = prepare_photo(_rgba_image(), 64)
    image = conditioning_image(prepared, background=0.5)
    assert image.shape == (1, 3, 64, 64) and image.dtype == torch.float32
    assert float(image.min()) >= 0 and float(image.max()) <= 1
    alpha = torch.from_numpy(prepared.rgba[..., 3])
    assert (image[0][:, alpha == 0] == 0.5).all()
    opaque = torch.from_numpy(prepared.rgba[..., :3][prepared.rgba[..., 3] == 255]).T.float() / 255
    assert torch.allclose(image[0][:, alpha == 255], opaque)
    assert not torch.allclose(image[0][:, alpha == 255], torch.full_like(opaque, 0.5))
