#!/usr/bin/env bash
# The GPU paths in one run on a CUDA machine, in priority order: the paper-size SMDiT and decoder benchmarks (bf16,
# packed varlen attention, tokens/s, MFU), then bf16 training of both paper models through the real trainer and
# loader (gsplat rasterizer, LPIPS, EMA, checkpoints) on a small dataset version.
#
#   GPU_SHARDS=<dataset version folder with cond latents> OUT=<log folder> bash benchmarks/gpu_check.sh
#
# Packages the machine lacks (gsplat, webdataset, braceexpand) can sit in .whl/ as wheels.
set -uo pipefail
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee "$OUT/gpu.txt"

# gsplat JIT-compiles its CUDA extension on first use (~80 s on an H200): build it beside the SMDiT benchmark.
# The build flags are exported for every later process too: torch keys the cached build by them, and a process
# with other flags silently compiles again (the decoder runs of one check stalled at their first render, most
# likely behind such a second build).
export MAX_JOBS=12 TORCH_CUDA_ARCH_LIST=9.0 FAST_COMPILE=1
timeout 150 python3 -c "from gsplat.cuda._backend import _C; print('gsplat built:', _C is not None)" \
  > "$OUT/gsplat_build.log" 2>&1 &
build=$!

timeout 75 python3 benchmarks/smdit.py --device cuda --quick 2>&1 | grep -v Warning | tee "$OUT/bench_smdit.log"
wait $build
tail -n 2 "$OUT/gsplat_build.log"
timeout 60 python3 benchmarks/decoder.py --device cuda --quick 2>&1 | grep -v Warning | tee "$OUT/bench_decoder.log"

common=(--local --recipe paper --shards "$GPU_SHARDS" --set run.log_every=10 --set data.epoch_samples=64
        --set data.workers=4)
timeout 70 python3 -m flux3d.cli train decoder "${common[@]}" --out /tmp/run-decoder --set run.steps=30 \
  --set run.ckpt_every=30 --set run.image_every=30 --set loss.lpips_random=true \
  --set decoder.gaussians.resolution=64 2>&1 | grep -v Warning | tail -n 12 | tee "$OUT/train_decoder.log"
timeout 60 python3 -m flux3d.cli train smdit "${common[@]}" --out /tmp/run-smdit --set run.steps=20 \
  --set run.ckpt_every=20 --set data.batch_size=4 2>&1 | grep -v Warning | tail -n 12 | tee "$OUT/train_smdit.log"
ls -la /tmp/run-decoder/checkpoints /tmp/run-smdit/checkpoints 2>&1 | tee "$OUT/checkpoints.txt"
