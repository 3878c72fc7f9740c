"""Training logs: a console line, ``metrics.jsonl`` always, TensorBoard when available.

TensorBoard event files are written through clu's metric writers, which
need TensorFlow: ``pip install -e '.[tensorboard]'``. Without it the run
says so once and carries on with the JSON lines.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time


SUPERSEDED = "metrics.superseded.jsonl"


def truncate_after(path: str, step: int | None) -> int:
    """Keeps the records of ``path`` up to ``step`` (None: none); returns how many moved.

    A run that crashed or was preempted logged steps past its newest
    checkpoint; the resumed run logs them again. So that ``metrics.jsonl``
    reads as one uninterrupted run, the records after the checkpoint it
    resumes from (and a last line cut short by a crash) move to
    ``metrics.superseded.jsonl`` beside it (appended: nothing is lost), and
    ``metrics.jsonl`` is replaced atomically.
    """
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    keep, moved = [], []
    for line in lines:
        try:
            rec = json.loads(line)
            ok = line.endswith(b"\n") and step is not None and int(rec["step"]) <= step
        except (ValueError, KeyError, TypeError):
            ok = False
        (keep if ok else moved).append(line if line.endswith(b"\n") else line + b"\n")
    if not moved:
        return 0
    with open(os.path.join(os.path.dirname(path), SUPERSEDED), "ab") as f:
        f.writelines(moved)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.writelines(keep)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(moved)


class MetricLogger:
    """``metrics.jsonl`` (and TensorBoard) of a run; ``resume_step``: see :func:`truncate_after`."""

    def __init__(self, workdir: str, total_steps: int, *, enabled: bool = True,
                 stream=None, resume_step: int | None = None):
        self.enabled = enabled
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self._last_time = None
        self._last_step = None
        self._jsonl = None
        self._writer = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        moved = truncate_after(os.path.join(workdir, "metrics.jsonl"), resume_step)
        if moved:
            self.print(f"metrics.jsonl: {moved} records after step {resume_step or 0} (the "
                       f"newest checkpoint) moved to {SUPERSEDED}")
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
        try:
            from clu import metric_writers  # imports TensorFlow
            self._writer = metric_writers.create_default_writer(
                os.path.join(workdir, "tensorboard"), asynchronous=True)
        except ImportError:
            self.print("TensorBoard logging off (install the 'tensorboard' extra for it); "
                       "metrics go to metrics.jsonl")

    def print(self, msg: str) -> None:
        if self.enabled:
            print(msg, file=self.stream, flush=True)

    def write(self, step: int, metrics: dict, prefix: str) -> None:
        if not self.enabled:
            return
        scalars = {f"{prefix}/{k}": float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **scalars}) + "\n")
        if self._writer is not None:
            self._writer.write_scalars(int(step), scalars)

    def train_line(self, step: int, metrics: dict, samples_per_step: int) -> None:
        """The console line: step, loss, lr, samples/s, ETA (rates since the last line)."""
        now = time.time()
        rate = eta = None
        if self._last_time is not None and step > self._last_step:
            rate = (step - self._last_step) * samples_per_step / (now - self._last_time)
            secs = (self.total_steps - step) * samples_per_step / rate
            eta = str(datetime.timedelta(seconds=int(secs)))
        self._last_time, self._last_step = now, step
        extra = "".join(f"  {k} {metrics[k]:.4g}" for k in ("top1", "grad_norm")
                        if k in metrics)
        self.print(f"step {step:>7d}/{self.total_steps}  loss {metrics['loss']:8.4f}  "
                   f"lr {metrics['lr']:.4g}{extra}  "
                   f"{'-' if rate is None else f'{rate:,.0f}'} samples/s  "
                   f"ETA {eta or '-'}")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()


class Progress:
    """Progress of a long job on stderr: a line per few seconds (done/total, rate,
    ETA) on a terminal, nothing otherwise or when ``enabled`` is False."""

    def __init__(self, what: str, total: int, enabled: bool | None = None):
        self.what, self.total, self.t0, self.last = what, total, time.time(), 0.0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    def update(self, done: int):
        now = time.time()
        if self.enabled and (now - self.last > 2 or done == self.total):
            rate = done / max(now - self.t0, 1e-9)
            eta = (self.total - done) / max(rate, 1e-9)
            print(f"\r{self.what}: {done}/{self.total} ({rate:.0f}/s, ETA {eta:.0f} s)",
                  end="\n" if done == self.total else "", file=sys.stderr, flush=True)
            self.last = now
