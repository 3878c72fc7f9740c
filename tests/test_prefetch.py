"""Device prefetch: order, exact resume with batches in flight, errors in order, shutdown."""

from __future__ import annotations

import json
import threading

import jax
import numpy as np
import pytest

from pfc_jax import mesh as mesh_lib
from pfc_jax.data.pipeline import PipelineConfig, make_loader
from pfc_jax.data.prefetch import DevicePrefetch
from pfc_jax.data.synthetic import SyntheticFaces


class Counting:
    """Host iterator of batches 0, 1, 2, ... (to ``end``) with the loader's state API.

    ``bad``: the batch whose loading raises; ``pulled`` counts the batches taken.
    """

    def __init__(self, end=None, bad=None):
        self.next_batch, self.end, self.bad, self.pulled = 0, end, bad, 0
        self.closed = False

    def __next__(self):
        if self.end is not None and self.next_batch >= self.end:
            raise StopIteration
        if self.next_batch == self.bad:
            raise ValueError(f"record {self.next_batch}: corrupt image")
        self.next_batch += 1
        self.pulled += 1
        return {"x": np.full((2,), self.next_batch - 1)}

    def get_state(self):
        return json.dumps({"next_batch": self.next_batch}).encode()

    def set_state(self, state):
        self.next_batch = json.loads(state)["next_batch"]

    def close(self):
        self.closed = True


def _take(it, n):
    return [int(next(it)["x"][0]) for _ in range(n)]


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_batches_come_in_order_and_the_state_is_the_consumed_ones(depth):
    host = Counting()
    it = DevicePrefetch(host, lambda b: b, depth)
    assert _take(it, 5) == [0, 1, 2, 3, 4]
    # the thread has pulled ahead (up to depth batches waiting), the state has not
    state = it.get_state()
    assert json.loads(state) == {"next_batch": 5}
    assert host.next_batch <= 5 + depth + 1
    resumed = DevicePrefetch(Counting(), lambda b: b, depth)
    resumed.set_state(state)
    assert _take(resumed, 3) == [5, 6, 7]  # the batches in flight were not lost
    assert _take(it, 3) == [5, 6, 7]       # and the original continues the same
    it.close(), resumed.close()
    assert host.closed


def test_the_state_before_any_batch_is_the_start_and_set_state_drops_the_queue():
    host = Counting()
    it = DevicePrefetch(host, lambda b: b, 2)
    assert json.loads(it.get_state()) == {"next_batch": 0}
    assert _take(it, 2) == [0, 1]
    it.set_state(json.dumps({"next_batch": 10}).encode())  # waiting batches 2, 3 dropped
    assert _take(it, 2) == [10, 11]
    assert json.loads(it.get_state()) == {"next_batch": 12}
    it.close()


def test_a_loading_error_comes_after_the_batches_before_it_and_stays():
    it = DevicePrefetch(Counting(bad=3), lambda b: b, 2)
    assert _take(it, 3) == [0, 1, 2]
    for _ in range(2):  # never skipped silently, the same message each time
        with pytest.raises(ValueError, match="record 3: corrupt image"):
            next(it)
    assert json.loads(it.get_state()) == {"next_batch": 3}
    it.close()


def test_the_end_of_the_host_iterator_ends_it():
    it = DevicePrefetch(Counting(end=3), lambda b: b, 2)
    assert list(int(b["x"][0]) for b in it) == [0, 1, 2]
    with pytest.raises(StopIteration):
        next(it)
    it.close()


def test_close_stops_the_thread_while_it_waits_for_room():
    host = Counting()
    it = DevicePrefetch(host, lambda b: b, 1)
    _take(it, 1)
    threads = [t for t in threading.enumerate() if t.name == "pfc-device-prefetch"]
    assert threads and threads[0].is_alive()
    it.close()
    assert not threads[0].is_alive()
    with pytest.raises(ValueError, match="depth"):
        DevicePrefetch(host, lambda b: b, -1)


def test_the_loader_through_the_prefetch_gives_the_same_device_batches():
    """Real grain loader, real placement on the 8-device mesh: the same arrays, resumable."""
    mesh = mesh_lib.make_mesh()
    src = SyntheticFaces(8, 4, image_size=16, seed=0)
    cfg = PipelineConfig(global_batch=8, seed=1, worker_count=0)

    def put(host):
        return mesh_lib.host_local_to_global({k: host[k] for k in ("image", "label")}, mesh)

    plain = iter(make_loader(src, cfg))
    want = [put(next(plain)) for _ in range(5)]
    it = DevicePrefetch(iter(make_loader(src, cfg)), put, 2)
    got = [next(it) for _ in range(3)]
    state = it.get_state()
    resumed = DevicePrefetch(iter(make_loader(src, cfg)), put, 2)
    resumed.set_state(state)
    got += [next(resumed) for _ in range(2)]
    for w, g in zip(want, got):
        assert g["image"].sharding == w["image"].sharding
        np.testing.assert_array_equal(jax.device_get(g["image"]), jax.device_get(w["image"]))
        np.testing.assert_array_equal(jax.device_get(g["label"]), jax.device_get(w["label"]))
    it.close(), resumed.close(), plain.close()
