#!/usr/bin/env python
"""ONNX export of each backbone: export time, file size, difference from pfc_jax, speed.

    .venv/bin/python bench/onnx_export.py                  # r50 r100 mbf vit_t vit_s
    .venv/bin/python bench/onnx_export.py --models mbf      # one
    .venv/bin/python bench/onnx_export.py --insightface     # also insightface's model router

Per backbone, with its initial parameters and, as BatchNorm statistics, those
of the 8 test images (one training-mode pass; from (0, 1) a deep network at
initialisation overflows): the time ``pfc_jax.onnx_export.to_onnx`` takes (trace, translation,
``onnx.checker``), the file's size and node count, the largest difference
between ONNX Runtime's and pfc_jax's L2-normalised embeddings of 8 synthetic
faces at batch 1 and 8, and images/s of each on this CPU at batch 8 (ONNX
Runtime with its default threads; pfc_jax jitted on one device).

``--insightface`` (needs ``pip install insightface``, which brings OpenCV and
scikit-image) loads each file through ``insightface.model_zoo.get_model``,
checks it is taken as a recognition model, and compares its ``get_feat``
(which does the ``(x - 127.5) / 127.5`` and the BGR->RGB itself) with
pfc_jax's embeddings of the same images.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="r50,r100,mbf,vit_t,vit_s")
    ap.add_argument("--insightface", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(HERE))
    from pfc_jax import platform
    platform.use_cpu(1)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import onnxruntime as ort

    from pfc_jax import models, onnx_export
    from pfc_jax.data.augment import normalize
    from pfc_jax.data.synthetic import SyntheticFaces
    from pfc_jax.evaluate import verification
    from pfc_jax.models.iresnet import BN_MOMENTUM

    src = SyntheticFaces(4, 2, seed=3)
    images = np.stack([src[i]["image"] for i in range(8)])
    x = np.asarray(normalize(jnp.asarray(images)))
    x_nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def unit(a):
        return verification.l2_normalize(np.asarray(a, np.float64))

    print(f"JAX {jax.__version__}, ONNX Runtime {ort.__version__}, {os.cpu_count()} cores")
    print(f"{'model':>6} {'export s':>8} {'MB':>6} {'nodes':>6} {'max diff b1':>11} "
          f"{'max diff b8':>11} {'ORT img/s':>9} {'JAX img/s':>9}"
          + (f" {'insightface':>12}" if args.insightface else ""))
    tmp = tempfile.mkdtemp()
    for name in args.models.split(","):
        model = models.get_model(name, conv_impl="conv") if name == "mbf" else \
            models.get_model(name)
        v = jax.jit(lambda k: model.init(k, jnp.zeros((1, 112, 112, 3)), train=False))(
            jax.random.key(0))
        if "batch_stats" in v:  # the running statistics of these images, so nothing explodes
            _, upd = jax.jit(lambda v, x: model.apply(
                v, x, train=True, mutable=["batch_stats"],
                rngs={"dropout": jax.random.key(1)}))(v, x)
            m_ = BN_MOMENTUM  # new = m * old + (1 - m) * batch
            v = dict(v, batch_stats=jax.tree.map(lambda new, old: (new - m_ * old) / (1 - m_),
                                                 upd["batch_stats"], v["batch_stats"]))
        t0 = time.perf_counter()
        m = onnx_export.to_onnx(model, v)
        export_s = time.perf_counter() - t0
        path = os.path.join(tmp, f"{name}.onnx")
        import onnx
        onnx.save(m, path)
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        fn = jax.jit(lambda x: model.apply(v, x, train=False))
        want = unit(fn(x))
        d1 = max(np.abs(unit(sess.run(None, {"input": x_nchw[i:i + 1]})[0]) - want[i]).max()
                 for i in range(len(x)))
        d8 = np.abs(unit(sess.run(None, {"input": x_nchw})[0]) - want).max()

        def rate(f, n=3):
            f()
            t = time.perf_counter()
            for _ in range(n):
                f()
            return n * len(x) / (time.perf_counter() - t)

        ort_rate = rate(lambda: sess.run(None, {"input": x_nchw}))
        jax_rate = rate(lambda: jax.block_until_ready(fn(x)))
        line = (f"{name:>6} {export_s:>8.1f} {os.path.getsize(path) / 2**20:>6.1f} "
                f"{len(m.graph.node):>6} {d1:>11.1e} {d8:>11.1e} {ort_rate:>9.1f} "
                f"{jax_rate:>9.1f}")
        if args.insightface:
            from insightface.model_zoo import get_model
            rec = get_model(path, providers=["CPUExecutionProvider"])
            kind = type(rec).__name__
            bgr = np.ascontiguousarray(images[:, :, :, ::-1])
            feat = rec.get_feat(list(bgr))
            line += f" {kind:>12} {np.abs(unit(feat) - want).max():.1e}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
