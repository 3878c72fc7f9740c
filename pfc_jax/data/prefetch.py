"""Global batches placed on the devices ahead of the step that consumes them.

``DevicePrefetch(iterator, put, depth)`` wraps a host iterator with
``get_state`` / ``set_state`` (the grain loader's). A background thread pulls
host batches, places each with ``put`` (``mesh.host_local_to_global``: the
copy to the devices starts at once and runs while the current step does) and
keeps up to ``depth`` of them waiting. ``depth = 0`` is no thread: ``next``
loads and places in the caller, as before.

Exact resume: batches already pulled but not yet consumed must not be lost
by a checkpoint. Each queued batch carries the host iterator's state right
after it was pulled; ``get_state`` returns the state of the last batch
handed out, so a run restored from it continues with the first batch that
was still waiting. ``set_state`` stops the thread, drops what was waiting and
positions the host iterator.

An error while loading (a corrupt record with ``skip_corrupt`` off, a
missing file) is raised by the ``next`` that would have returned that batch,
with its original message; the batches before it are still delivered.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

_END = object()  # the host iterator is exhausted


class DevicePrefetch:
    """An iterator of device batches, ``depth`` ahead, with the host iterator's state API."""

    def __init__(self, iterator: Any, put: Callable[[Any], Any], depth: int = 2):
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"device prefetch depth must be an integer >= 0, got {depth!r}")
        self._it, self._put, self.depth = iterator, put, depth
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._consumed = None  # host state after the last batch handed out; None: the host's own

    # ------------------------------------------------------------ iteration
    def __iter__(self) -> DevicePrefetch:
        return self

    def __next__(self):
        if self.depth == 0:
            return self._put(next(self._it))
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # every later next() ends too
            raise StopIteration
        kind, value, state = item
        if kind == "error":
            self._queue.put(item)  # the same error again, never a silent skip
            raise value
        self._consumed = state
        return value

    def _start(self) -> None:
        if self._consumed is None:  # a checkpoint before the first step resumes here
            self._consumed = self._it.get_state()
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._fill, name="pfc-device-prefetch",
                                        daemon=True)
        self._thread.start()

    def _offer(self, item) -> bool:
        """Puts ``item``, waiting for room; False once asked to stop."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        while not self._stop.is_set():
            try:
                host = next(self._it)
                state = self._it.get_state()
                item = ("batch", self._put(host), state)
            except StopIteration:
                self._offer(_END)
                return
            except BaseException as e:  # handed to the consumer, in order
                self._offer(("error", e, None))
                return
            if not self._offer(item):
                return

    def _halt(self) -> None:
        """Stops the thread and drops the batches it placed but nobody took."""
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:  # make room so a blocked put sees the stop
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)
        self._thread, self._queue = None, None

    # ---------------------------------------------------------------- state
    def get_state(self):
        """The host iterator's state after the last batch this iterator returned."""
        if self._consumed is not None:
            return self._consumed
        return self._it.get_state()  # no thread has moved the host iterator

    def set_state(self, state) -> None:
        """Continues from a ``get_state`` result; batches waiting are dropped."""
        self._halt()
        self._it.set_state(state)
        self._consumed = None

    def close(self) -> None:
        """Stops the thread, then the host iterator (and its worker processes)."""
        self._halt()
        close = getattr(self._it, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> DevicePrefetch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
