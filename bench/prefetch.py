#!/usr/bin/env python
"""Train-loop step time with and without device prefetch, side by side in one run.

    .venv/bin/python bench/prefetch.py                  # r_tiny (demo config) and r50
    .venv/bin/python bench/prefetch.py --models r_tiny  # quicker

The loop is the trainer's: take the next global batch, dispatch the jitted
step, read the previous step's metrics (the trainer's only sync). The batch
comes from the real loader, either placed in the loop (``data.device_prefetch
= 0``, the behaviour before) or by ``DevicePrefetch`` at depth 1 and 2 in a
thread while the step runs. Each model compiles once; the depths take turns
on the same compiled step, ``--rounds`` times, and the table reports the
median step time of each depth over its rounds.

* ``r_tiny``: ``configs/tiny_cpu.py`` as ``make demo`` runs it (synthetic
  identities rendered on the host, no worker processes).
* ``r50``: IResNet-50 at r = 0.1 over 93,431 classes, float32, global batch
  32, fed from a RecordIO file of 112x112 JPEGs written here, one worker.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="r_tiny,r50")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per depth and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--depths", default="0,1,2")
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    from pfc_jax import platform as pfc_platform
    pfc_platform.use_cpu(args.devices)
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)

    import jax
    import numpy as np

    from pfc_jax import config as config_lib
    from pfc_jax import mesh as mesh_lib
    from pfc_jax import train
    from pfc_jax.data.prefetch import DevicePrefetch
    from pfc_jax.data.recordio import RecordIODataset
    from pfc_jax.data.recordio_writer import RecordIOWriter
    from pfc_jax.data.synthetic import SyntheticFaces

    depths = [int(d) for d in args.depths.split(",")]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, JAX {jax.__version__}, "
          f"{args.devices} emulated CPU devices; median step s over {args.rounds} rounds "
          f"of {args.steps} steps")
    print(f"{'model':>7} {'batch':>5} {'workers':>7} "
          + " ".join(f"{'depth ' + str(d):>8}" for d in depths)
          + f" {'depth 0 / best':>14}")
    tmp = tempfile.TemporaryDirectory()
    for name in args.models.split(","):
        if name == "r_tiny":
            spec = importlib.util.spec_from_file_location("tiny", f"{ROOT}/configs/tiny_cpu.py")
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            c = mod.get_config()
            source = train.build_source(c)
        else:
            c = config_lib.sgd_recipe(name, num_classes=93_431, num_images=5_179_510,
                                      sample_rate=0.1)
            c.model.dtype = "float32"
            c.batch_size = 32
            c.data.worker_count = 1
            path = os.path.join(tmp.name, "faces")
            if not os.path.exists(path):
                faces = SyntheticFaces(64, 4, seed=0)
                with RecordIOWriter(path) as w:
                    for i in range(len(faces)):
                        rec = faces[i]
                        w.add_image(rec["image"], int(rec["label"]) * 1459)  # spread labels
            source = RecordIODataset(path)
        mesh = mesh_lib.make_mesh(dict(c.mesh))
        trainer = train.Trainer(c, mesh)
        state = trainer.init(trainer.base_key)

        def put(host):
            return mesh_lib.host_local_to_global(
                {k: host[k] for k in ("image", "label", "valid")}, mesh)

        times = {d: [] for d in depths}
        loader = train.make_loader(c, source)
        for _ in range(args.rounds):
            for d in depths:
                it = DevicePrefetch(iter(loader), put, d)
                pending = None
                for i in range(args.steps + 2):  # two warm-up steps (compile, workers)
                    if i == 2:
                        jax.block_until_ready(state)
                        t0 = time.perf_counter()
                    batch = next(it)
                    state, metrics = trainer.train_step(state, batch)
                    if pending is not None:
                        jax.device_get(pending)
                    pending = metrics
                jax.device_get(pending)
                times[d].append((time.perf_counter() - t0) / args.steps)
                it.close()
        med = {d: float(np.median(t)) for d, t in times.items()}
        best = min(med[d] for d in depths if d > 0) if any(d > 0 for d in depths) else med[0]
        print(f"{name:>7} {c.batch_size:>5} {c.data.worker_count:>7} "
              + " ".join(f"{med[d]:>8.3f}" for d in depths)
              + f" {med.get(0, float('nan')) / best:>14.2f}", flush=True)
        del state, trainer
    tmp.cleanup()


if __name__ == "__main__":
    main()
