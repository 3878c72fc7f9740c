"""The launch scripts: syntax, shellcheck, and what they run (with stand-ins for srun and gcloud)."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ("local_cluster.sh", "slurm.sbatch", "tpu_pod.sh")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PFC_", "SLURM_", "XLA_FLAGS", "GPUS_PER_NODE"))}
    env.update(extra)
    return env


def test_every_script_is_here_and_no_other():
    assert sorted(os.listdir(LAUNCH)) == sorted(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_header_names_the_command_and_strict_mode(name):
    with open(os.path.join(LAUNCH, name)) as f:
        text = f.read()
    lines = text.splitlines()
    assert lines[0] == "#!/usr/bin/env bash", f"{name}: first line {lines[0]!r}"
    header = []
    for line in lines[1:]:
        if not line.startswith("#"):
            break
        header.append(line)
    usage = [line for line in header if f"launch/{name}" in line]
    assert usage, f"{name}: the header comment does not show the command that runs it"
    assert re.search(r"^set -euo pipefail$", text, re.M), f"{name}: no 'set -euo pipefail'"


@pytest.mark.parametrize("name", SCRIPTS)
def test_bash_parses(name):
    proc = subprocess.run(["bash", "-n", os.path.join(LAUNCH, name)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, f"bash -n {name}:\n{proc.stderr}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_shellcheck(name):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian/Ubuntu: apt-get install shellcheck)")
    proc = subprocess.run(["shellcheck", "--shell=bash", os.path.join(LAUNCH, name)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"shellcheck {name}:\n{proc.stdout}{proc.stderr}"


# ----------------------------------------------------------------- local_cluster.sh
def _local(args, timeout=60, **env):
    start = time.monotonic()
    proc = subprocess.run([os.path.join(LAUNCH, "local_cluster.sh"), *args], cwd=REPO,
                          env=_env(PYTHON=sys.executable, **env), capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.monotonic() - start


def test_local_cluster_gives_each_process_its_id_share_and_prefix(tmp_path):
    show = 'echo "id=$PFC_PROCESS_ID n=$PFC_NUM_PROCESSES c=$PFC_COORDINATOR x=$XLA_FLAGS"'
    proc, _ = _local(["2", "--", "bash", "-c", show], XLA_FLAGS="--xla_foo "
                     "--xla_force_host_platform_device_count=8", PFC_LOG_DIR=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = sorted(proc.stdout.splitlines())
    assert len(lines) == 2, proc.stdout
    got = [re.fullmatch(r"\[(\d)\] id=(\d) n=2 c=127\.0\.0\.1:(\d+) x=--xla_foo "
                        r"--xla_force_host_platform_device_count=4", line) for line in lines]
    assert all(got), lines
    assert [(g[1], g[2]) for g in got] == [("0", "0"), ("1", "1")]
    assert got[0][3] == got[1][3], "the processes were given different coordinators"
    for i in range(2):  # PFC_LOG_DIR: one file per process, without the prefix
        assert (tmp_path / f"process_{i}.log").read_text() == lines[i][4:] + "\n"


def test_local_cluster_stops_the_others_when_one_fails(tmp_path):
    marker = tmp_path / "child.pid"
    # Process 0 starts a grandchild and waits; process 1 fails after half a second.
    script = (f'if [ "$PFC_PROCESS_ID" = 1 ]; then sleep 0.5; echo failing >&2; exit 3; fi; '
              f'sleep 120 & echo $! > {marker}; wait')
    proc, elapsed = _local(["2", "--", "bash", "-c", script])
    assert proc.returncode == 3, (proc.returncode, proc.stderr)
    assert elapsed < 20, f"took {elapsed:.1f} s to stop after a failure"
    assert "[1] failing" in proc.stdout
    assert "process 1 exited with status 3; stopping the others" in proc.stderr
    child = int(marker.read_text())
    time.sleep(0.2)
    assert not _running(child), f"process 0's child {child} survived"


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (an init that never reaps leaves those)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def test_local_cluster_refuses_an_uneven_device_split():
    proc, _ = _local(["3", "--", "true"])
    assert proc.returncode == 2
    assert "PFC_CPU_DEVICES=8 emulated devices do not split evenly over 3 processes" in proc.stderr
    proc, _ = _local(["0"])
    assert proc.returncode == 2 and "N must be a positive integer, got '0'" in proc.stderr


# ----------------------------------------------------------------------- slurm.sbatch
def _fake(tmp_path, name, body):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return str(bin_dir)


_RECORD = """import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:],
                        "ids": os.environ.get("PFC_LOCAL_DEVICE_IDS")}) + "\\n")
"""


def _calls(log):
    with open(log) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("per, tasks, ids", [("gpu", "4", None), ("node", "1", "0,1,2,3")])
def test_slurm_runs_the_trainer_per_gpu_or_per_node(tmp_path, per, tasks, ids):
    log = tmp_path / "calls.jsonl"
    bin_dir = _fake(tmp_path, "srun", _RECORD)
    proc = subprocess.run(
        ["bash", os.path.join(LAUNCH, "slurm.sbatch"), "--config", "configs/ms1mv3.py",
         "--workdir", "/shared/run"], cwd=tmp_path, capture_output=True, text=True,
        env=_env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log),
                 SLURM_SUBMIT_DIR=REPO, SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID="7",
                 GPUS_PER_NODE="4", PFC_PROCESS_PER=per, PYTHON="python3"))
    assert proc.returncode == 0, proc.stderr
    (call,) = _calls(log)
    argv = call["argv"]
    assert "--nodes=2" in argv and f"--ntasks-per-node={tasks}" in argv, argv
    assert argv[argv.index("python3"):] == ["python3", "-m", "pfc_jax.train", "--config",
                                            "configs/ms1mv3.py", "--workdir", "/shared/run"]
    assert call["ids"] == ids


def test_slurm_refuses_an_unknown_layout(tmp_path):
    proc = subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sbatch")], capture_output=True,
                          text=True, env=_env(SLURM_SUBMIT_DIR=REPO, PFC_PROCESS_PER="rack"))
    assert proc.returncode == 2 and "PFC_PROCESS_PER must be gpu or node, got 'rack'" \
        in proc.stderr


# ------------------------------------------------------------------------ tpu_pod.sh
_GCLOUD = _RECORD + """
if sys.argv[1:5] == ["compute", "tpus", "tpu-vm", "describe"]:
    sys.exit(0 if os.environ.get("FAKE_TPU_EXISTS") else 1)
"""

_POD = ["--name", "pfc-pod", "--zone", "us-central2-b", "--accelerator", "v4-32",
        "--version", "tpu-ubuntu2204-base", "--config", "configs/tiny_cpu.py",
        "--workdir", "gs://bucket/run"]


def _pod(tmp_path, args, **env):
    log = tmp_path / "calls.jsonl"
    if log.exists():
        log.unlink()
    bin_dir = _fake(tmp_path, "gcloud", _GCLOUD)
    proc = subprocess.run([os.path.join(LAUNCH, "tpu_pod.sh"), *args], capture_output=True,
                          text=True, timeout=60,
                          env=_env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log),
                                   **env))
    return proc, (_calls(log) if log.exists() else [])


def test_tpu_pod_creates_installs_and_runs_on_every_worker(tmp_path):
    proc, calls = _pod(tmp_path, [*_POD, "--", "--config.seed=3", "--config.data.path=a b"])
    assert proc.returncode == 0, proc.stderr
    verbs = [c["argv"][3] for c in calls]
    assert verbs == ["describe", "create", "scp", "ssh", "ssh"], verbs
    create = calls[1]["argv"]
    assert "--accelerator-type=v4-32" in create and "--version=tpu-ubuntu2204-base" in create
    assert all("--zone=us-central2-b" in c["argv"] for c in calls)
    assert all("--worker=all" in c["argv"] for c in calls[2:])
    install = next(a for a in calls[3]["argv"] if a.startswith("--command="))
    assert "pip install -q -U 'jax[tpu]'" in install and "pip install -q -e ~/pfc_jax" in install
    run = next(a for a in calls[4]["argv"] if a.startswith("--command="))
    # exec: the VM's SIGTERM reaches the trainer itself (its preemption checkpoint).
    assert run == ("--command=cd ~/pfc_jax && exec python3 -m pfc_jax.train --config "
                   "configs/tiny_cpu.py --workdir gs://bucket/run --config.seed=3 "
                   "--config.data.path=a\\ b "), run


def test_tpu_pod_reuses_an_existing_vm(tmp_path):
    proc, calls = _pod(tmp_path, [*_POD[:4], *_POD[8:], "--skip-install"], FAKE_TPU_EXISTS="1")
    assert proc.returncode == 0, proc.stderr
    assert [c["argv"][3] for c in calls] == ["describe", "ssh"]
    assert "reusing TPU VM pfc-pod" in proc.stderr


@pytest.mark.parametrize("change, message", [
    ({"--workdir": "/local/run"}, "--workdir must be a gs:// path"),
    ({"--config": "configs/none.py"}, "config file 'configs/none.py' not found"),
    ({"--name": None}, "--name is required"),
])
def test_tpu_pod_checks_its_arguments_before_calling_gcloud(tmp_path, change, message):
    args = []
    for flag, value in zip(_POD[::2], _POD[1::2]):
        value = change.get(flag, value)
        if value is not None:
            args += [flag, value]
    proc, calls = _pod(tmp_path, args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert calls == []
