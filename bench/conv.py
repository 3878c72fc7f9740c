#!/usr/bin/env python
"""Convolution forms on the CPU, layer by layer, side by side in one run.

    .venv/bin/python bench/conv.py            # one device, batch 32
    .venv/bin/python bench/conv.py --batch 4  # one emulated device's share of 32 over 8

For each of MobileFaceNet's and IResNet-50's convolution shapes: forward and
backward (input and kernel gradients) of the bare convolution, timed as

* ``xla``: ``lax.conv_general_dilated`` with XLA's own gradients
  (``conv_impl=conv``);
* ``whole``: ``grouped_conv``'s CPU form over the whole batch in one piece
  (taps; for dense kernels XLA's forward and input gradient and the kernel
  gradient by taps);
* ``chunks``: the same over chunks of ``chunk_size`` images in a loop (what
  ``conv_impl=auto`` runs on a one-device CPU process).

Prints milliseconds, GFLOP/s of the convolution's own arithmetic (forward,
input gradient, kernel gradient: 3x the forward's multiply-adds) and the
ratios xla/chunks and whole/chunks. Median of ``--reps`` after one warm call.
"""

from __future__ import annotations

import argparse
import os
import sys

from xla_cost import median_seconds

HERE = os.path.dirname(os.path.abspath(__file__))

# (name, spatial, in channels, out channels, kernel, stride, groups)
LAYERS = [
    ("mbf stem_dw", 56, 128, 128, 3, 1, 64),
    ("mbf depthwise 56 s2", 56, 128, 128, 3, 2, 128),
    ("mbf depthwise 28", 28, 128, 128, 3, 1, 128),
    ("mbf depthwise 14", 14, 256, 256, 3, 1, 256),
    ("mbf GDC 7x7", 7, 512, 512, 7, 1, 512),
    ("r50 56x56x64", 56, 64, 64, 3, 1, 1),
    ("r50 28x28x128", 28, 128, 128, 3, 1, 1),
    ("r50 14x14x256", 14, 256, 256, 3, 1, 1),
    ("r50 7x7x512", 7, 512, 512, 3, 1, 1),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--layers", default="", help="comma-separated name substrings")
    ap.add_argument("--no-xla", action="store_true",
                    help="skip XLA's grouped convolutions (stem_dw's alone takes a minute a call)")
    args = ap.parse_args()

    sys.path.insert(0, os.path.dirname(HERE))
    from pfc_jax import platform
    platform.use_cpu(1)
    import jax
    import jax.numpy as jnp

    from pfc_jax.models import grouped_conv as gc

    def median_ms(fn, *a) -> float:
        return 1e3 * median_seconds(lambda: jax.block_until_ready(fn(*a)), args.reps)

    b = args.batch
    print(f"one CPU device, {os.cpu_count()} cores, JAX {jax.__version__}, batch {b}, float32; "
          f"forward + input and kernel gradients")
    print(f"{'layer':>20} {'chunk':>5} | {'xla ms':>8} {'whole ms':>8} {'chunks ms':>9} | "
          f"{'GFLOP/s xla':>11} {'whole':>6} {'chunks':>6} | {'xla/chunks':>10} "
          f"{'whole/chunks':>12}")
    wanted = [s for s in args.layers.split(",") if s]
    for name, hw, cin, cout, k, s, groups in LAYERS:
        if wanted and not any(w in name for w in wanted):
            continue
        p = (k - 1) // 2 if k == 3 else 0
        pad = ((p, p), (p, p))
        keys = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(keys[0], (b, hw, hw, cin))
        w = jax.random.normal(keys[1], (k, k, cin // groups, cout))
        ho = (hw + 2 * p - k) // s + 1
        r = jax.random.normal(keys[2], (b, ho, ho, cout))
        chunk = gc.chunk_size(x.shape, 4)

        def xla(x, w):  # what conv_impl=conv runs
            return gc._conv(x, w, s, pad, groups)

        def cpu_form(c):
            if groups == 1:
                return lambda x, w: gc.dense_conv(x, w, s, pad, c)
            return lambda x, w: gc.shifted_conv(x, w, s, pad, groups, c)

        ms = []
        for f in (xla, cpu_form(b), cpu_form(chunk)):
            if f is xla and args.no_xla and groups > 1:
                ms.append(float("nan"))
                continue
            step = jax.jit(jax.grad(lambda x, w, f=f: jnp.vdot(f(x, w), r), argnums=(0, 1)))
            ms.append(median_ms(step, x, w))
        flops = 3 * 2 * b * ho * ho * cout * k * k * (cin // groups)
        rates = [flops / (t * 1e-3) / 1e9 for t in ms]
        print(f"{name:>20} {chunk:>5} | {ms[0]:8.1f} {ms[1]:8.1f} {ms[2]:9.1f} | "
              f"{rates[0]:11.1f} {rates[1]:6.1f} {rates[2]:6.1f} | {ms[0] / ms[2]:9.2f}x "
              f"{ms[1] / ms[2]:11.2f}x", flush=True)


if __name__ == "__main__":
    main()
