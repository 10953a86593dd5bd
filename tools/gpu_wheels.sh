#!/usr/bin/env bash
# Download, on a machine with the package index, the wheels a GPU host's Python 3.12 image
# lacks for fmsd_jax (its image has jax/jaxlib with CUDA, flax, optax, orbax, chex, torch,
# transformers, opencv, scikit-image; not grain and its needs, albumentations,
# ml-collections, tensorboardX). Carry the folder to the host and install offline there:
#
#   bash tools/gpu_wheels.sh [DIR]          # here; DIR defaults to .gpuwheels (git-excluded)
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl  # there
#   export PYTHONPATH=/tmp/site:$PWD
#
# Versions are those of requirements.txt where it pins them; --no-deps, so every needed
# dependency is named here.
set -euo pipefail

dir=${1:-.gpuwheels}
mkdir -p "$dir"
wheels=(
  grain==0.2.18 array-record==0.8.6 portpicker==1.6.0
  ml-collections==1.1.0 tensorboardx==2.6.5
  albumentations==2.0.8 albucore==0.0.24 simsimd==6.5.16 stringzilla==5.3.2
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d "$dir" "${wheels[@]}"
ls "$dir"
