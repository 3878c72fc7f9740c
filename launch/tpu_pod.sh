#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice. From the repository root:
#
#   launch/tpu_pod.sh --name pfc-v4-32 --zone us-central2-b --accelerator v4-32 \
#       --version tpu-ubuntu2204-base --config configs/ms1mv3.py:r50 --workdir gs://my-bucket/runs/r50 \
#       -- --config.data.kind=arrayrecord --config.data.path=gs://my-bucket/data/ms1mv3
#
# 1. reuses the TPU VM NAME if `gcloud compute tpus tpu-vm describe` finds it,
#    else creates it (`gcloud compute tpus tpu-vm create`);
# 2. copies this checkout (without .git and .venv) to ~/pfc_jax on every worker
#    and installs it there: pip install 'jax[tpu]' and pip install -e ~/pfc_jax;
# 3. runs the same command on every worker
#    (`gcloud compute tpus tpu-vm ssh --worker=all --command=...`):
#        cd ~/pfc_jax && python3 -m pfc_jax.train --config CONFIG --workdir WORKDIR [extra flags]
#    JAX finds the pod's layout itself (worker number and peers from the TPU
#    metadata), so no process ids are passed.
#
# Preemption: a Spot or preemptible slice, and a maintenance event, stop the
# workers with SIGTERM (JAX's preemption notifier also watches the TPU
# maintenance notices). Every worker then checkpoints the same step and exits
# with status 143 (pfc_jax/preemption.py); rerun this script with
# --skip-install and it resumes there. The trainer is exec'ed so the signal
# reaches it, not a wrapping shell. Spot VMs give about 30 s: keep
# checkpoint.every_steps such that losing that many steps is acceptable when a
# write does not fit.
#
# The workdir must be a gs:// path: every worker writes its shards of each
# checkpoint there, and rerunning this script resumes from the newest one.
# Data must be readable from every worker (gs://, or copied to each).
#
# Options:
#   --name NAME            TPU VM name (required)
#   --zone ZONE            e.g. us-central2-b (required)
#   --accelerator TYPE     e.g. v4-32, v5litepod-64 (required when creating)
#   --version RUNTIME      TPU software version, e.g. tpu-ubuntu2204-base, v2-alpha-tpuv5-lite
#                          (required when creating)
#   --config FILE[:ARG]    a configs/*.py recipe, relative to the repository root (required)
#   --workdir gs://...     checkpoints and metrics (required)
#   --project PROJECT      gcloud project (default: gcloud's configured one)
#   --spot                 create a Spot TPU VM
#   --skip-install         the workers already have this checkout installed
#   --detach               start training under nohup (log: ~/pfc_train.log on each worker) and return
#   --                     everything after it goes to pfc_jax.train unchanged
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

name="" zone="" accelerator="" version="" config="" workdir="" project=""
spot=0 skip_install=0 detach=0
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="${2:?--name needs a value}"; shift 2 ;;
    --zone) zone="${2:?--zone needs a value}"; shift 2 ;;
    --accelerator) accelerator="${2:?--accelerator needs a value}"; shift 2 ;;
    --version) version="${2:?--version needs a value}"; shift 2 ;;
    --config) config="${2:?--config needs a value}"; shift 2 ;;
    --workdir) workdir="${2:?--workdir needs a value}"; shift 2 ;;
    --project) project="${2:?--project needs a value}"; shift 2 ;;
    --spot) spot=1; shift ;;
    --skip-install) skip_install=1; shift ;;
    --detach) detach=1; shift ;;
    -h|--help) usage ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option '$1' (trainer flags go after --; see --help)" ;;
  esac
done

[[ -n "$name" ]] || die "--name is required"
[[ -n "$zone" ]] || die "--zone is required"
[[ -n "$config" ]] || die "--config is required"
[[ "$workdir" == gs://* ]] || die "--workdir must be a gs:// path that every worker can write, got '$workdir'"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ -f "$repo/${config%%:*}" ]] || die "config file '${config%%:*}' not found under $repo"
command -v gcloud >/dev/null || die "gcloud not found: install the Google Cloud SDK"

where=(--zone="$zone")
if [[ -n "$project" ]]; then where+=(--project="$project"); fi

# 1. Create or reuse.
if gcloud compute tpus tpu-vm describe "$name" "${where[@]}" >/dev/null 2>&1; then
  echo "tpu_pod.sh: reusing TPU VM $name in $zone" >&2
else
  [[ -n "$accelerator" ]] || die "TPU VM $name does not exist; --accelerator is needed to create it"
  [[ -n "$version" ]] || die "TPU VM $name does not exist; --version is needed to create it"
  create=(gcloud compute tpus tpu-vm create "$name" "${where[@]}"
          --accelerator-type="$accelerator" --version="$version")
  if (( spot )); then create+=(--spot); fi
  echo "tpu_pod.sh: creating: ${create[*]}" >&2
  "${create[@]}"
fi

on_all() {  # on_all COMMAND: run a shell command on every worker of the slice
  gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command="$1"
}

# 2. Install this checkout.
if (( ! skip_install )); then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  archive="$tmp/pfc_jax.tar.gz"
  tar -C "$repo" --exclude=./.git --exclude=./.venv --exclude='./workdir*' --exclude=./build \
      --exclude=.pytest_cache --exclude='*.egg-info' --exclude=__pycache__ -czf "$archive" .
  gcloud compute tpus tpu-vm scp "$archive" "$name:pfc_jax.tar.gz" "${where[@]}" --worker=all
  on_all "set -e; rm -rf ~/pfc_jax && mkdir -p ~/pfc_jax && tar -C ~/pfc_jax -xzf ~/pfc_jax.tar.gz \
    && python3 -m pip install -q -U pip && python3 -m pip install -q -U 'jax[tpu]' \
    && python3 -m pip install -q -e ~/pfc_jax"
fi

# 3. The same command on every worker.
# ${extra[@]+...}: an empty array under `set -u` on the bash 3.2 of macOS.
train=(python3 -m pfc_jax.train --config "$config" --workdir "$workdir" ${extra[@]+"${extra[@]}"})
remote="cd ~/pfc_jax && exec $(printf '%q ' "${train[@]}")"
if (( detach )); then
  remote="cd ~/pfc_jax && (exec nohup $(printf '%q ' "${train[@]}") > ~/pfc_train.log 2>&1 < /dev/null &)"
fi
echo "tpu_pod.sh: on every worker of $name: $remote" >&2
on_all "$remote"
