#!/usr/bin/env python
"""Memory of cleaning at scale: the sharded table plus a bounded buffer.

    .venv/bin/python bench/clean_memory.py                       # 1M classes, K = 3, D = 512
    .venv/bin/python bench/clean_memory.py --classes 200000      # quicker

Builds a random class table ``[C, K, D]`` sharded over the emulated 8-device
CPU mesh (as a K = 3 run leaves it), then runs what ``pfc-clean`` and
``pfc-suspects`` run per batch: the own-class sub-centre cosines, the
sharded ``[C, K]`` counts and their dominant sub-centre, the per-sample
look-up, and the nearest-other-class scan over the whole table. Prints the
process's resident memory before the table, with the table, and at its peak,
beside the table's own bytes and XLA's compiled temporary bytes per call.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class RssPeak:
    """The largest VmRSS seen while the ``with`` block runs (polled every 5 ms)."""

    def __enter__(self):
        import threading
        self.peak, self._stop = rss_gib(), threading.Event()

        def poll():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, rss_gib())

        self._t = threading.Thread(target=poll, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_gib())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=1_000_000)
    ap.add_argument("--subcenters", type=int, default=3)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--devices", type=int, default=8)
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(HERE))
    from pfc_jax import platform
    platform.use_cpu(args.devices)  # before JAX starts
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pfc_jax import clean
    from pfc_jax import mesh as mesh_lib

    mesh = mesh_lib.make_mesh({"data": args.devices})
    c, k, d = args.classes, args.subcenters, args.dim
    padded = -(-c // args.devices) * args.devices
    ts = clean.TableScan(mesh, (padded, k, d), c)
    before = rss_gib()

    def make_table(key):
        # A cheap elementwise pattern (fused, per shard): values do not matter for
        # memory, and a random normal of the whole table needs several copies.
        del key
        r = jax.lax.broadcasted_iota(jnp.float32, (padded, k, d), 0)
        j = jax.lax.broadcasted_iota(jnp.float32, (padded, k, d), 1)
        e = jax.lax.broadcasted_iota(jnp.float32, (padded, k, d), 2)
        return jnp.sin(r * 0.6180339 + j * 1.3 + e * (0.011 + 1e-6 * r))

    make_table = jax.jit(make_table, out_shardings=ts.table_sharding)
    t0 = time.time()
    table = make_table(jax.random.key(0))
    table.block_until_ready()
    table_gib = table.size * 4 / 2**30
    with_table = rss_gib()
    print(f"table [{padded:,}, {k}, {d}] float32 = {table_gib:.2f} GiB on {args.devices} "
          f"devices, built in {time.time() - t0:.0f} s")

    rng = np.random.default_rng(0)
    counts = ts.zero_counts()
    temps = {}
    t0 = time.time()
    watch = RssPeak().__enter__()
    for b in range(args.batches):
        x = jax.device_put(rng.normal(size=(args.batch, d)).astype(np.float32), ts.batch_sharding)
        y = jax.device_put(rng.integers(0, c, args.batch).astype(np.int32), ts.batch_sharding)
        if b == 0:
            for name, fn, a in (("own_cosines", ts.own_cosines, (table, x, y)),
                                ("nearest_other (one block)", ts._nearest_block, (table, *ts._nearest_init(x, y), np.int32(0)))):
                m = fn.lower(*a).compile().memory_analysis()
                temps[name] = getattr(m, "temp_size_in_bytes", float("nan"))
        cos = ts.own_cosines(table, x, y)
        counts = ts.add_counts(counts, y, jnp.argmax(cos, -1).astype(jnp.int32))
        dom = ts.lookup(ts.dominant(counts), y)
        best, cls = ts.nearest_other(table, x, y)
        jax.block_until_ready((dom, best, cls))
    watch.__exit__()
    dt = (time.time() - t0) / args.batches
    peak = watch.peak
    buffer = peak - with_table
    print(f"resident: {before:.2f} GiB before the table, {with_table:.2f} GiB with it, "
          f"peak {peak:.2f} GiB while scanning {args.batches} batches of {args.batch} "
          f"(process peak including the table's construction: {peak_gib():.2f} GiB)")
    print(f"buffer above the table: {buffer:.3f} GiB ({100 * buffer / table_gib:.1f} % of the "
          f"table); counts table {padded * k * 4 / 2**20:.1f} MiB")
    print("XLA temporaries per call (all devices): " +
          ", ".join(f"{n} {v / 2**20:.1f} MiB" for n, v in temps.items()))
    print(f"{dt:.1f} s per batch (own-class scan + full nearest-other scan)")


if __name__ == "__main__":
    main()
