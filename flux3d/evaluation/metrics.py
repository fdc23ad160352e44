"""Image metrics of the paper's Tables 2, 3 and 12: PSNR, SSIM, LPIPS, CLIP score, FD and KD.

Per-image metrics return one value per image, (B,), so a protocol can average per asset first and then over
assets. Images are float (B, 3, H, W) in [0, 1] (values outside raise: renders must be clamped by the caller,
because clamping here would hide a renderer bug). Everything runs where the inputs (and networks) are.

    psnr        10 log10(data_range^2 / MSE) per image; identical images give +inf (no cap: a cap is an arbitrary
                number that would then be averaged as if it were a measurement)
    ssim        11 x 11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03 (the 3DGS / TRELLIS settings), torchmetrics'
                implementation: the SSIM map of the reflect-padded image, averaged over all H x W pixels. 3DGS's
                own `ssim` zero-pads instead, which differs within 5 px of the border; on renders whose border is
                uniform background the two agree closely, but they are not bit-identical (skimage, which crops
                the border, differs again).
    lpips       the LPIPS-VGG module from `flux3d.training.perceptual.load_lpips_vgg`
    clip_score  100 x cosine between the CLIP image embeddings of each render and its reference (the input
                image), NOT clamped at 0 (torchmetrics' text-image CLIPScore clamps; for image pairs the cosine of
                CLIP embeddings is essentially always positive, and clamping would bias a mean when it is not)
    FD          Frechet distance between Gaussians fitted to two feature sets: float64 mean / covariance,
                scipy.linalg.sqrtm, real part (pytorch-fid, dgm-eval, EDM2)
    KD          kernel distance: unbiased MMD^2 with the polynomial kernel (x.y / d + 1)^3, averaged over random
                subsets (Binkowski et al.; torchmetrics' `poly_mmd`). Returned raw; the paper's "KD(%)" is x 100.

FD and KD take features collected by `FeatureStats` (one per image set and extractor, so the ground-truth set is
extracted once and compared with every method) or plain (N, F) tensors. The extractor runs once per image for
both metrics, which is why they are computed from stored features rather than through torchmetrics'
FrechetInceptionDistance / KernelInceptionDistance objects (each would run the network again; the tests check
that the numbers agree with them).

Sample size: FD estimates a covariance of F x F from N samples and is biased upwards, by roughly tr(cov) / N
per set; the paper's numbers come from ~1,000 assets x several views, and values over a few dozen images are only
comparable with others over the same N. KD is unbiased but noisy for small subsets (and can be slightly negative).

Shape suffixes: B images, R reference images, H x W pixels, E embedding width, N / M feature vectors of the two
sets, F feature width, S subsets.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _check_images(pred_B3HW: Tensor, target_B3HW: Tensor, what: str, data_range: float = 1.0) -> None:
    if pred_B3HW.ndim != 4 or pred_B3HW.shape[1] != 3 or pred_B3HW.shape != target_B3HW.shape:
        raise ValueError(f"{what} wants two float (B, 3, H, W) batches of the same shape, got "
                         f"{tuple(pred_B3HW.shape)} and {tuple(target_B3HW.shape)}")
    _check_range(pred_B3HW, what, data_range)
    _check_range(target_B3HW, what, data_range)


def _check_range(images: Tensor, what: str, data_range: float = 1.0) -> None:
    if not images.is_floating_point():
        raise ValueError(f"{what} wants float images in [0, {data_range:g}], got {images.dtype}")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0 or hi > data_range:
        raise ValueError(f"{what} wants images in [0, {data_range:g}], got values in [{lo:.4g}, {hi:.4g}] "
                         f"(clamp renders before evaluating)")


def psnr(pred_B3HW: Tensor, target_B3HW: Tensor, data_range: float = 1.0) -> Tensor:
    """Per-image PSNR in dB, (B,); +inf where an image equals its target."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    _check_images(pred_B3HW, target_B3HW, "psnr", data_range)
    return peak_signal_noise_ratio(pred_B3HW, target_B3HW, data_range=data_range, reduction="none", dim=(1, 2, 3))


def ssim(pred_B3HW: Tensor, target_B3HW: Tensor) -> Tensor:
    """Per-image SSIM, (B,): Gaussian 11 x 11 window, sigma 1.5, data range 1 (see the module docstring)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_images(pred_B3HW, target_B3HW, "ssim")
    return structural_similarity_index_measure(pred_B3HW, target_B3HW, gaussian_kernel=True, sigma=1.5,
                                               kernel_size=11, data_range=1.0, k1=0.01, k2=0.03, reduction="none")


def lpips(pred_B3HW: Tensor, target_B3HW: Tensor, net: nn.Module) -> Tensor:
    """Per-image LPIPS, (B,), with `net` from `flux3d.training.perceptual.load_lpips_vgg` (on the inputs' device)."""
    _check_images(pred_B3HW, target_B3HW, "lpips")
    return net(pred_B3HW, target_B3HW)


def clip_score(images_B3HW: Tensor, references_R3HW: Tensor, encoder: nn.Module) -> Tensor:
    """100 x cosine between CLIP embeddings of each image and its reference, (B,), in [-100, 100], unclamped.

    `references` holds one image per image (R = B) or a single one for all (R = 1: the views of one asset against
    its input image). `encoder` maps images to embeddings (B, E), e.g. `extractors.clip_image_encoder`; they are
    L2-normalised here as well, so any embedding network works.
    """
    if images_B3HW.ndim != 4 or images_B3HW.shape[1] != 3:
        raise ValueError(f"clip_score wants images (B, 3, H, W), got {tuple(images_B3HW.shape)}")
    if references_R3HW.ndim != 4 or references_R3HW.shape[1] != 3 or \
            references_R3HW.shape[0] not in (1, images_B3HW.shape[0]):
        raise ValueError(f"clip_score wants references (1 or {images_B3HW.shape[0]}, 3, H, W), got "
                         f"{tuple(references_R3HW.shape)}")
    _check_range(images_B3HW, "clip_score")
    _check_range(references_R3HW, "clip_score")
    emb_BE = F.normalize(encoder(images_B3HW).float(), dim=-1)
    ref_RE = F.normalize(encoder(references_R3HW).float(), dim=-1)
    return 100.0 * (emb_BE * ref_RE).sum(-1)


class FeatureStats:
    """The features of one image set under one extractor, kept as float64 on the CPU (N x F: 4,000 views x 2048
    is 65 MB), from which FD and KD are computed against another set."""

    def __init__(self, extractor: nn.Module, *, batch_size: int = 64) -> None:
        """`extractor`: any module mapping (B, 3, H, W) images in [0, 1] to (B, F), e.g. `extractors.build_extractor`;
        images are moved to its device."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.extractor, self.batch_size = extractor, batch_size
        self._chunks: list[Tensor] = []

    @property
    def device(self) -> torch.device | None:
        tensor = next(iter(self.extractor.parameters()), None)
        tensor = tensor if tensor is not None else next(iter(self.extractor.buffers()), None)
        return None if tensor is None else tensor.device

    @torch.inference_mode()
    def update(self, images_B3HW: Tensor) -> None:
        """Extract and keep the features of a batch of images (split into `batch_size` chunks)."""
        if images_B3HW.ndim != 4 or images_B3HW.shape[1] != 3:
            raise ValueError(f"FeatureStats.update wants images (B, 3, H, W), got {tuple(images_B3HW.shape)}")
        _check_range(images_B3HW, "FeatureStats.update")
        device = self.device
        for start in range(0, images_B3HW.shape[0], self.batch_size):
            chunk = images_B3HW[start:start + self.batch_size]
            feats_BF = self.extractor(chunk if device is None else chunk.to(device))
            if feats_BF.ndim != 2 or feats_BF.shape[0] != chunk.shape[0]:
                raise ValueError(f"extractor returned {tuple(feats_BF.shape)} for {chunk.shape[0]} images; "
                                 f"it must return (B, F)")
            self._chunks.append(feats_BF.detach().to("cpu", torch.float64))

    @property
    def features(self) -> Tensor:
        """(N, F) float64 on the CPU."""
        if not self._chunks:
            raise ValueError("no images were added to this FeatureStats")
        if len(self._chunks) > 1:
            self._chunks = [torch.cat(self._chunks)]
        return self._chunks[0]

    @property
    def num_samples(self) -> int:
        return sum(c.shape[0] for c in self._chunks)


def _pair(a: FeatureStats | Tensor, b: FeatureStats | Tensor, what: str) -> tuple[Tensor, Tensor]:
    x_NF, y_MF = (s.features if isinstance(s, FeatureStats) else s.detach().cpu().double() for s in (a, b))
    if x_NF.ndim != 2 or y_MF.ndim != 2 or x_NF.shape[1] != y_MF.shape[1]:
        raise ValueError(f"{what} wants two (N, F) feature sets of the same F, got {tuple(x_NF.shape)} and "
                         f"{tuple(y_MF.shape)}")
    if min(x_NF.shape[0], y_MF.shape[0]) < 2:
        raise ValueError(f"{what} needs at least 2 samples per set, got {x_NF.shape[0]} and {y_MF.shape[0]}")
    return x_NF, y_MF


def fd_caveat(num_samples: int, num_features: int, name: str) -> str | None:
    """Why FD/KD over this many samples is not comparable, or None. FD estimates two F x F covariances: with no more
    samples than features they are rank-deficient, and the value depends on the sample count more than on the
    models (the paper's numbers come from thousands of views)."""
    if num_samples > num_features:
        return None
    return (f"FD/KD {name}: {num_samples} samples of {num_features}-dimensional features; the covariances are "
            f"rank-deficient (more than {num_features} samples are needed), so these values compare only with "
            "runs over the same number of samples.")


def frechet_distance(a: FeatureStats | Tensor, b: FeatureStats | Tensor) -> float:
    """FD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) in float64 (unbiased covariances)."""
    import scipy.linalg

    x_NF, y_MF = (t.numpy() for t in _pair(a, b, "frechet_distance"))
    mu_x, mu_y = x_NF.mean(0), y_MF.mean(0)
    cov_x, cov_y = np.atleast_2d(np.cov(x_NF, rowvar=False)), np.atleast_2d(np.cov(y_MF, rowvar=False))
    with warnings.catch_warnings():
        # Fewer samples than features make the product singular; sqrtm then warns on every call. That is a
        # property of the sample count, which the evaluation report states (`fd_caveat`); a non-finite root is
        # still refused below.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(cov_x @ cov_y)
    if not np.isfinite(covmean).all():
        raise ValueError("frechet_distance: the covariance product has no finite square root (far fewer samples "
                         "than feature dimensions?)")
    # The product of two PSD matrices has a real square root; imaginary parts are round-off (pytorch-fid, EDM2).
    covmean = covmean.real
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(cov_x) + np.trace(cov_y) - 2 * np.trace(covmean))


@dataclass(frozen=True, slots=True)
class KernelDistance:
    mean: float
    """Mean of the per-subset unbiased MMD^2 (raw; x 100 for the paper's KD(%))."""
    std: float
    """Standard deviation over the subsets (population std, as torchmetrics)."""


def kernel_distance(a: FeatureStats | Tensor, b: FeatureStats | Tensor, *, subsets: int = 100,
                    subset_size: int = 1000, degree: int = 3, seed: int = 0,
                    device: torch.device | str = "cpu") -> KernelDistance:
    """KD: unbiased MMD^2 with the kernel (x.y / F + 1)^degree, over `subsets` random subsets of `subset_size`
    samples drawn without replacement from each set (seeded: the same inputs give the same number).

    `subset_size` must not exceed either set (torchmetrics' and the original KID's rule). Computed in float64 on
    `device` (a GPU makes the 100 kernel matrices of 1,000 x 2048 features cheap).
    """
    from torchmetrics.image.kid import poly_mmd

    x_NF, y_MF = _pair(a, b, "kernel_distance")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    if not 2 <= subset_size <= min(x_NF.shape[0], y_MF.shape[0]):
        raise ValueError(f"subset_size must be in [2, {min(x_NF.shape[0], y_MF.shape[0])}] (the smaller set), "
                         f"got {subset_size}")
    x_NF, y_MF = x_NF.to(device), y_MF.to(device)
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        x_idx = torch.randperm(x_NF.shape[0], generator=gen)[:subset_size].to(device)
        y_idx = torch.randperm(y_MF.shape[0], generator=gen)[:subset_size].to(device)
        values.append(poly_mmd(x_NF[x_idx], y_MF[y_idx], degree=degree))
    values_S = torch.stack(values)
    return KernelDistance(mean=float(values_S.mean()), std=float(values_S.std(unbiased=False)))


def layout_iou(pred_N3: np.ndarray, true_M3: np.ndarray) -> float:
    """|P & T| / |P | T| of two sparse layouts (sets of integer voxel coordinates)."""
    p, t = ({tuple(c) for c in np.asarray(x, np.int64).tolist()} for x in (pred_N3, true_M3))
    return len(p & t) / max(len(p | t), 1)


def chamfer_distance(pred_N3: np.ndarray, true_M3: np.ndarray, resolution: int) -> float:
    """Symmetric Chamfer distance between the voxel centres of two layouts in the assets' unit cube: the mean
    nearest-neighbour distance from each set to the other, averaged over both directions (L2, not squared; one
    voxel is 1 / resolution)."""
    from scipy.spatial import cKDTree

    p, t = (np.asarray(x, np.float64) / resolution for x in (pred_N3, true_M3))
    if not len(p) or not len(t):
        return float("inf")
    return 0.5 * float(cKDTree(t).query(p)[0].mean() + cKDTree(p).query(t)[0].mean())
