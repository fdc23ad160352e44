"""Packed vs padded attention on a batch of skewed voxel counts: time per forward + backward and padding waste.

    python benchmarks/attention.py [--batch 8] [--min-len 2000] [--max-len 30000] [--heads 12] [--head-dim 64]
                                   [--device cpu|cuda] [--dtype float32|bfloat16|float16] [--reps 3]
                                   [--backends nested,bucketed,padded] [--window 0] [--threads 0] [--quick]

Lengths: `--batch` sequences drawn log-uniform in [--min-len, --max-len] (seeded), then the extremes forced in, so
the batch is as skewed as the spec's 2K..30K voxels per asset. Every backend gets the same (T, H, D) inputs;
the figure is the median over `--reps` timed forward + backward passes after one warm-up, with the CUDA clock
synchronised around each pass and the peak allocated memory of the pass. "max |err|" is the largest
difference from the padded reference's output, a check that the timed paths compute the same thing.

Padding waste: the share of the padded (B, L_max) token grid that is padding, and the share of the padded
B * L_max^2 attention pairs (what dense SDPA computes) outside the sequences' own sum of L_i^2.
`--window W > 0` times window attention instead: every sequence is a random voxel set filling a cube of its
size at 30% occupancy, cut into W^3 windows (the decoder's swin attention), over the same backends.

On a CPU whose cores other processes also use, every OpenMP parallel region waits for a busy core, which adds
milliseconds to each op and penalises the paths with more, smaller ops ("bucketed" over many windows): pass
`--threads 1` there for figures that reflect the kernels rather than the contention.

`--quick` is a CPU run of about a minute: torch's jagged SDPA on CPU (the "nested" backend) pads internally and
is the slow one, so the quick configuration shrinks the lengths to 128..1536.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from flux3d.models.attention import (
    flash_attn_available,
    varlen_attention,
    varlen_attn_available,
    window_partition,
    windowed_attention,
)

QUICK = {"batch": 6, "min_len": 128, "max_len": 1536, "reps": 2}


def skewed_lengths(batch: int, low: int, high: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    logs = torch.empty(batch, dtype=torch.float64).uniform_(math.log(low), math.log(high), generator=g)
    lengths = logs.exp().round().long().tolist()
    lengths[0], lengths[-1] = high, low
    return lengths


def voxel_coords(lengths: list[int], occupancy: float = 0.3, seed: int = 0) -> torch.Tensor:
    """Per sequence, `length` distinct random voxels in the cube that holds them at `occupancy`."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for b, n in enumerate(lengths):
        side = math.ceil((n / occupancy) ** (1 / 3))
        flat = torch.randperm(side**3, generator=g)[:n]
        xyz = torch.stack([flat // side**2, flat // side % side, flat % side], dim=1)
        parts.append(torch.cat([torch.full((n, 1), b), xyz], dim=1))
    return torch.cat(parts).to(torch.int32)


def padding_waste(lengths: list[int]) -> tuple[float, float]:
    grid = len(lengths) * max(lengths)
    return 1 - sum(lengths) / grid, 1 - sum(n * n for n in lengths) / (grid * max(lengths))


def time_pass(fn, inputs: list[torch.Tensor], device: str) -> tuple[float, float]:
    """Seconds for forward + backward, and the forward's share of them."""
    for x in inputs:
        x.grad = None
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    t1 = time.perf_counter()
    out.backward(torch.ones_like(out))
    sync()
    return time.perf_counter() - t0, t1 - t0


def run(args: argparse.Namespace) -> None:
    device, dtype = args.device, getattr(torch, args.dtype)
    lengths = skewed_lengths(args.batch, args.min_len, args.max_len)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)
    T, H, D = sum(lengths), args.heads, args.head_dim
    token_waste, pair_waste = padding_waste(lengths)
    print(f"{device} {args.dtype} ({torch.get_num_threads()} threads), B = {len(lengths)}, T = {T:,}, H = {H}, "
          f"D = {D}, lengths {sorted(lengths)}")
    print(f"padding waste (full attention): {100 * token_waste:.1f} % of padded tokens, {100 * pair_waste:.1f} % "
          f"of padded attention pairs ({sum(n * n for n in lengths) / 1e6:.1f} M real pairs per head)")
    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(T, H, D, device=device, dtype=dtype, generator=g).requires_grad_() for _ in range(3))

    if args.window:
        part = window_partition(voxel_coords(lengths).to(device), args.window, 0)
        w_lengths = (part.cu_seqlens[1:] - part.cu_seqlens[:-1]).tolist()
        w_token, w_pair = padding_waste(w_lengths)
        print(f"windows {args.window}^3: {part.num_windows:,} windows of 1..{part.max_seqlen} tokens; padding waste "
              f"{100 * w_token:.1f} % of tokens, {100 * w_pair:.1f} % of pairs")

        def attend(backend: str) -> torch.Tensor:
            return windowed_attention(q, k, v, part, backend=backend)
    else:
        def attend(backend: str) -> torch.Tensor:
            return varlen_attention(q, k, v, cu, max(lengths), backend=backend)

    reference = attend("padded").detach() if "padded" in args.backends else None
    print(f"{'backend':<10} {'fwd+bwd ms':>11} {'fwd ms':>9} {'vs padded':>10} {'peak GiB':>9} {'max |err|':>10}")
    results = {}
    for backend in args.backends:
        try:
            time_pass(lambda b=backend: attend(b), [q, k, v], device)  # warm-up (kernel selection, caches)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            passes = [time_pass(lambda b=backend: attend(b), [q, k, v], device) for _ in range(args.reps)]
        except (torch.OutOfMemoryError, RuntimeError, ValueError) as err:
            print(f"{backend:<10} failed: {type(err).__name__}: {str(err).splitlines()[0][:100]}")
            continue
        total = statistics.median(p[0] for p in passes)
        fwd = statistics.median(p[1] for p in passes)
        results[backend] = total
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        err = math.nan
        if reference is not None:
            with torch.no_grad():
                err = (attend(backend).float() - reference.float()).abs().max().item()
        ratio = results.get("padded", math.nan) / total if "padded" in results else math.nan
        print(f"{backend:<10} {1000 * total:11.1f} {1000 * fwd:9.1f} {ratio:9.2f}x {peak:9.2f} {err:10.2e}")
    if "padded" in results:
        print("vs padded = padded time / this backend's time (above 1: faster than padding)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--min-len", type=int, default=2000)
    ap.add_argument("--max-len", type=int, default=30000)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backends", type=lambda s: s.split(","), default=None)
    ap.add_argument("--window", type=int, default=0, help="time window attention with this window size")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="a ~1 minute CPU configuration")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.backends is None:
        args.backends = ["padded", "nested", "bucketed"]
        if args.device == "cuda" and args.dtype != "float32":
            args.backends += ["varlen"] * varlen_attn_available() + ["flash"] * flash_attn_available()
    # Padded first: it is the reference the others' outputs are checked against.
    args.backends = sorted(args.backends, key=lambda b: b != "padded")
    run(args)


if __name__ == "__main__":
    main()
