#!/usr/bin/env bash
# Single-host, multi-GPU fmsd_jax run: one process that drives every local GPU.
#
# JAX sees all visible GPUs from one process and fmsd_jax shards the batch over them with
# its device mesh, so no launcher (torchrun-style) is needed; this script only pins the
# environment that makes such runs predictable and prints it with --dry-run.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"

usage() {
  cat <<'EOF'
Usage: launch/gpu_host.sh [options] [-- MAIN_ARGS...]

Runs `python -m fmsd_jax.main --config CFG --workdir DIR` on this machine's GPUs, from the
repository root (relative paths are taken from there).

Options (environment variable in brackets):
  --config CFG          config file[:variant] [default configs/clip_b16.py]
  --workdir DIR         run directory; re-running with the same DIR resumes from its last
                        checkpoint [default runs/clip_b16]
  --mode MODE           train | mask | evaluate | export | predict [default train]
  --gpus LIST           GPUs to use, e.g. 0,1,2,3 (sets CUDA_VISIBLE_DEVICES) [default: all]
  --mem-fraction F      share of each GPU's memory JAX preallocates
                        [XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.90; JAX's own is 0.75]
  --no-preallocate      allocate on demand (XLA_PYTHON_CLIENT_PREALLOCATE=false): slower,
                        but lets other processes share the GPUs
  --xla-flags FLAGS     extra XLA_FLAGS, appended to any already set
  --python PY           interpreter [default: .venv/bin/python if present, else python3]
  --log FILE            also write stdout/stderr to FILE
  --dry-run             print the command (with its environment) instead of running it
  -h, --help            this text

Arguments after `--` go to fmsd_jax.main, e.g. `-- --config.train.batch_size=64`.
The global batch must be divisible by the number of GPUs; fmsd_jax checks this before
compiling and names both numbers if not.

Example:
  launch/gpu_host.sh --gpus 0,1,2,3 --workdir runs/b16 -- --config.model.init_from=/weights/clip-b16/model.safetensors
EOF
}

SCRIPT_NAME=gpu_host.sh
# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

CONFIG="configs/clip_b16.py"
WORKDIR="runs/clip_b16"
MODE="train"
GPUS=""
MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
PREALLOCATE=1
EXTRA_XLA_FLAGS=""
PY=""
LOG=""
MAIN_ARGS=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --config) need_value "$@"; CONFIG="$2"; shift ;;
    --workdir) need_value "$@"; WORKDIR="$2"; shift ;;
    --mode) need_value "$@"; MODE="$2"; shift ;;
    --gpus) need_value "$@"; GPUS="$2"; shift ;;
    --mem-fraction) need_value "$@"; MEM_FRACTION="$2"; shift ;;
    --no-preallocate) PREALLOCATE=0 ;;
    --xla-flags)  # its value itself starts with --
      [[ $# -ge 2 && -n "$2" ]] || die "option $1 needs a value"
      EXTRA_XLA_FLAGS="$2"; shift ;;
    --python) need_value "$@"; PY="$2"; shift ;;
    --log) need_value "$@"; LOG="$2"; shift ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    *) die "unknown argument '$1'" ;;
  esac
  shift
done

case "${MODE}" in
  train | mask | evaluate | export | predict) ;;
  *) die "unknown --mode '${MODE}' (expected train, mask, evaluate, export or predict)" ;;
esac
[[ -z "${GPUS}" || "${GPUS}" =~ ^[0-9]+(,[0-9]+)*$ ]] \
  || die "--gpus must be a comma-separated list of GPU indices, got '${GPUS}'"
[[ "${MEM_FRACTION}" =~ ^(0?\.[0-9]+|1(\.0*)?)$ ]] \
  || die "--mem-fraction must be a number in (0, 1], got '${MEM_FRACTION}'"

if [[ -z "${PY}" ]]; then
  if [[ -x "${REPO_ROOT}/.venv/bin/python" ]]; then PY="${REPO_ROOT}/.venv/bin/python"; else PY="python3"; fi
fi

ENV=(XLA_PYTHON_CLIENT_MEM_FRACTION="${MEM_FRACTION}")
if [[ "${PREALLOCATE}" == 0 ]]; then ENV+=(XLA_PYTHON_CLIENT_PREALLOCATE=false); fi
if [[ -n "${GPUS}" ]]; then ENV+=(CUDA_VISIBLE_DEVICES="${GPUS}"); fi
XLA_ALL="${XLA_FLAGS:-}${EXTRA_XLA_FLAGS:+ ${EXTRA_XLA_FLAGS}}"
XLA_ALL="${XLA_ALL# }"
if [[ -n "${XLA_ALL}" ]]; then ENV+=(XLA_FLAGS="${XLA_ALL}"); fi

CMD=(env "${ENV[@]}" "${PY}" -m fmsd_jax.main --config "${CONFIG}" --workdir "${WORKDIR}")
if [[ "${MODE}" != train ]]; then CMD+=(--mode "${MODE}"); fi
CMD+=("${MAIN_ARGS[@]}")

# Relative paths (config, workdir, log) are taken from the repository root, like the
# commands in the configs' docstrings.
run cd "${REPO_ROOT}"
if [[ "${DRY_RUN}" == 0 ]] && command -v nvidia-smi > /dev/null 2>&1; then
  nvidia-smi -L || true
fi
if [[ -n "${LOG}" ]]; then
  if [[ "${DRY_RUN}" == 1 ]]; then
    printf '%s 2>&1 | tee -a %s\n' "$(run "${CMD[@]}")" "$(quote "${LOG}")"
  else
    mkdir -p "$(dirname "${LOG}")"
    "${CMD[@]}" 2>&1 | tee -a "${LOG}"
  fi
else
  run "${CMD[@]}"
fi
