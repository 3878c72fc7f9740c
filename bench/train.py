#!/usr/bin/env python
"""Full train-step throughput and input-pipeline throughput, on this machine.

    .venv/bin/python bench/train.py                 # mbf and r50 steps, pipeline 0/1/2 workers
    .venv/bin/python bench/train.py --models mbf    # quicker
    .venv/bin/python bench/train.py --no-pipeline --reference-dir DIR
        # beside arcface_torch's own backbones (DIR: its recognition/arcface_torch)

Step: the real jitted train step (backbone forward/backward, Partial FC head
at r = 0.1 over 93,431 classes as in MS1MV3, SGD, lazy row updates) on the
emulated CPU mesh, float32, after compilation.

Reference: with ``--reference-dir``, the same backbones from an unmodified
``arcface_torch`` checkout (``backbones.get_model``), float32, in PyTorch on
as many threads as this machine has cores, forward, backward and SGD
(momentum 0.9, weight decay 5e-4) on a loss of the embeddings, no head, in
a child process of their own, timed in the same run: a lower bound on the
reference's full step, against pfc_jax's full step with its head.

Pipeline: a RecordIO file of 112x112 JPEGs (written here from synthetic
identities), read, decoded, augmented (flip, and the reference's optional
augmentations in a second row) and batched by the grain pipeline, per worker
count. The last column says how many workers one host needs to feed the
measured step rate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from xla_cost import median_seconds

HERE = os.path.dirname(os.path.abspath(__file__))


def reference_child(cfg: dict) -> dict:
    """``arcface_torch``'s own backbone: forward, backward and SGD, no head."""
    import torch

    torch.set_num_threads(cfg["threads"])
    sys.path.insert(0, cfg["reference_dir"])
    from backbones import get_model

    torch.manual_seed(0)
    net = get_model(cfg["model"], fp16=False, num_features=512).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(cfg["batch"], 3, 112, 112)

    def step():
        loss = net(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    step_s = median_seconds(step, cfg["steps"])
    return dict(cfg, step_s=step_s, torch=torch.__version__,
                threads=torch.get_num_threads())


def run_reference(reference_dir: str, model: str, batch: int, steps: int) -> dict:
    cfg = dict(reference_dir=os.path.abspath(reference_dir), model=model, batch=batch,
               steps=steps, threads=os.cpu_count())
    out = subprocess.run([sys.executable, __file__, "--reference-child", json.dumps(cfg)],
                         capture_output=True, text=True)
    if out.returncode:
        return dict(cfg, error=(out.stderr.strip().splitlines() or ["?"])[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mbf,r50",
                    help="backbones, each NAME or NAME:CONV_IMPL (mbf:conv, mbf:shifted)")
    ap.add_argument("--no-pipeline", action="store_true", help="only the train step")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32, help="global batch for the step")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--images", type=int, default=512, help="images in the pipeline test file")
    ap.add_argument("--reference-dir", metavar="DIR",
                    help="an arcface_torch checkout: time its own backbones beside these")
    ap.add_argument("--reference-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.reference_child:
        print(json.dumps(reference_child(json.loads(args.reference_child))))
        return
    if args.reference_dir and not os.path.isfile(
            os.path.join(args.reference_dir, "backbones", "iresnet.py")):
        sys.exit(f"--reference-dir {args.reference_dir}: no backbones/iresnet.py there")
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
        box = [state]

        def step():
            box[0], m = compiled(box[0], batch)
            jax.block_until_ready(m)

        step_s = median_seconds(step, args.steps)
        step_rates[spec] = args.batch / step_s
        print(f"{spec:>12} {compile_s:>9.1f} {step_s:>8.3f} {args.batch / step_s:>10.1f}",
              flush=True)
        del state, box, compiled, trainer
    if args.reference_dir:
        print(f"\narcface_torch's own backbones (forward, backward, SGD; no head), "
              f"float32, batch {args.batch}")
        print(f"{'model':>12} {'step s':>8} {'samples/s':>10} {'pfc_jax / reference':>20}")
        for spec in dict.fromkeys(s.partition(":")[0] for s in args.models.split(",")):
            ref = run_reference(args.reference_dir, spec, args.batch, args.steps)
            if "error" in ref:
                print(f"{spec:>12} failed: {ref['error']}", flush=True)
                continue
            rate = args.batch / ref["step_s"]
            ours = max((r for k, r in step_rates.items() if k.partition(":")[0] == spec),
                       default=float("nan"))
            print(f"{spec:>12} {ref['step_s']:>8.3f} {rate:>10.1f} {ours / rate:>19.2f}x"
                  f"   (torch {ref['torch']}, {ref['threads']} threads)", flush=True)
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
