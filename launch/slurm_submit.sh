#!/usr/bin/env bash
# Submits launch/slurm.sbatch with the allocation given on the command line, keeping
# --ntasks-per-node equal to --gpus-per-node (one JAX process per GPU) so the two cannot drift.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"

usage() {
  cat <<'USAGE'
Usage: launch/slurm_submit.sh [options] [-- MAIN_ARGS...]

Submits a multi-node fmsd_jax run (see launch/slurm.sbatch) from the repository root.

Options:
  --nodes N            nodes [default 2]
  --gpus-per-node G    GPUs per node = processes per node [default 8]
  --cpus-per-task C    CPU cores per process, for data loading [default 8]
  --partition P        SLURM partition [default: the cluster's]
  --account A          SLURM account [default: yours]
  --time T             time limit, e.g. 24:00:00 [default 24:00:00]
  --job-name NAME      [default fmsd]
  --config CFG         config file[:variant] [default configs/clip_b16.py]
  --workdir DIR        run directory on a shared filesystem [default runs/clip_b16];
                       the SLURM log goes to DIR/slurm-JOBID.out
  --dry-run            print the sbatch command instead of submitting
  -h, --help           this text

Arguments after `--` go to fmsd_jax.main, e.g. `-- --config.train.batch_size=256`.

Example:
  launch/slurm_submit.sh --nodes 4 --gpus-per-node 8 --partition gpu --workdir /shared/runs/l14 \
      --config configs/clip_l14.py -- --config.model.init_from=/shared/weights/clip-l14/model.safetensors
USAGE
}

SCRIPT_NAME=slurm_submit.sh
# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

positive_int() {
  [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"
}

NODES=2
GPUS=8
CPUS=8
PARTITION=""
ACCOUNT=""
TIME="24:00:00"
JOB_NAME="fmsd"
CONFIG="configs/clip_b16.py"
WORKDIR="runs/clip_b16"
MAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --nodes) need_value "$@"; positive_int "$1" "$2"; NODES="$2"; shift ;;
    --gpus-per-node) need_value "$@"; positive_int "$1" "$2"; GPUS="$2"; shift ;;
    --cpus-per-task) need_value "$@"; positive_int "$1" "$2"; CPUS="$2"; shift ;;
    --partition) need_value "$@"; PARTITION="$2"; shift ;;
    --account) need_value "$@"; ACCOUNT="$2"; shift ;;
    --time) need_value "$@"; TIME="$2"; shift ;;
    --job-name) need_value "$@"; JOB_NAME="$2"; shift ;;
    --config) need_value "$@"; CONFIG="$2"; shift ;;
    --workdir) need_value "$@"; WORKDIR="$2"; shift ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    *) die "unknown argument '$1'" ;;
  esac
  shift
done

SBATCH=(sbatch --chdir="${REPO_ROOT}" --job-name="${JOB_NAME}" --nodes="${NODES}"
  --gpus-per-node="${GPUS}" --ntasks-per-node="${GPUS}" --cpus-per-task="${CPUS}"
  --time="${TIME}" --output="${WORKDIR}/slurm-%j.out")
if [[ -n "${PARTITION}" ]]; then SBATCH+=(--partition="${PARTITION}"); fi
if [[ -n "${ACCOUNT}" ]]; then SBATCH+=(--account="${ACCOUNT}"); fi
SBATCH+=("${SCRIPT_DIR}/slurm.sbatch" --config "${CONFIG}" --workdir "${WORKDIR}")
if ((${#MAIN_ARGS[@]})); then SBATCH+=(-- "${MAIN_ARGS[@]}"); fi

# SLURM does not create the --output directory; a missing one makes the job fail silently.
run mkdir -p "$(cd "${REPO_ROOT}" && realpath -m "${WORKDIR}")"
run "${SBATCH[@]}"
