#!/usr/bin/env bash
# N training processes on this machine's CPU, joined as one multi-process JAX job.
#
#   launch/local_cluster.sh 2 --config configs/tiny_cpu.py:test --workdir /tmp/pfc_mp
#
# runs, for i in 0..N-1 and with a coordinator on a free port of 127.0.0.1,
#
#   PFC_COORDINATOR=127.0.0.1:PORT PFC_NUM_PROCESSES=N PFC_PROCESS_ID=i \
#   XLA_FLAGS=--xla_force_host_platform_device_count=D/N JAX_PLATFORMS=cpu \
#     python -m pfc_jax.train --config ... --workdir ...
#
# so process i has D/N emulated CPU devices (D = PFC_CPU_DEVICES, default 8)
# and the job sees all D. Any other command runs the same way after "--":
#
#   launch/local_cluster.sh 2 -- python my_script.py --flag value
#
# Output lines are prefixed with "[i] ". The script waits for every process;
# when one fails it stops the others (TERM, then KILL after 10 s) and exits
# with the failed process's status (75: a peer never joined, see
# pfc_jax/distributed.py).
#
# Preemption: a TERM or INT (Ctrl-C) to this script is passed on as TERM to
# every process; the trainers agree on one step, all write its checkpoint and
# exit with 143 (pfc_jax/preemption.py), and so does this script. They get
# PFC_STOP_GRACE_S seconds for it before they are killed. A process that exits
# with 143 or 130 (a signal sent to it alone) is not a failure to stop the
# others for: they are writing the same checkpoint, and are waited for.
#
# Environment:
#   PYTHON            interpreter (default: .venv/bin/python of this repo if present, else python3)
#   PFC_CPU_DEVICES   emulated CPU devices in total, split evenly (default 8)
#   PFC_PORT          coordinator port (default: a free one)
#   PFC_LOG_DIR       also write each process's output to PFC_LOG_DIR/process_i.log
#   PFC_INIT_TIMEOUT_S  seconds the processes wait for each other (default 300)
#   PFC_STOP_GRACE_S  seconds to checkpoint after a TERM or INT before KILL (default 120)
set -euo pipefail

usage() {
  echo "usage: $0 N [trainer flags...]   or   $0 N -- command [args...]" >&2
  exit 2
}

[[ $# -ge 1 ]] || usage
num="$1"
shift
[[ "$num" =~ ^[1-9][0-9]*$ ]] || { echo "$0: N must be a positive integer, got '$num'" >&2; usage; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi

if [[ "${1:-}" == "--" ]]; then
  shift
  [[ $# -ge 1 ]] || usage
  cmd=("$@")
else
  cmd=("$PYTHON" -m pfc_jax.train "$@")
fi

devices="${PFC_CPU_DEVICES:-8}"
[[ "$devices" =~ ^[1-9][0-9]*$ ]] || { echo "$0: PFC_CPU_DEVICES must be a positive integer, got '$devices'" >&2; exit 2; }
if (( devices % num != 0 )); then
  echo "$0: PFC_CPU_DEVICES=$devices emulated devices do not split evenly over $num processes" >&2
  exit 2
fi
per_process=$(( devices / num ))

port="${PFC_PORT:-}"
if [[ -z "$port" ]]; then
  port="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi

# XLA_FLAGS of the caller, without a device count of its own.
base_flags=""
for flag in ${XLA_FLAGS:-}; do
  [[ "$flag" == --xla_force_host_platform_device_count=* ]] || base_flags+="$flag "
done

if [[ -n "${PFC_LOG_DIR:-}" ]]; then mkdir -p "$PFC_LOG_DIR"; fi

prefix() {  # prefix ID: copy stdin to stdout (and the log file) line by line, "[ID] " in front
  # In the process's group, so it receives the group's TERM too: it must
  # outlive the process and copy what it prints while it checkpoints.
  trap '' INT TERM
  local line
  while IFS= read -r line || [[ -n "$line" ]]; do
    printf '[%s] %s\n' "$1" "$line"
    if [[ -n "${PFC_LOG_DIR:-}" ]]; then printf '%s\n' "$line" >> "$PFC_LOG_DIR/process_$1.log"; fi
  done
}

# Job control: each process starts in a process group of its own, so stopping
# it (kill -- -PID) also stops whatever it started.
set -m
grace="${PFC_STOP_GRACE_S:-120}"
[[ "$grace" =~ ^[0-9]+$ ]] || { echo "$0: PFC_STOP_GRACE_S must be a whole number of seconds, got '$grace'" >&2; exit 2; }
pids=()
wait_all() {  # wait_all SECONDS: until every process has ended, KILL what is left after SECONDS
  local pid waited=0
  while (( waited < $1 * 10 )); do
    local alive=0
    for pid in "${pids[@]}"; do if kill -0 "$pid" 2>/dev/null; then alive=1; fi; done
    (( alive )) || return 0
    sleep 0.1
    waited=$(( waited + 1 ))
  done
  echo "[launch] processes still running after $1 s; killing them" >&2
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}
stop_all() {  # stop_all SECONDS: TERM every process still running, then wait_all SECONDS
  local pid
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  wait_all "$1"
}
# shellcheck disable=SC2317  # called from the traps below
preempted() {  # after a TERM or INT: every trainer checkpoints one step and exits 143
  trap '' INT TERM
  echo "[launch] $1: passing TERM to every process (checkpoint, then exit; ${grace} s)" >&2
  stop_all "$grace"
  local rc first=0 i
  for (( i = 0; i < num; i++ )); do
    if [[ -n "${done_flags[$i]:-}" ]]; then rc="${rcs[$i]}"; else rc=0; wait "${pids[$i]}" 2>/dev/null || rc=$?; fi
    if (( rc != 0 && first == 0 )); then first=$rc; fi
  done
  wait 2>/dev/null || true  # the output prefixers
  exit $(( first == 0 ? 143 : first ))
}
trap 'preempted TERM' TERM
trap 'preempted INT' INT

echo "[launch] $num processes x $per_process CPU devices, coordinator 127.0.0.1:$port: ${cmd[*]}" >&2
for (( i = 0; i < num; i++ )); do
  PFC_COORDINATOR="127.0.0.1:$port" PFC_NUM_PROCESSES="$num" PFC_PROCESS_ID="$i" \
    JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" PYTHONUNBUFFERED=1 \
    XLA_FLAGS="${base_flags}--xla_force_host_platform_device_count=$per_process" \
    "${cmd[@]}" > >(prefix "$i") 2>&1 &
  pids+=("$!")
done
set +m  # the groups stay; this only stops bash's "Terminated" job notices

# Poll instead of `wait -n`, which needs bash >= 4.3 (macOS ships 3.2).
status=0
running=$num
declare -a done_flags rcs
while (( running > 0 )); do
  for (( i = 0; i < num; i++ )); do
    [[ -z "${done_flags[$i]:-}" ]] || continue
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    rc=0
    wait "${pids[$i]}" || rc=$?
    done_flags[i]=1
    rcs[i]=$rc
    running=$(( running - 1 ))
    if (( rc == 143 || rc == 130 )); then
      # Preempted: the others reach the same checkpoint; wait, do not stop them.
      echo "[launch] process $i stopped after a preemption checkpoint (status $rc)" >&2
      (( status != 0 )) || status=$rc
      continue
    fi
    if (( rc != 0 )); then
      echo "[launch] process $i exited with status $rc; stopping the others" >&2
      status=$rc
      stop_all 10
      for (( j = 0; j < num; j++ )); do wait "${pids[$j]}" 2>/dev/null || true; done
      running=0
      break
    fi
  done
  (( running == 0 )) || sleep 0.2
done
wait  # the output prefixers
if (( status == 0 )); then echo "[launch] all $num processes finished" >&2; fi
exit "$status"
