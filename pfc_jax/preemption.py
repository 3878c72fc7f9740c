"""Preemption: SIGTERM or SIGINT ends training with a checkpoint, on every process.

SLURM (``--signal``, ``scancel``), Kubernetes, TPU maintenance events and a
user's Ctrl-C all say "stop soon" with a signal. The trainer asks
:meth:`Watch.should_stop` after every step; once it says yes, the loop
checkpoints the step that just finished, waits for the write to commit and
raises :class:`Preempted`, which ``python -m pfc_jax.train`` turns into the
exit status ``128 + signal`` (143 after SIGTERM, 130 after SIGINT). Rerunning
the same command resumes from that checkpoint exactly.

One process: a Python handler records the signal; the next
``should_stop`` is true.

Several processes: they must all save the *same* step, or the checkpoint is
torn. JAX's preemption service does that: ``jax.distributed.initialize``
installs a SIGTERM notifier in every process, a notice on any one of them
reaches all through the coordination service, and
:func:`jax.experimental.multihost_utils.reached_preemption_sync_point`
becomes true on every process at the same step (one past the largest step any
of them had reached). SIGTERM is therefore left to JAX there; SIGINT is turned
into a SIGTERM of this process so that a Ctrl-C on one host stops them all at
one step too.

A second SIGINT while the checkpoint is being written raises
``KeyboardInterrupt`` at once (a user who insists); further SIGTERMs are
ignored. The newest complete checkpoint before it stays intact either way.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import jax

HANDLED = (signal.SIGTERM, signal.SIGINT)


def exit_status(signum: int | None) -> int:
    """The process exit status after a preemption checkpoint: ``128 + signal``."""
    return 128 + int(signum or signal.SIGTERM)


class Preempted(Exception):
    """Training stopped on a signal after committing the checkpoint of ``step``."""

    def __init__(self, step: int, signum: int | None, seconds: float):
        self.step, self.signum, self.seconds = step, signum, seconds
        name = signal.Signals(signum).name if signum else "a preemption notice"
        super().__init__(f"stopped by {name}: checkpoint of step {step} written and committed "
                         f"within {seconds:.1f} s; rerun the same command to resume")

    @property
    def exit_status(self) -> int:
        return exit_status(self.signum)


class Watch:
    """Installs the handlers on enter, restores the previous ones on exit."""

    def __init__(self):
        self.signum: int | None = None  # the signal this process received
        self.received_at: float | None = None
        self._previous: dict[int, object] = {}
        self._multi: bool | None = False  # None: several processes, no preemption service

    def __enter__(self) -> Watch:
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach the main thread only; nothing to install here
        self._multi = jax.process_count() > 1
        for signum in HANDLED:
            if self._multi and signum == signal.SIGTERM:
                continue  # JAX's notifier owns SIGTERM across processes
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT and self.signum == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C
            return
        self.signum, self.received_at = signum, time.monotonic()
        print(f"pfc_jax: {signal.Signals(signum).name} received: checkpointing the current "
              "step, then exiting", file=sys.stderr, flush=True)
        if self._multi and signum == signal.SIGINT:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier tells the other processes

    def should_stop(self, step: int) -> bool:
        """True when every process should checkpoint ``step`` and stop (call every step)."""
        if self._multi:
            from jax.experimental import multihost_utils
            try:
                reached = multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError as e:  # jax_enable_preemption_service is off
                print(f"pfc_jax.preemption: {e}; a SIGTERM or SIGINT now ends the processes "
                      "without a checkpoint", file=sys.stderr, flush=True)
                self._multi = None
                self.__exit__()  # Ctrl-C must not be swallowed by a handler that cannot act
                return False
            if reached:
                if self.received_at is None:
                    self.received_at = time.monotonic()
                return True
            return False
        return self._multi is False and self.signum is not None
