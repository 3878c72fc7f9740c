"""Crash and preemption trials: kill -9 / SIGTERM / SIGINT the trainer, rerun, compare.

    .venv/bin/python bench/kill9.py --points 12 [--seed 0]

runs the tiny config (``configs/tiny_cpu.py:test``, 12 steps, an asynchronous
checkpoint every 3 steps, evaluation every 6) once uninterrupted, then again in
one workdir that is interrupted ``--points`` times at random moments of four
kinds and rerun after each:

* ``step``: SIGKILL a random time after a random step was logged (mid-step);
* ``checkpoint``: SIGKILL while an asynchronous checkpoint write is in flight
  (its ``N.orbax-checkpoint-tmp`` directory exists);
* ``eval``: SIGKILL during an evaluation (right after the step it follows
  was logged);
* ``sigterm`` / ``sigint``: the signal a scheduler or a user sends; the
  trainer must checkpoint and exit with 128 + signal within 60 s.

After every interruption the rerun must resume from the newest complete
checkpoint, and at the end ``metrics.jsonl`` must hold each step once with
the uninterrupted run's losses, bit for bit. Prints one line per point and a
summary; exits 1 on any mismatch. ``tests/test_reliability.py`` runs the same
harness with a few points.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/tiny_cpu.py:test"
OVERRIDES = {"max_steps": 12, "checkpoint.every_steps": 3, "checkpoint.keep": 10,
             "eval.every_steps": 6, "log_every_steps": 1}
KINDS = ("step", "checkpoint", "eval", "sigterm", "sigint")
STOP_DEADLINE_S = 60  # SIGTERM/SIGINT -> checkpoint committed and exited


def child_env(devices: int = 8) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PFC_", "JAX_COORDINATOR", "SLURM_", "OMPI_"))}
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    import tempfile
    sys.path.insert(0, REPO)
    from pfc_jax import platform
    if platform.cpu_only_host():
        # The trainer chooses its platform itself, as on a user's CPU host.
        env.pop("JAX_PLATFORMS", None)
    else:
        env["JAX_PLATFORMS"] = "cpu"  # an accelerator host: still the 8-device CPU mesh
    env.update(PYTHONUNBUFFERED="1",
               XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]),
               JAX_COMPILATION_CACHE_DIR=env.get(
                   "JAX_COMPILATION_CACHE_DIR",
                   os.path.join(tempfile.gettempdir(), "pfc_jax_xla_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
    return env


def start(workdir: str, overrides: dict | None = None, log: str | None = None):
    """``python -m pfc_jax.train`` on the tiny config in a process of its own."""
    flags = [f"--config.{k}={v}" for k, v in {**OVERRIDES, **(overrides or {})}.items()]
    log = log or f"{workdir}.log"
    os.makedirs(os.path.dirname(log) or ".", exist_ok=True)
    out = open(log, "ab")
    return subprocess.Popen([sys.executable, "-m", "pfc_jax.train", "--config", CONFIG,
                             "--workdir", workdir, *flags],
                            cwd=REPO, env=child_env(), stdout=out, stderr=subprocess.STDOUT)


def records(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass  # a line being written
    return out


def losses(workdir: str) -> dict[int, float]:
    """Step -> loss from ``metrics.jsonl``; a step logged twice is an error."""
    out = {}
    for rec in records(workdir):
        if "train/loss" in rec:
            if rec["step"] in out:
                raise AssertionError(f"{workdir}: step {rec['step']} logged twice")
            out[rec["step"]] = rec["train/loss"]
    return out


def committed_steps(workdir: str) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def in_flight(workdir: str) -> list[str]:
    d = os.path.join(workdir, "checkpoints")
    return [n for n in os.listdir(d) if "tmp" in n] if os.path.isdir(d) else []


def _logged(workdir: str) -> int:
    steps = [r["step"] for r in records(workdir) if "train/loss" in r]
    return max(steps, default=0)


def finish(workdir: str, timeout: float = 300, log: str | None = None) -> str:
    """Runs the trainer to the end in ``workdir``; returns its output."""
    log = log or f"{workdir}.final.log"
    proc = start(workdir, log=log)
    rc = proc.wait(timeout=timeout)
    with open(log) as f:
        text = f.read()
    if rc != 0:
        raise AssertionError(f"the final run in {workdir} exited {rc}:\n{text[-4000:]}")
    return text


def reference(workdir: str) -> dict[int, float]:
    finish(workdir)
    return losses(workdir)


@dataclasses.dataclass
class Point:
    kind: str
    at_step: int            # newest step logged when the process was stopped
    committed: list         # complete checkpoints left behind
    in_flight: list         # checkpoint writes that were cut (kill -9)
    resumed_from: int | None  # what the next run restored (None: from scratch)
    status: int             # exit status (-9 for kill -9)
    seconds: float          # signal -> exit (SIGTERM / SIGINT)

    def line(self) -> str:
        cut = f", cut write {self.in_flight}" if self.in_flight else ""
        took = f", exited {self.status} in {self.seconds:.1f} s" if self.kind.startswith("sig") \
            else ""
        return (f"{self.kind:>10}: after step {self.at_step:>2} (complete checkpoints "
                f"{self.committed}{cut}{took}); rerun resumed from step {self.resumed_from}")


def interrupt(workdir: str, kind: str, rng: np.random.Generator, log: str,
              target: int | None = None, timeout: float = 300) -> Point:
    """Starts the trainer in ``workdir`` (output to ``log``) and stops it once, as ``kind`` says.

    ``step``, ``sigterm`` and ``sigint`` act once step ``target`` (default: a
    random step still to come) has been logged.
    """
    total = OVERRIDES["max_steps"]
    first = _logged(workdir)
    if target is None:
        target = int(rng.integers(first + 1, max(first + 2, total - 1)))
    evals = [s for s in range(OVERRIDES["eval.every_steps"], total,
                              OVERRIDES["eval.every_steps"]) if s > first]
    if kind == "eval" and not evals:
        kind = "step"
    stale = set(in_flight(workdir))  # writes cut by an earlier kill, if still there
    proc = start(workdir, log=log)
    deadline = time.monotonic() + timeout
    cut: list[str] = []

    def alive():
        if proc.poll() is not None:
            with open(log) as f:
                raise AssertionError(f"the trainer ended ({proc.returncode}) before the "
                                     f"{kind} point:\n{f.read()[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {kind} point within {timeout} s")
        return True

    if kind == "checkpoint":
        while alive() and not (cut := sorted(set(in_flight(workdir)) - stale)):
            time.sleep(0.002)
    elif kind == "eval":
        while alive() and _logged(workdir) < evals[0]:
            time.sleep(0.002)
    else:
        while alive() and _logged(workdir) < target:
            time.sleep(0.01)
        if kind == "step":
            time.sleep(float(rng.uniform(0, 0.5)))
    at = _logged(workdir)
    t0 = time.monotonic()
    if kind in ("sigterm", "sigint"):
        proc.send_signal(signal.SIGTERM if kind == "sigterm" else signal.SIGINT)
        try:
            status = proc.wait(timeout=STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"{kind}: still running {STOP_DEADLINE_S} s after the signal")
        expect = 128 + (signal.SIGTERM if kind == "sigterm" else signal.SIGINT)
        with open(log) as f:
            text = f.read()
        if status != expect:
            raise AssertionError(f"{kind}: exit status {status}, expected {expect}:\n"
                                 f"{text[-4000:]}")
        at = _logged(workdir)
        if f"checkpoint of step {at} written and committed" not in text:
            raise AssertionError(f"{kind}: no checkpoint of step {at} reported:\n{text[-3000:]}")
    else:
        if not cut:
            cut = in_flight(workdir)
        proc.kill()
        status = proc.wait()
    seconds = time.monotonic() - t0
    committed = committed_steps(workdir)
    if kind in ("sigterm", "sigint") and committed[-1:] != [at]:
        raise AssertionError(f"{kind}: stopped after step {at}, newest checkpoint {committed}")
    return Point(kind, at, committed, cut, None, status, seconds)


def resumed_from(log_text: str) -> int | None:
    import re
    m = re.search(r"resumed from step (\d+)", log_text)
    return int(m.group(1)) if m else None


def trial(workdir: str, kinds, rng, expect: dict[int, float]) -> list[Point]:
    """Interrupts a run in ``workdir`` once per kind, finishes it, checks the trace.

    ``kinds``: names from ``KINDS``, or ``(name, target step)`` pairs.
    """
    points, logs = [], []
    for kind in kinds:
        kind, target = (kind, None) if isinstance(kind, str) else kind
        if _logged(workdir) >= OVERRIDES["max_steps"] - 2:
            break  # no step left to interrupt
        logs.append(f"{workdir}.run{len(logs)}.log")
        points.append(interrupt(workdir, kind, rng, logs[-1], target))
    logs.append(f"{workdir}.run{len(logs)}.log")
    finish(workdir, log=logs[-1])
    for p, path in zip(points, logs[1:]):  # the run after each point restored ...
        with open(path) as f:
            p.resumed_from = resumed_from(f.read())
        newest = p.committed[-1] if p.committed else None  # ... the newest complete one
        if p.resumed_from != newest:
            raise AssertionError(f"after {p.line()}: resumed from {p.resumed_from}, the newest "
                                 f"complete checkpoint is {newest}")
    got = losses(workdir)
    if got != expect:
        diff = {s: (got.get(s), expect.get(s)) for s in sorted(set(got) | set(expect))
                if got.get(s) != expect.get(s)}
        raise AssertionError(f"{workdir}: the continued trace differs from the uninterrupted "
                             f"one at (got, expected) {diff}")
    return points


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", type=int, default=12, help="interruptions in total (>= 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="scratch directory (default: a new temp dir)")
    args = ap.parse_args()
    import tempfile
    root = args.dir or tempfile.mkdtemp(prefix="pfc_kill9_")
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    expect = reference(os.path.join(root, "reference"))
    print(f"reference: {len(expect)} steps in {time.time() - t0:.0f} s", flush=True)
    done, failures, n = [], [], 0
    while len(done) < args.points:
        n += 1
        kinds = list(rng.permutation(KINDS))[:3]  # up to three interruptions per trial
        workdir = os.path.join(root, f"trial{n}")
        try:
            points = trial(workdir, kinds, rng, expect)
        except AssertionError as e:
            failures.append(f"trial {n}: {e}")
            print(f"trial {n}: FAILED: {e}", flush=True)
            continue
        for p in points:
            print(f"trial {n}: {p.line()}", flush=True)
        done.extend(points)
        print(f"trial {n}: the continued trace equals the uninterrupted one, bit for bit",
              flush=True)
    by_kind = {k: sum(p.kind == k for p in done) for k in KINDS}
    stops = [p.seconds for p in done if p.kind.startswith("sig")]
    cut = sum(bool(p.in_flight) for p in done)
    print(f"\n{len(done)} interruptions ({by_kind}), {cut} of them during a checkpoint write, "
          f"{len(failures)} failed trials; SIGTERM/SIGINT to exit: "
          f"{'max %.1f s' % max(stops) if stops else '-'}; {time.time() - t0:.0f} s in all")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
