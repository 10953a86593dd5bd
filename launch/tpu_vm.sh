#!/usr/bin/env bash
# Cloud TPU VM lifecycle for fmsd_jax: create, set up, run on every worker, fetch, delete.
#
# Every step is a plain gcloud command; --dry-run prints them (one per line, shell-quoted)
# so they can be reviewed, pasted, or checked by tests without a Google Cloud account.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh [options] {create|setup|run|fetch|delete|all} [-- MAIN_ARGS...]

Runs fmsd_jax on a Cloud TPU VM (single host) or a multi-host TPU slice.

Steps:
  create   create the TPU VM (`gcloud compute tpus tpu-vm create`), or, for slices larger
           than one host (accelerator suffix > 8) or with --queued, a queued resource
           (`gcloud compute tpus queued-resources create`) and wait until it is ACTIVE
  setup    copy the code to every worker (a `git archive` of HEAD, or `git clone` with
           --repo), install Python 3.11, a venv, requirements.txt and jax[tpu]
  run      on all workers at once: python -m fmsd_jax.main --config CFG --workdir DIR
           (FMSD_MULTIHOST=1, so every worker calls jax.distributed.initialize(), which
           finds the other workers on its own on Cloud TPU)
  fetch    copy the workdir (results.json/.md, PNGs, mask, config) back from worker 0,
           or from GCS when the workdir is gs://...
  delete   delete the TPU VM (or the queued resource and its nodes)
  all      create, setup, run, fetch, delete; fetch and delete also run if `run` fails
           (a TPU left running costs money) unless --keep

Options (environment variable in brackets):
  --name NAME            TPU VM / node name [TPU_NAME, default fmsd-tpu]
  --zone ZONE            [TPU_ZONE, default us-central2-b]
  --project PROJECT      [GCP_PROJECT, default: gcloud's configured project]
  --accelerator TYPE     v4-8, v4-32, v5litepod-8, v5p-128, v6e-8, ... [TPU_TYPE, default v4-8]
  --version VERSION      TPU software version [TPU_VERSION, default by generation:
                         v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
                         v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e]
  --queued / --no-queued force / forbid queued resources (default: queued when multi-host)
  --spot                 Spot capacity (cheaper, preemptible: training resumes from the
                         last checkpoint when re-run with the same --workdir)
  --fsdp N               mesh: fsdp axis size (data takes the other chips) [default: the
                         mesh README's 'Planning a pod run' table shows best for the slice;
                         --dry-run prints it]. Check another with --mode plan first.
  --config CFG           config file[:variant] [default configs/clip_b16.py]
  --workdir DIR          run directory on the workers [default runs/NAME, relative to the code
                         dir]. Multi-host slices need one every worker sees: gs://BUCKET/run
  --code-dir DIR         code directory on the workers [default fmsd_jax, under $HOME]
  --repo URL             git clone URL instead of copying a `git archive` of local HEAD
  --ref REF              branch/tag/commit to check out with --repo [default main]
  --upload PATH          also copy PATH (e.g. CLIP weights) into CODE_DIR/inputs/ on every
                         worker; repeatable
  --python PY            interpreter on the workers [default python3.11]
  --fetch-to DIR         local destination for fetch [default runs/NAME]
  --detach               run in the background on the workers (nohup, log in CODE_DIR/run.log)
  --keep                 with `all`: do not delete at the end
  --dry-run              print every command instead of running it
  -h, --help             this text

Arguments after `--` go to fmsd_jax.main, e.g. `-- --config.train.epochs=5`.
Multi-host is switched on by the env FMSD_MULTIHOST=1 (equivalently --config.multihost=True).

Example:
  launch/tpu_vm.sh --accelerator v4-32 --workdir gs://my-bucket/fmsd-b16 \
      --upload ~/weights/clip-vit-base-patch16 all -- --config.model.init_from=inputs/clip-vit-base-patch16/model.safetensors
EOF
}

SCRIPT_NAME=tpu_vm.sh
# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

NAME="${TPU_NAME:-fmsd-tpu}"
ZONE="${TPU_ZONE:-us-central2-b}"
PROJECT="${GCP_PROJECT:-}"
ACCEL="${TPU_TYPE:-v4-8}"
VERSION="${TPU_VERSION:-}"
QUEUED=""
SPOT=0
CONFIG="configs/clip_b16.py"
WORKDIR=""
CODE_DIR="fmsd_jax"
REPO=""
REF="main"
UPLOADS=()
PY="python3.11"
FETCH_TO=""
DETACH=0
KEEP=0
STEP=""
MAIN_ARGS=()
FSDP=""

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --name) need_value "$@"; NAME="$2"; shift ;;
    --zone) need_value "$@"; ZONE="$2"; shift ;;
    --project) need_value "$@"; PROJECT="$2"; shift ;;
    --accelerator) need_value "$@"; ACCEL="$2"; shift ;;
    --version) need_value "$@"; VERSION="$2"; shift ;;
    --queued) QUEUED=1 ;;
    --no-queued) QUEUED=0 ;;
    --spot) SPOT=1 ;;
    --fsdp) need_value "$@"; FSDP="$2"; shift ;;
    --config) need_value "$@"; CONFIG="$2"; shift ;;
    --workdir) need_value "$@"; WORKDIR="$2"; shift ;;
    --code-dir) need_value "$@"; CODE_DIR="$2"; shift ;;
    --repo) need_value "$@"; REPO="$2"; shift ;;
    --ref) need_value "$@"; REF="$2"; shift ;;
    --upload) need_value "$@"; UPLOADS+=("$2"); shift ;;
    --python) need_value "$@"; PY="$2"; shift ;;
    --fetch-to) need_value "$@"; FETCH_TO="$2"; shift ;;
    --detach) DETACH=1 ;;
    --keep) KEEP=1 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    create | setup | run | fetch | delete | all)
      [[ -z "${STEP}" ]] || die "only one step may be given (got '${STEP}' and '$1')"
      STEP="$1" ;;
    -*) die "unknown option '$1'" ;;
    *) die "unknown step '$1' (expected create, setup, run, fetch, delete or all)" ;;
  esac
  shift
done
[[ -n "${STEP}" ]] || die "no step given (create, setup, run, fetch, delete or all)"

[[ "${ACCEL}" =~ ^(v[0-9]+[a-z]*)-([0-9]+)$ ]] \
  || die "accelerator type '${ACCEL}' is not of the form GENERATION-SIZE (e.g. v4-8, v5p-128)"
GENERATION="${BASH_REMATCH[1]}"
SIZE="${BASH_REMATCH[2]}"
if [[ -z "${VERSION}" ]]; then
  case "${GENERATION}" in
    v4) VERSION="tpu-ubuntu2204-base" ;;
    v5litepod | v5e) VERSION="v2-alpha-tpuv5-lite" ;;
    v5p) VERSION="v2-alpha-tpuv5" ;;
    v6e) VERSION="v2-alpha-tpuv6e" ;;
    *) die "no default software version for '${GENERATION}'; pass --version" ;;
  esac
fi
# Chips in the slice: v4/v5p accelerator types count TensorCores (2 per chip), v5e/v6e chips.
case "${GENERATION}" in
  v4 | v5p) CHIPS=$((SIZE / 2)) ;;
  *) CHIPS="${SIZE}" ;;
esac
# The mesh from the evidence: README 'Planning a pod run' (tools/plan_table.py) compiles the FMSD
# and full fine-tuning train steps of B/16, L/14 and H/14 for v5e-8, v5e-256, v4-128 and
# v5p-512, data-only against data x fsdp 4. On each of them the best FMSD mesh is data-only: it
# fits with most of the HBM free and moves 1-5 MiB of fp32 gradient sums per step, while fsdp 4
# saves 0.3 (B/16), 1.25 (L/14) or 2.4-2.7 GiB (H/14) per chip and adds every layer's weight
# all-gathers, twice per step (326 MiB, 1.13 GiB, 2.35 GiB). So every slice defaults to
# data-only; for a slice the table does not list, the same holds as long as the weights fit a
# chip. fsdp pays off when full fine-tuning of a large tower does not fit a chip data-only:
# H/14 on 16 GiB v5e chips fits 7 images per chip data-only and 27 with fsdp 4. Pass --fsdp N
# there, planned first with --mode plan.
if [[ -z "${FSDP}" ]]; then FSDP=1; fi
if ! [[ "${FSDP}" =~ ^[1-9][0-9]*$ ]] || ((CHIPS % FSDP)); then
  die "--fsdp ${FSDP} must be a positive divisor of the ${CHIPS} chips of ${ACCEL}"
fi
MESH_ARGS=(--config.mesh.data=-1 "--config.mesh.fsdp=${FSDP}")
if [[ "${DRY_RUN}" == 1 ]]; then
  echo "mesh for ${ACCEL} (${CHIPS} chips): data=$((CHIPS / FSDP)) x fsdp=${FSDP}" \
    "(the best FMSD mesh in README 'Planning a pod run' is data-only; --fsdp N overrides)" >&2
fi
# One TPU VM host carries up to 8 cores/chips; bigger slices are multi-host, and capacity
# for them is only reliably obtained through queued resources.
if [[ -z "${QUEUED}" ]]; then
  if ((SIZE > 8)); then QUEUED=1; else QUEUED=0; fi
fi
QR_ID="${NAME}-qr"
WORKDIR="${WORKDIR:-runs/${NAME}}"
FETCH_TO="${FETCH_TO:-runs/${NAME}}"

GCLOUD_LOC=(--zone="${ZONE}")
if [[ -n "${PROJECT}" ]]; then GCLOUD_LOC+=(--project="${PROJECT}"); fi
if [[ "${DETACH}" == 1 && "${STEP}" == all ]]; then
  die "--detach cannot be used with 'all' (fetch and delete would cut the run short)"
fi

# The jax version comes from requirements.txt so the TPU install matches the tested pin.
JAX_VERSION="$(sed -n 's/^jax==\([^[:space:]]*\).*/\1/p' "${REPO_ROOT}/requirements.txt" 2>/dev/null || true)"
JAX_SPEC="jax[tpu]${JAX_VERSION:+==${JAX_VERSION}}"

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "${NAME}" "${GCLOUD_LOC[@]}" --worker=all --command "$1"
}

step_create() {
  local extra=()
  if [[ "${SPOT}" == 1 ]]; then extra+=(--spot); fi
  if [[ "${QUEUED}" == 1 ]]; then
    run gcloud compute tpus queued-resources create "${QR_ID}" "${GCLOUD_LOC[@]}" \
      --node-id="${NAME}" --accelerator-type="${ACCEL}" --runtime-version="${VERSION}" \
      "${extra[@]}"
    wait_active
  else
    run gcloud compute tpus tpu-vm create "${NAME}" "${GCLOUD_LOC[@]}" \
      --accelerator-type="${ACCEL}" --version="${VERSION}" "${extra[@]}"
  fi
}

# A queued resource is granted asynchronously; poll until ACTIVE, fail on a terminal state.
wait_active() {
  local describe=(gcloud compute tpus queued-resources describe "${QR_ID}" "${GCLOUD_LOC[@]}"
    --format='value(state.state)')
  if [[ "${DRY_RUN}" == 1 ]]; then
    run "${describe[@]}"
    return
  fi
  local state=""
  while true; do
    state="$("${describe[@]}")"
    case "${state}" in
      ACTIVE) echo "queued resource ${QR_ID} is ACTIVE"; return 0 ;;
      FAILED | SUSPENDED) echo "queued resource ${QR_ID} is ${state}" >&2; return 1 ;;
      *) echo "queued resource ${QR_ID}: ${state:-unknown}; waiting"; sleep 30 ;;
    esac
  done
}

step_setup() {
  local fetch_code dir
  dir="$(printf '%q' "${CODE_DIR}")"
  if [[ -n "${REPO}" ]]; then
    fetch_code="rm -rf ${dir} && git clone --quiet $(printf '%q' "${REPO}") ${dir}"
    fetch_code+=" && git -C ${dir} checkout --quiet $(printf '%q' "${REF}")"
  else
    # Only committed files travel: no venv, no runs/, nothing git ignores.
    local tarball="/tmp/${NAME}-code.tar.gz"
    run git -C "${REPO_ROOT}" archive --format=tar.gz -o "${tarball}" HEAD
    run gcloud compute tpus tpu-vm scp "${tarball}" "${NAME}:fmsd_code.tar.gz" \
      "${GCLOUD_LOC[@]}" --worker=all
    fetch_code="rm -rf ${dir} && mkdir -p ${dir} && tar -xzf fmsd_code.tar.gz -C ${dir}"
  fi
  # TPU VM images ship an older Python than fmsd_jax needs (>= 3.11): install it if missing.
  local install_py="if ! ${PY} -m venv --help > /dev/null 2>&1; then sudo apt-get update -qq"
  install_py+=" && sudo apt-get install -y -qq ${PY} ${PY}-venv; fi"
  local check="import jax; print('worker', jax.process_index(), jax.local_device_count(), 'local', jax.devices()[0].platform)"
  ssh_all "set -e; ${install_py}; ${fetch_code}; cd ${dir}; ${PY} -m venv .venv; .venv/bin/pip install -q --upgrade pip; .venv/bin/pip install -q -r requirements.txt '${JAX_SPEC}'; .venv/bin/python -c \"${check}\""
  local path
  if ((${#UPLOADS[@]})); then ssh_all "mkdir -p ${dir}/inputs"; fi
  for path in "${UPLOADS[@]}"; do
    run gcloud compute tpus tpu-vm scp --recurse "${path}" "${NAME}:${CODE_DIR}/inputs/" \
      "${GCLOUD_LOC[@]}" --worker=all
  done
}

step_run() {
  local cmd=(.venv/bin/python -m fmsd_jax.main --config "${CONFIG}" --workdir "${WORKDIR}")
  cmd+=("${MESH_ARGS[@]}" "${MAIN_ARGS[@]}")
  local quoted
  quoted="$(printf ' %q' "${cmd[@]}")"
  local dir
  dir="$(printf '%q' "${CODE_DIR}")"
  local remote="cd ${dir} && export FMSD_MULTIHOST=1 &&${quoted}"
  if [[ "${DETACH}" == 1 ]]; then
    remote="cd ${dir} && FMSD_MULTIHOST=1 nohup${quoted} > run.log 2>&1 < /dev/null &"
  fi
  ssh_all "${remote}"
}

step_fetch() {
  run mkdir -p "${FETCH_TO}"
  if [[ "${WORKDIR}" == gs://* ]]; then
    run gcloud storage cp --recursive "${WORKDIR}/*" "${FETCH_TO}/"
  else
    local remote_dir="${WORKDIR}"
    [[ "${remote_dir}" == /* ]] || remote_dir="${CODE_DIR}/${remote_dir}"
    # Reports are written by process 0, which runs on worker 0.
    run gcloud compute tpus tpu-vm scp --recurse "${NAME}:${remote_dir}/*" "${FETCH_TO}/" \
      "${GCLOUD_LOC[@]}" --worker=0
  fi
}

step_delete() {
  if [[ "${QUEUED}" == 1 ]]; then
    run gcloud compute tpus queued-resources delete "${QR_ID}" "${GCLOUD_LOC[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "${NAME}" "${GCLOUD_LOC[@]}" --quiet
  fi
}

finish() {
  local status="$1"
  trap - EXIT
  set +e
  step_fetch || echo "tpu_vm.sh: fetch failed; results may still be on the workers" >&2
  if [[ "${KEEP}" == 1 ]]; then
    echo "tpu_vm.sh: --keep: ${NAME} still exists (and bills); delete it with:" >&2
    echo "  $0 --name ${NAME} --zone ${ZONE} --accelerator ${ACCEL} delete" >&2
  else
    step_delete
  fi
  exit "${status}"
}

case "${STEP}" in
  create) step_create ;;
  setup) step_setup ;;
  run) step_run ;;
  fetch) step_fetch ;;
  delete) step_delete ;;
  all)
    step_create
    # From here on the TPU bills: fetch and delete on any exit, success or failure.
    trap 'finish $?' EXIT
    step_setup
    step_run
    ;;
esac
