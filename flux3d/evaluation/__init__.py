"""Evaluation: `metrics` (PSNR, SSIM, LPIPS, CLIP score, FD, KD) and `extractors` (the feature networks behind
FD, KD and the CLIP score, each loaded from a local weights file, never from a hub).

Import the submodules directly; this package imports nothing so that importing it stays free of torch.
"""
