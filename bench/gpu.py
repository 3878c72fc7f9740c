"""One accelerator, one table: head step, full train step and input pipeline.

    bash bench/gpu.sh            # on a GPU (or TPU) host: <= 8 minutes on one H100/H200
    bash bench/gpu.sh --smoke    # the same code at toy sizes on 8 emulated CPU devices

Rows, each measured as the median of a few steps after compiling:

* head step (``PartialFC.step``: sampling, margin softmax, backward, lazy
  SGD+momentum row update) at 1M and 10M classes, r = 1 and r = 0.1, D = 512,
  global batch 1024: seconds per step, TFLOP/s from XLA's own FLOP count of
  the compiled step (per device, times the devices), and MFU against one
  card's dense bf16 peak
  (``PEAK_TFLOPS``; the head computes in float32, so its MFU is bounded by
  the float32 rate and is quoted for comparison with the backbone);
* full train step (``pfc_jax.train.Trainer``, bf16 compute) for r50 and
  r100 at 93,431 classes, r = 0.1: samples/s, TFLOP/s and MFU;
* this host's input pipeline: JPEG RecordIO decode + flip + batch, with
  every worker the host has (images/s).

Everything is one JSON line per row as well (``--json FILE``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# Dense bf16 peak TFLOP/s by device kind (vendor figures, without sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v5p": 459.0,
               "TPU v5 lite": 197.0, "TPU v4": 275.0}

FULL = dict(head=[(1_000_000, 1.0), (1_000_000, 0.1), (10_000_000, 1.0), (10_000_000, 0.1)],
            head_batch=1024, dim=512, models=("r50", "r100"), per_device_batch=128,
            classes=93_431, steps=5, images=4096)  # <= 8 min on one H100/H200
SMOKE = dict(head=[(2048, 1.0), (2048, 0.1), (8192, 1.0), (8192, 0.1)],
             head_batch=64, dim=64, models=("r_tiny",), per_device_batch=2,
             classes=512, steps=2, images=128, workers=0)


def peak_tflops(kind: str) -> float | None:
    for name, peak in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return peak
    return None


def _flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def _median_time(fn, steps: int) -> float:
    import numpy as np
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def head_rows(sizes: dict, peak: float | None):
    import jax
    import numpy as np
    import optax

    from pfc_jax import mesh as mesh_lib
    from pfc_jax import partial_fc as pf
    mesh = mesh_lib.make_mesh()
    b, d = sizes["head_batch"], sizes["dim"]
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
    for classes, rate in sizes["head"]:
        head = pf.PartialFC(pf.HeadConfig(num_classes=classes, embedding_dim=d,
                                          sample_rate=rate), mesh, tx)
        state = head.init(jax.random.key(0))
        rng = np.random.default_rng(0)
        x, y = head.shard_batch(rng.normal(size=(b, d)).astype(np.float32),
                                rng.integers(0, classes, b).astype(np.int32))
        key = jax.random.key(1)
        t0 = time.perf_counter()
        compiled = jax.jit(head.apply).lower(state, x, y, key).compile()
        compile_s = time.perf_counter() - t0
        flops = _flops(compiled)
        box = [state]

        def step():
            box[0], g, _ = head.step(box[0], x, y, key)
            jax.block_until_ready(g)

        step()  # the jitted, donating step: its own compile, then warm
        seconds = _median_time(step, sizes["steps"])
        yield _row("head", f"C={classes:,} r={rate:g} B={b}", seconds, compile_s, flops,
                   peak, unit_rate=None)
        box.clear()  # free this table before the next one is built
        del state


def model_rows(sizes: dict, peak: float | None):
    import jax
    import numpy as np

    from pfc_jax import config as config_lib
    from pfc_jax import mesh as mesh_lib
    from pfc_jax import train
    n = jax.device_count()
    batch = sizes["per_device_batch"] * n
    for name in sizes["models"]:
        c = config_lib.sgd_recipe(name, num_classes=sizes["classes"], num_images=10**6,
                                  sample_rate=0.1, batch_size=batch)
        c.model.embedding_dim = sizes["dim"] if name in ("r_tiny", "convnet_tiny") else 512
        mesh = mesh_lib.make_mesh(dict(c.mesh))
        trainer = train.Trainer(c, mesh)
        state = trainer.init(trainer.base_key)
        rng = np.random.default_rng(0)
        batch_arrays = mesh_lib.host_local_to_global(
            {"image": rng.integers(0, 256, (batch, 112, 112, 3), dtype=np.uint8),
             "label": rng.integers(0, sizes["classes"], batch).astype(np.int32),
             "valid": np.ones(batch, bool)}, mesh)
        t0 = time.perf_counter()
        compiled = trainer.train_step.lower(state, batch_arrays).compile()
        compile_s = time.perf_counter() - t0
        flops = _flops(compiled)
        box = [state]

        def step():
            box[0], m = compiled(box[0], batch_arrays)
            jax.block_until_ready(m)

        step()
        seconds = _median_time(step, sizes["steps"])
        yield _row("train step", f"{name} bf16 B={batch}", seconds, compile_s, flops, peak,
                   unit_rate=batch / seconds)
        box.clear()
        del state, trainer


def pipeline_row(sizes: dict):
    from pfc_jax.data.pipeline import PipelineConfig, measure_throughput
    from pfc_jax.data.recordio import RecordIODataset
    from pfc_jax.data.recordio_writer import RecordIOWriter
    from pfc_jax.data.synthetic import SyntheticFaces
    workers = sizes.get("workers", min(16, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        faces = SyntheticFaces(64, max(1, sizes["images"] // 64), seed=0)
        with RecordIOWriter(tmp) as w:
            for i in range(len(faces)):
                rec = faces[i]
                w.add_image(rec["image"], int(rec["label"]))
        source = RecordIODataset(tmp)
        batches = max(1, len(source) // 64 - 1)
        cfg = PipelineConfig(global_batch=64, seed=0, worker_count=workers)
        rate = measure_throughput(source, cfg, num_batches=batches)
    return dict(kind="input pipeline", what=f"JPEG RecordIO, flip, {workers} workers",
                images_per_s=rate)


def _row(kind, what, seconds, compile_s, flops, peak, unit_rate):
    """``flops``: XLA's count for one device's program (SPMD: every device runs
    the same); TFLOP/s is the whole mesh's, MFU per device against its peak."""
    import jax
    n = jax.device_count()
    tflops = flops * n / seconds / 1e12 if flops else None
    mfu = flops / seconds / 1e12 / peak if (flops and peak) else None
    return dict(kind=kind, what=what, seconds=seconds, compile_s=compile_s,
                flops_per_device=flops, tflops=tflops, mfu=mfu, samples_per_s=unit_rate)


def _fmt(row) -> str:
    if row["kind"] == "input pipeline":
        return f"{row['kind']:14s} {row['what']:34s} {row['images_per_s']:>10,.0f} images/s"
    rate = f"{row['samples_per_s']:>8.1f}/s" if row["samples_per_s"] else " " * 10
    tf = f"{row['tflops']:8.3f}" if row["tflops"] is not None else "       -"
    mfu = f"{100 * row['mfu']:6.1f}%" if row["mfu"] is not None else "      -"
    return (f"{row['kind']:14s} {row['what']:34s} {row['seconds']:9.4f} s {rate} "
            f"{tf} TFLOP/s {mfu}  (compile {row['compile_s']:.0f} s)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true",
                    help="toy sizes on 8 emulated CPU devices (what the tests run)")
    ap.add_argument("--json", help="also write the rows here, one JSON object a line")
    args = ap.parse_args(argv)
    sys.path.insert(0, REPO)
    from pfc_jax import platform
    if args.smoke:
        platform.use_cpu(8)
    else:
        platform.choose()
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    import jax
    sizes = SMOKE if args.smoke else FULL
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    peak = None if args.smoke else peak_tflops(kind)
    print(f"device: {jax.device_count()} x {kind} ({dev.platform}); JAX {jax.__version__}; "
          f"bf16 peak {peak or '-'} TFLOP/s per device; host {os.cpu_count()} cores",
          flush=True)
    rows = []
    t0 = time.perf_counter()
    for part in (lambda: head_rows(sizes, peak), lambda: model_rows(sizes, peak),
                 lambda: [pipeline_row(sizes)]):
        for row in part():  # printed as each is measured
            rows.append(row)
            print(_fmt(row), flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            for row in rows:
                f.write(json.dumps(dict(row, device=kind)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
