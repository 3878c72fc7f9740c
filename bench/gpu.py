"""One accelerator, one table: head step, full train step and input pipeline.

    bash bench/gpu.sh            # on a GPU (or TPU) host: <= 8 minutes on one H100/H200
    bash bench/gpu.sh --smoke    # the same code at toy sizes on 8 emulated CPU devices

Rows, each measured as the median of a few steps after compiling:

* head step (``PartialFC.step``: sampling, margin softmax, backward, lazy
  SGD+momentum row update) at 1M and 10M classes, r = 1 and r = 0.1, D = 512,
  global batch 1024: seconds per step, TFLOP/s from the step's model FLOPs
  (its three matmuls, 6 B Ns D over the mesh; XLA's own count takes the
  blockwise loop's body once, ``xla_cost``), and MFU against one card's
  dense bf16 peak
  (``PEAK_TFLOPS``; the head computes in float32, so its MFU is bounded by
  the float32 rate and is quoted for comparison with the backbone);
* full train step (``pfc_jax.train.Trainer``, bf16 compute) for r50 and
  r100 at 93,431 classes, r = 0.1: samples/s, TFLOP/s and MFU, the FLOPs
  being XLA's count of the backbone's forward and backward (a program with
  no loops, so the count is exact; else none is claimed) plus the head's
  model FLOPs;
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
sys.path.insert(0, HERE)

from xla_cost import cost as xla_cost  # noqa: E402
from xla_cost import median_seconds  # noqa: E402

# Dense bf16 peak TFLOP/s by device kind (vendor figures, without sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v5p": 459.0,
               "TPU v5 lite": 197.0, "TPU v4": 275.0}

FULL = dict(head=[(1_000_000, 1.0), (1_000_000, 0.1), (10_000_000, 1.0), (10_000_000, 0.1)],
            head_batch=1024, dim=512, models=("r50", "r100"), per_device_batch=128,
            classes=93_431, steps=5, images=4096)  # <= 8 min on one H100/H200
# The smoke head takes blocks of 256 columns, so its r = 1 rows run the
# blockwise loop the full sizes run (8,192 classes: 4 blocks a device).
SMOKE = dict(head=[(2048, 1.0), (2048, 0.1), (8192, 1.0), (8192, 0.1)], head_block=256,
             head_batch=64, dim=64, models=("r_tiny",), per_device_batch=2,
             classes=512, steps=2, images=128, workers=0)


def peak_tflops(kind: str) -> float | None:
    for name, peak in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return peak
    return None


def head_model_flops(head, global_batch: int) -> float:
    """One device's model FLOPs of a head step: the forward logits, the embedding
    gradient and the centre gradient, 2 Bg Ns K D each (Bg: its group's batch)."""
    cfg = head.config
    group_batch = global_batch * head.num_shards // head.mesh.size
    return 6.0 * group_batch * head.num_sampled(global_batch) * cfg.num_subcenters \
        * cfg.embedding_dim


def backbone_cost(trainer, state, images) -> dict:
    """XLA's count for the backbone's forward and backward (train mode) on ``images``."""
    import jax
    import jax.numpy as jnp

    def fwd_bwd(params, batch_stats, images):
        def forward(p):
            emb, _ = trainer.model.apply({"params": p, "batch_stats": batch_stats}, images,
                                         train=True, mutable=["batch_stats"],
                                         rngs={"dropout": jax.random.key(0)})
            return emb
        emb, vjp = jax.vjp(forward, params)
        return vjp(jnp.ones_like(emb))

    x = jax.tree.map(lambda a: a.astype(jnp.float32), images)
    return xla_cost(jax.jit(fwd_bwd).lower(state.params, state.batch_stats, x).compile())


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
                                          sample_rate=rate,
                                          block_size=sizes.get("head_block", 0)), mesh, tx)
        state = head.init(jax.random.key(0))
        rng = np.random.default_rng(0)
        x, y = head.shard_batch(rng.normal(size=(b, d)).astype(np.float32),
                                rng.integers(0, classes, b).astype(np.int32))
        key = jax.random.key(1)
        t0 = time.perf_counter()
        compiled = jax.jit(head.apply).lower(state, x, y, key).compile()
        compile_s = time.perf_counter() - t0
        counted = xla_cost(compiled)
        box = [state]

        def step():
            box[0], g, _ = head.step(box[0], x, y, key)
            jax.block_until_ready(g)

        # the jitted, donating step: its own compile in the warm-up call
        seconds = median_seconds(step, sizes["steps"])
        _, block = head.softmax_plan(b)
        yield dict(_row("head", f"C={classes:,} r={rate:g} B={b}", seconds, compile_s,
                        head_model_flops(head, b), peak, unit_rate=None),
                   xla_flops=counted["flops"], xla_exact=counted["exact"],
                   blocks=-(-head.num_sampled(b) // block))
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
        backbone = backbone_cost(trainer, state, batch_arrays["image"])
        flops = None
        if backbone["exact"] and backbone["flops"]:
            flops = backbone["flops"] + head_model_flops(trainer.head, batch)
        box = [state]

        def step():
            box[0], m = compiled(box[0], batch_arrays)
            jax.block_until_ready(m)

        seconds = median_seconds(step, sizes["steps"])
        yield dict(_row("train step", f"{name} bf16 B={batch}", seconds, compile_s, flops,
                        peak, unit_rate=batch / seconds),
                   backbone_flops=backbone["flops"], xla_exact=backbone["exact"])
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
    """``flops``: one device's FLOPs of the step (SPMD: every device runs the
    same); TFLOP/s is the whole mesh's, MFU per device against its peak."""
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
