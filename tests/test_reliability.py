"""Nothing lost: SIGTERM / SIGINT checkpoint and exit, kill -9 at random moments resumes.

Real subprocesses (``python -m pfc_jax.train`` on the tiny config, 12 steps,
an asynchronous checkpoint every 3, evaluation at step 6) and real signals,
through the harness of ``bench/kill9.py`` (which runs the same trials at more
points). The uninterrupted run, in a process of its own, is the reference:
every interrupted-and-rerun trace must equal it bit for bit, each step logged
once, and every rerun must resume from the newest complete checkpoint.
"""

import os
import signal
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import kill9 as harness  # noqa: E402

from pfc_jax import platform  # noqa: E402

# What libtpu prints when it starts on a host with no TPU.
LIBTPU_NOISE = ("TPU_WORKER_HOSTNAMES", "host bounds", "TPU_ACCELERATOR_TYPE",
                "Source Location Trace", "libtpu_init_utils")


@pytest.fixture(scope="module")
def expect(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    got = harness.reference(workdir)
    assert sorted(got) == list(range(1, harness.OVERRIDES["max_steps"] + 1))
    if platform.cpu_only_host():
        # The run chose its platform itself (the harness left JAX_PLATFORMS unset):
        # libtpu, installed by the tpu extra, must not have probed for a TPU.
        with open(f"{workdir}.final.log") as f:
            log = f.read()
        noise = [line for line in log.splitlines()
                 if any(m in line for m in LIBTPU_NOISE)]
        assert not noise, "a CPU run printed libtpu's start-up errors:\n" + "\n".join(noise)
    return got


def test_sigterm_and_sigint_checkpoint_the_step_and_the_reruns_continue_exactly(
        expect, tmp_path):
    rng = np.random.default_rng(7)
    # Signals after a random step in 1-2 and one in 4-7 (periodic checkpoints at
    # 3, 6, 9); the trainer handles each a step or two later.
    targets = int(rng.integers(1, 3)), int(rng.integers(4, 8))
    points = harness.trial(str(tmp_path / "run"),
                           [("sigterm", targets[0]), ("sigint", targets[1])], rng, expect)
    for p in points:
        print(p.line())
    assert [p.kind for p in points] == ["sigterm", "sigint"]
    for p, sig in zip(points, (signal.SIGTERM, signal.SIGINT)):
        assert p.status == 128 + sig
        assert p.seconds < harness.STOP_DEADLINE_S
        # The step that had finished when the signal was handled is the newest
        # checkpoint (the harness checks the trainer reported it), and the
        # rerun starts there: nothing after the last periodic checkpoint lost.
        assert p.committed[-1] == p.at_step == p.resumed_from


def test_kill9_during_a_checkpoint_write_an_evaluation_and_a_step_loses_nothing(
        expect, tmp_path):
    rng = np.random.default_rng(11)
    points = harness.trial(str(tmp_path / "run"), ["checkpoint", "eval", "step"], rng, expect)
    for p in points:
        print(p.line())
    assert [p.kind for p in points] == ["checkpoint", "eval", "step"]
    assert all(p.status == -signal.SIGKILL for p in points)
    cut = points[0]
    assert cut.in_flight, "the kill did not land during a checkpoint write"
    step_cut = int(cut.in_flight[0].split(".")[0])
    assert step_cut not in cut.committed  # the cut write is not taken for a checkpoint
    assert cut.resumed_from == (cut.committed[-1] if cut.committed else None)
