"""Several processes: start-up (pfc_jax.distributed) and the trainer as 2 processes x 4 CPUs.

The tiny config runs through ``launch/local_cluster.sh`` as 2 processes with
4 emulated CPU devices each, and here in the test process as 1 process with
8; the two must agree step by step (losses, sampled class sets), a checkpoint
of the 2-process run must resume in 1 process as if never interrupted, and a
process whose peer never arrives must say so within its timeout.

Until ``train.run()`` calls ``distributed.initialize`` (the patch that comes
with ``pfc_jax/distributed.py``), the processes run ``_HARNESS``: the real
``train.run()`` with the patch's calls added from outside. Once the patch is
in, the launcher runs ``python -m pfc_jax.train`` itself.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from pfc_jax import checkpoint as ckpt_lib
from pfc_jax import distributed, logs, train
from pfc_jax.config import load_recipe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch", "local_cluster.sh")
CONFIG = "configs/tiny_cpu.py:test"

# Constant learning rate, no warm-up: the schedule then does not depend on
# max_steps, so a 4-step run resumed to 6 steps is the 6-step run. A rate of
# 0.01 keeps these first steps stable (at 0.1, float rounding differences grow
# ~100x per step). One checkpoint per step: consecutive head tables show which
# rows each step touched.
COMMON = {"checkpoint.every_steps": 1, "checkpoint.keep": 10, "optimizer.lr": 0.01,
          "optimizer.schedule": "constant", "optimizer.warmup_epochs": 0.0}
RTOL = 1e-5  # float32 sums in another order (8 devices in 1 or 2 processes)
TWO_PROC = {**COMMON, "max_steps": 4, "eval.every_steps": 4}
ONE_PROC = {**COMMON, "max_steps": 6, "eval.every_steps": 0}

# What the train.py patch does, applied from outside (see the module docstring).
_HARNESS = r'''
import jax
from pfc_jax import distributed, train

distributed.define_flags()
_main = train.main


def main(argv):
    from jax._src import xla_bridge
    assert not xla_bridge.backends_are_initialized(), "a device was touched before initialize"
    distributed.initialize_from_flags()
    _main(argv)


train.main = main

# Multi-process evaluation as in the patch: every process embeds (the model
# spans all devices) and reads all embeddings; only process 0 logs.
_post_init = train.Trainer.__post_init__


def __post_init__(self):
    _post_init(self)
    repl = train.mesh_lib.replicated(self.mesh)
    self.embed = jax.jit(self._embed, in_shardings=(repl, repl,
                         train.mesh_lib.batch_sharding(self.mesh)), out_shardings=repl)


def embed_fn(self, state):
    import numpy as np
    sharding = train.mesh_lib.batch_sharding(self.mesh)

    def fn(images):
        images = np.asarray(images)
        images = jax.make_array_from_callback(images.shape, sharding, lambda i: images[i])
        return np.asarray(self.embed(state.params, state.batch_stats, images))
    return fn


_evaluate = train.evaluate
_sets = {}


def evaluate(trainer, state, sets, logger, step):
    if not sets and jax.process_index() != 0:  # the unpatched loop loads them on process 0 only
        if not _sets:
            c = trainer.config
            held = train.build_source(c, held_out=True) if c.data.kind == "synthetic" else None
            _sets.update(train.load_eval_sets(c, held))
        sets = _sets
    return _evaluate(trainer, state, sets, logger, step)


train.Trainer.__post_init__ = __post_init__
train.Trainer.embed_fn = embed_fn
train.evaluate = evaluate
train.run()
'''


def _patched() -> bool:
    return hasattr(train, "distributed")


def _entry(tmp_path) -> list[str]:
    """The command each process runs, without the trainer flags."""
    if _patched():
        return [sys.executable, "-m", "pfc_jax.train"]
    harness = tmp_path / "harness.py"
    harness.write_text(_HARNESS)
    return [sys.executable, str(harness)]


def _flags(overrides: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def _config(overrides: dict):
    return load_recipe(os.path.join(REPO, "configs", "tiny_cpu.py"), "test", overrides)


def _child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PFC_", "JAX_COORDINATOR", "SLURM_", "OMPI_"))}
    env.update(PYTHON=sys.executable, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
    env.update(extra)
    return env


def _records(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _losses(workdir) -> dict[int, float]:
    out = {}
    for rec in _records(workdir):
        if "train/loss" in rec:
            assert rec["step"] not in out, f"step {rec['step']} logged twice in {workdir}"
            out[rec["step"]] = rec["train/loss"]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ runs (module)
@pytest.fixture(scope="module")
def two_proc(tmp_path_factory):
    """The tiny config for 4 steps as 2 processes x 4 CPU devices, via the launcher."""
    tmp = tmp_path_factory.mktemp("two_proc")
    workdir = tmp / "run"
    # Patched: the launcher's own command, $PYTHON -m pfc_jax.train; else the harness.
    entry = [] if _patched() else ["--", *_entry(tmp)]
    cmd = [LAUNCH, "2", *entry, "--config", CONFIG, "--workdir", str(workdir),
           *_flags(TWO_PROC)]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=_child_env(PFC_INIT_TIMEOUT_S="60"),
                          capture_output=True, text=True, timeout=240)
    elapsed = time.monotonic() - start
    output = proc.stdout + proc.stderr
    print(f"2-process run ({'python -m pfc_jax.train' if _patched() else 'harness'}): "
          f"{elapsed:.1f} s")
    assert proc.returncode == 0, f"local_cluster.sh exited {proc.returncode}:\n{output[-6000:]}"
    return workdir, output


@pytest.fixture(scope="module")
def one_proc(tmp_path_factory):
    """The same config uninterrupted for 6 steps in this process (1 process x 8 devices)."""
    workdir = tmp_path_factory.mktemp("one_proc") / "run"
    train.train_and_evaluate(_config(ONE_PROC), str(workdir))
    return workdir


@pytest.fixture(scope="module")
def restorer():
    """A 1-process trainer of the tiny config, for reading checkpoints and sampling."""
    cfg = _config(ONE_PROC)
    return train.Trainer(cfg, train.make_mesh(cfg))


def _centers(trainer, workdir, step):
    ckpts = ckpt_lib.Checkpoints(str(workdir))
    try:
        state = ckpts.restore(step, trainer.abstract_state, None)
    finally:
        ckpts.close()
    return np.asarray(state.head.centers)


def _touched_rows(trainer, workdir, steps):
    """Per step, the class rows whose centres changed: the sampled set (lazy updates)."""
    prev = np.asarray(trainer.init(trainer.base_key).head.centers)
    out = {}
    for step in steps:
        cur = _centers(trainer, workdir, step)
        out[step] = np.flatnonzero(np.any(cur != prev, axis=tuple(range(1, cur.ndim))))
        prev = cur
    return out


# ------------------------------------------------------------------------- tests
def test_two_processes_train_like_one(two_proc, one_proc, restorer):
    workdir, output = two_proc
    assert "joined as process 0 of 2" in output and "joined as process 1 of 2" in output, \
        output[-3000:]
    assert "[0] training from scratch" in output and "on 8 devices" in output, output[-3000:]
    assert "[1] training from scratch" not in output, "process 1 logged: only process 0 may"

    a, b = _losses(workdir), _losses(one_proc)
    assert sorted(a) == [1, 2, 3, 4], f"2-process run logged steps {sorted(a)}"
    np.testing.assert_allclose([a[s] for s in range(1, 5)], [b[s] for s in range(1, 5)],
                               rtol=RTOL, err_msg="per-step losses, 2 x 4 vs 1 x 8 devices")
    assert len({round(v, 3) for v in a.values()}) == 4, f"losses do not change: {a}"

    # Sampled class sets: read off the checkpoints, and drawn here from the same
    # labels and keys as the train step draws them.
    t = restorer
    two, one = _touched_rows(t, workdir, range(1, 5)), _touched_rows(t, one_proc, range(1, 5))
    source = train.build_source(t.config)
    loader = train.make_loader(t.config, source)
    sample = jax.jit(t.head.sample)
    for step in range(1, 5):
        labels = loader.batch(step - 1)["label"]
        k_sample, _ = jax.random.split(jax.random.fold_in(t.base_key, step - 1))
        drawn = t.head.sampled_classes(sample(labels, k_sample))
        assert len(drawn) > len(np.unique(labels)), "no negatives sampled: a weak check"
        np.testing.assert_array_equal(one[step], drawn, err_msg=f"1 process, step {step}")
        np.testing.assert_array_equal(two[step], drawn, err_msg=f"2 processes, step {step}")

    # Checkpoints: every step present, the iterator state written once with
    # the global position.
    ckpts = ckpt_lib.Checkpoints(str(workdir))
    assert ckpts.manager.all_steps() == [1, 2, 3, 4]
    ckpts.close()
    with open(workdir / "checkpoints" / "4" / "data" / "metadata") as f:
        state = json.loads(json.load(f)["iterator"])
    assert state["next_batch"] == 4, state

    # Evaluation ran on the 2-process mesh at step 4 and agrees with the same
    # checkpoint evaluated here.
    evals = [r for r in _records(workdir) if "eval/synthetic_heldout/accuracy" in r]
    assert [r["step"] for r in evals] == [4], evals
    held = train.build_source(t.config, held_out=True)
    sets = train.load_eval_sets(t.config, held)
    restored = ckpt_lib.Checkpoints(str(workdir))
    st = restored.restore(4, t.abstract_state, None)
    restored.close()
    here = train.evaluate(t, st, sets, logs.MetricLogger(str(workdir), 6, enabled=False), 4)
    assert abs(here["synthetic_heldout"].accuracy_mean
               - evals[0]["eval/synthetic_heldout/accuracy"]) <= 0.0051


def test_two_process_checkpoint_resumes_in_one_process(two_proc, one_proc, tmp_path):
    workdir, _ = two_proc
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    train.train_and_evaluate(_config(ONE_PROC), str(resumed))  # steps 5 and 6 on 1 x 8
    a, b = _losses(resumed), _losses(one_proc)
    assert sorted(a) == list(range(1, 7)), sorted(a)
    np.testing.assert_allclose([a[5], a[6]], [b[5], b[6]], rtol=RTOL,
                               err_msg="steps 5-6 after resuming the 2-process checkpoint")


def test_a_missing_peer_is_reported_within_the_timeout(tmp_path):
    """Process 0 of 2 alone, and process 1 of 2 with no coordinator: both name what they waited for."""
    entry = _entry(tmp_path)
    ports = {0: _free_port(), 1: _free_port()}
    procs, start = {}, time.monotonic()
    for pid, port in ports.items():
        env = _child_env(PFC_COORDINATOR=f"127.0.0.1:{port}", PFC_NUM_PROCESSES="2",
                         PFC_PROCESS_ID=str(pid),
                         XLA_FLAGS="--xla_force_host_platform_device_count=4")
        procs[pid] = subprocess.Popen(
            [*entry, "--config", CONFIG, "--workdir", str(tmp_path / f"w{pid}"),
             "--distributed_timeout_s=10"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for pid, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"process {pid} of 2 still waits after 90 s (timeout was 10 s)")
        results[pid] = (proc.returncode, err, time.monotonic() - start)
    for pid, (rc, err, elapsed) in results.items():
        assert rc == distributed.EXIT_PEER_TIMEOUT, \
            f"process {pid}: exit {rc}, expected {distributed.EXIT_PEER_TIMEOUT}:\n{err[-3000:]}"
        assert "timed out after 10 s waiting for all 2 processes" in err, err[-3000:]
        assert f"this is process {pid} of 2, coordinator 127.0.0.1:{ports[pid]}" in err, \
            err[-3000:]
        assert "Check failure" not in err, "JAX aborted before the watchdog spoke"
        # 10 s of waiting plus the interpreter's start-up (imports, config) on a busy machine.
        assert 10 <= elapsed < 40, f"process {pid} gave up after {elapsed:.1f} s"
    assert "never connected" in results[0][1]
    assert "is process 0 running" in results[1][1]


def test_a_busy_coordinator_port_is_explained(tmp_path):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = _child_env(PFC_COORDINATOR=f"127.0.0.1:{port}", PFC_NUM_PROCESSES="2",
                         PFC_PROCESS_ID="0", PFC_INIT_TIMEOUT_S="20",
                         XLA_FLAGS="--xla_force_host_platform_device_count=4")
        proc = subprocess.run(
            [sys.executable, "-c", "from pfc_jax import distributed; distributed.initialize()"],
            env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert (f"DistributedInitError: cannot start the coordinator for process 0 of 2, "
            f"coordinator 127.0.0.1:{port}") in proc.stderr, proc.stderr[-3000:]
    assert f"could not listen on port {port}: is it already in use" in proc.stderr


# ---------------------------------------------------- start-up rules, in this process
_CLUSTER_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                 "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE",
                 "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "JAX_COORDINATOR_ADDRESS",
                 "JAX_COORDINATOR_PORT", "JAX_LOCAL_DEVICE_IDS", "KUBERNETES_SERVICE_HOST",
                 "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")


@pytest.fixture
def clean_env(monkeypatch):
    for name in (*_CLUSTER_VARS, distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
                 distributed.ENV_PROCESS_ID, distributed.ENV_LOCAL_DEVICE_IDS,
                 distributed.ENV_TIMEOUT):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_one_process_is_a_no_op(clean_env):
    assert distributed.resolve() is None
    distributed.initialize(timeout_s=1)
    clean_env.setenv("PFC_NUM_PROCESSES", "1")
    distributed.initialize(timeout_s=1)
    assert not jax.distributed.is_initialized()
    assert jax.process_count() == 1 and jax.device_count() == 8


def test_layout_from_environment_flags_and_clusters(clean_env):
    clean_env.setenv("PFC_COORDINATOR", "10.0.0.1:1234")
    clean_env.setenv("PFC_NUM_PROCESSES", "4")
    clean_env.setenv("PFC_PROCESS_ID", "3")
    clean_env.setenv("PFC_LOCAL_DEVICE_IDS", "0,1")
    got = distributed.resolve()
    assert (got.coordinator_address, got.num_processes, got.process_id,
            got.local_device_ids) == ("10.0.0.1:1234", 4, 3, (0, 1))
    assert "PFC_" in got.source
    # Arguments (the trainer's flags) win over the environment.
    got = distributed.resolve("10.0.0.2:99", 8, 5)
    assert (got.coordinator_address, got.num_processes, got.process_id) == ("10.0.0.2:99", 8, 5)

    for name in ("PFC_COORDINATOR", "PFC_NUM_PROCESSES", "PFC_PROCESS_ID",
                 "PFC_LOCAL_DEVICE_IDS"):
        clean_env.delenv(name)
    # srun's variables, read by JAX's own SLURM detector: coordinator = first node of
    # the step, port from the job id, one GPU per process (the local rank).
    for name, value in dict(SLURM_JOB_ID="1234", SLURM_STEP_NODELIST="gpu[007-008],gpu010",
                            SLURM_NTASKS="16", SLURM_PROCID="9", SLURM_LOCALID="1").items():
        clean_env.setenv(name, value)
    got = distributed.resolve()
    port = 1234 % 4096 + 65536 - 4096
    assert (got.coordinator_address, got.num_processes, got.process_id,
            got.local_device_ids) == (f"gpu007:{port}", 16, 9, (1,))
    assert "slurm" in got.source
    clean_env.setenv("PFC_LOCAL_DEVICE_IDS", "0,1,2,3")  # one process per node
    assert distributed.resolve().local_device_ids == (0, 1, 2, 3)
    clean_env.setenv("SLURM_NTASKS", "1")
    clean_env.setenv("SLURM_PROCID", "0")
    assert distributed.resolve() is None  # a single task: nothing to join

    for name in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                 "SLURM_LOCALID", "PFC_LOCAL_DEVICE_IDS"):
        clean_env.delenv(name)
    for name, value in dict(OMPI_MCA_orte_hnp_uri="1531576320.0;tcp://10.96.0.1,10.148.0.1:34911",
                            OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_RANK="2",
                            OMPI_COMM_WORLD_LOCAL_RANK="0").items():
        clean_env.setenv(name, value)
    got = distributed.resolve()
    assert got.coordinator_address.startswith("10.96.0.1:") and got.num_processes == 4
    assert got.process_id == 2 and "ompi" in got.source


@pytest.mark.parametrize("env, message", [
    ({"PFC_NUM_PROCESSES": "two"}, "PFC_NUM_PROCESSES='two' is not an integer"),
    ({"PFC_NUM_PROCESSES": "2"}, "coordinator address, process id not set"),
    ({"PFC_COORDINATOR": "10.0.0.1", "PFC_NUM_PROCESSES": "2", "PFC_PROCESS_ID": "0"},
     "coordinator address '10.0.0.1' must be host:port"),
    ({"PFC_COORDINATOR": "h:1", "PFC_NUM_PROCESSES": "2", "PFC_PROCESS_ID": "2"},
     r"process id 2 must be in \[0, 2\) for 2 processes"),
    ({"PFC_COORDINATOR": "h:1", "PFC_NUM_PROCESSES": "2", "PFC_PROCESS_ID": "0",
      "PFC_LOCAL_DEVICE_IDS": "0,x"}, "PFC_LOCAL_DEVICE_IDS="),
    ({"PFC_INIT_TIMEOUT_S": "soon"}, "PFC_INIT_TIMEOUT_S='soon' is not a number"),
])
def test_bad_layouts_are_explained(clean_env, env, message):
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        distributed.initialize()


def test_initialize_after_devices_are_in_use_is_explained(clean_env):
    """This process's backend is up (conftest): joining now must fail, naming the layout."""
    from absl import flags
    fv = flags.FlagValues()
    distributed.define_flags(fv)
    distributed.define_flags(fv)  # a second call (train.run and a harness) is harmless
    fv(["prog", "--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=1",
        "--distributed_timeout_s=5"])
    start = time.monotonic()
    with pytest.raises(distributed.DistributedInitError,
                       match=r"before anything touches a device.*process 1 of 2, "
                             r"coordinator 127\.0\.0\.1:1 \(from arguments\)"):
        distributed.initialize_from_flags(fv)
    assert time.monotonic() - start < 2
    assert not jax.distributed.is_initialized()


def test_a_jax_without_the_cluster_detectors_is_explained(clean_env):
    """The one JAX internal used (cluster detection) missing: a clear error, not a traceback."""
    from jax._src import clusters
    clean_env.delattr(clusters.ClusterEnv, "_cluster_types")
    with pytest.raises(distributed.DistributedInitError,
                       match=r"cannot reach JAX's cluster detection in jax .*set PFC_COORDINATOR"):
        distributed.resolve()
    # A layout given in full never needs the detectors.
    clean_env.setenv("PFC_COORDINATOR", "10.0.0.1:1234")
    clean_env.setenv("PFC_NUM_PROCESSES", "2")
    clean_env.setenv("PFC_PROCESS_ID", "1")
    assert distributed.resolve().process_id == 1
