"""bench/gpu.sh, the prepared accelerator run, runs unchanged on the CPU mesh."""

import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_bench_smoke_prints_every_row(tmp_path):
    out = tmp_path / "rows.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "PFC_"))}
    env.update(PYTHON=sys.executable, JAX_PLATFORMS="cpu")
    proc = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu.sh"), "--smoke",
                           "--json", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    kinds = [r["kind"] for r in rows]
    assert kinds == ["head"] * 4 + ["train step", "input pipeline"], kinds
    assert "device: 8 x cpu" in proc.stdout
    for r in rows[:-1]:
        assert np.isfinite(r["seconds"]) and r["seconds"] > 0, r
        assert r["flops_per_device"] and r["tflops"] > 0, r
        assert r["mfu"] is None  # no peak is claimed for an emulated CPU
    b, d, block = 64, 64, 256
    for r, (c, rate) in zip(rows[:4], [(2048, 1.0), (2048, 0.1), (8192, 1.0), (8192, 0.1)]):
        # The head's model FLOPs: its three [B, Ns] x [Ns, D] matmuls on one
        # device's share of the classes (the whole batch: one group), 2 FLOPs
        # a product; Ns = ceil(r C / 8), at least min(B, C / 8).
        ns = max(int(np.ceil(rate * c / 8)), min(b, c // 8))
        assert r["flops_per_device"] == 3 * 2 * b * ns * d, (r, ns)
        assert r["blocks"] == -(-ns // block), r
        if r["blocks"] > 1:  # XLA counts the block loop's body once: not exact
            assert r["xla_exact"] is False, r
    assert rows[2]["blocks"] == 4  # the smoke sizes reach the blockwise loop
    # The train step: the backbone's own (loop-free, exact) count plus the head's.
    train_row = rows[4]
    assert train_row["xla_exact"] and train_row["backbone_flops"] > 0, train_row
    assert train_row["flops_per_device"] > train_row["backbone_flops"], train_row
    assert train_row["samples_per_s"] > 0 and rows[5]["images_per_s"] > 0
    assert len(proc.stdout.strip().splitlines()) == 1 + len(rows) + 1  # header, rows, total
