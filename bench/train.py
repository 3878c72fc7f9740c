#!/usr/bin/env python
"""Full train-step throughput and input-pipeline throughput, on this machine.

    .venv/bin/python bench/train.py                 # mbf and r50 steps, pipeline 0/1/2 workers
    .venv/bin/python bench/train.py --models mbf    # quicker

Step: the real jitted train step (backbone forward/backward, Partial FC head
at r = 0.1 over 93,431 classes as in MS1MV3, SGD, lazy row updates) on the
emulated CPU mesh, float32, after compilation.

Pipeline: a RecordIO file of 112x112 JPEGs (written here from synthetic
identities), read, decoded, augmented (flip, and the reference's optional
augmentations in a second row) and batched by the grain pipeline, per worker
count. The last column says how many workers one host needs to feed the
measured step rate.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mbf,r50",
                    help="backbones, each NAME or NAME:CONV_IMPL (mbf:conv, mbf:shifted)")
    ap.add_argument("--no-pipeline", action="store_true", help="only the train step")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32, help="global batch for the step")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--images", type=int, default=512, help="images in the pipeline test file")
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(HERE))
    from pfc_jax import platform as pfc_platform
    pfc_platform.use_cpu(args.devices)  # before JAX starts
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)

    import jax
    import numpy as np

    from pfc_jax import config as config_lib
    from pfc_jax import mesh as mesh_lib
    from pfc_jax import train
    from pfc_jax.data.augment import AugmentConfig
    from pfc_jax.data.pipeline import PipelineConfig, measure_throughput
    from pfc_jax.data.recordio import RecordIODataset
    from pfc_jax.data.recordio_writer import RecordIOWriter
    from pfc_jax.data.synthetic import SyntheticFaces

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, JAX {jax.__version__}, "
          f"{args.devices} emulated CPU devices")
    print(f"\nfull train step (float32, global batch {args.batch}, 93,431 classes, r=0.1)")
    print(f"{'model':>12} {'compile s':>9} {'step s':>8} {'samples/s':>10}")
    step_rates = {}
    for spec in args.models.split(","):
        name, _, impl = spec.partition(":")
        c = config_lib.sgd_recipe(name, num_classes=93_431, num_images=5_179_510,
                                  sample_rate=0.1)
        c.model.dtype = "float32"
        c.model.conv_impl = impl or "auto"
        c.batch_size = args.batch
        mesh = mesh_lib.make_mesh(dict(c.mesh))
        trainer = train.Trainer(c, mesh)
        state = trainer.init(trainer.base_key)
        rng = np.random.default_rng(0)
        batch = mesh_lib.host_local_to_global(
            {"image": rng.integers(0, 256, (args.batch, 112, 112, 3), dtype=np.uint8),
             "label": rng.integers(0, 93_431, args.batch).astype(np.int32),
             "valid": np.ones(args.batch, bool)}, mesh)
        t0 = time.perf_counter()
        compiled = trainer.train_step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            state, m = compiled(state, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t)
        step_s = float(np.median(times))
        step_rates[spec] = args.batch / step_s
        print(f"{spec:>12} {compile_s:>9.1f} {step_s:>8.3f} {args.batch / step_s:>10.1f}",
              flush=True)
        del state, compiled, trainer
    if args.no_pipeline:
        return

    with tempfile.TemporaryDirectory() as tmp:
        faces = SyntheticFaces(64, max(1, args.images // 64), seed=0)
        with RecordIOWriter(tmp) as w:
            for i in range(len(faces)):
                rec = faces[i]
                w.add_image(rec["image"], int(rec["label"]))
        source = RecordIODataset(tmp)
        print(f"\ninput pipeline: {len(source)} JPEG records, decode + augment + batch 64")
        print(f"{'augment':>8} {'workers':>7} {'images/s':>9} {'per worker':>10}  workers needed for")
        rows = [("flip", AugmentConfig()), ("dali", AugmentConfig.dali())]
        for label, aug in rows:
            for workers in (0, 1, 2):
                cfg = PipelineConfig(global_batch=64, seed=0, worker_count=workers, augment=aug)
                rate = measure_throughput(source, cfg, num_batches=max(4, len(source) // 64))
                per = rate / max(workers, 1)
                need = ", ".join(f"{n} {max(1, int(np.ceil(r / per)))}"
                                 for n, r in step_rates.items())
                print(f"{label:>8} {workers:>7} {rate:>9.0f} {per:>10.0f}  {need}", flush=True)


if __name__ == "__main__":
    main()
