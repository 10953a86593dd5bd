#!/usr/bin/env bash
# Issue 7's GPU checks in one command (about 6 minutes on one H100/H200), for a session that
# has a GPU for a few minutes: prepared here, run once there.
#
#   bash tools/gpu_wheels.sh                 # on a machine with the package index
#   bash bench/gpu_check.sh [OUT_DIR]        # on the GPU host, repo root, .gpuwheels carried
#
# 1. vs_pytorch: FMSD step with cuDNN attention (a) and with XLA attention (ax), +regularisers,
#    PyTorch Effort eager (b, the reference), our and PyTorch full fine-tuning, merged
#    inference; ViT-B/16, 224 px, bf16, batch 64.
# 2. input_bound: the same FMSD step fed from memory vs by the real pipeline (256 px frames
#    decoded, augmented, resized to 224) with data.workers=-1 as the paper configs run.
# Output: OUT_DIR (default $OUT, else bench_out)/{env,vs_pytorch,input_bound}.txt
set -uo pipefail

out=${1:-${OUT:-bench_out}}
mkdir -p "$out"
if [ -d .gpuwheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpuwheels/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  nproc
  python3 -c "import jax, flax, torch; print('jax', jax.__version__, jax.devices()); \
print('flax', flax.__version__, 'torch', torch.__version__)"
} 2>&1 | tee "$out/env.txt"

status=0
timeout 330 python3 bench/vs_pytorch.py --device gpu --dtype bf16 --batch 64 --iters 10 \
  --attention-impl cudnn --rows a,ax,a+,b,c,tf,infer 2>&1 | tee "$out/vs_pytorch.txt" \
  || status=1
timeout 150 python3 bench/input_bound.py --variant B/16 --image-size 224 --batch 64 \
  --dtype bfloat16 --attention-impl cudnn --size small-256 --workers -1 --steps 20 \
  --rounds 2 2>&1 | tee "$out/input_bound.txt" || status=1
exit "$status"
