#!/usr/bin/env bash
# The data pipeline's GPU stages on a CUDA machine, for the 360K cost model (docs/rendering.md): FLUX.1 VAE
# encoding of renders (bf16, the encode stage's batch) and the aesthetic scorer (CLIP ViT-L/14, fp16).
#
#   bash benchmarks/gpu_stages.sh       (wheels the machine lacks can sit in .whl/, as for gpu_check.sh)
#
# Blender is not measured here: bpy 4.2 ships for CPython 3.11 only, as a ~350 MB wheel.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 240 python3 benchmarks/encode.py --full-vae --device cuda --views 96 --cond-views 24 2>&1 | grep -v Warning
timeout 150 python3 benchmarks/curation.py --images 512 --batch 64 2>&1 | grep -v Warning
