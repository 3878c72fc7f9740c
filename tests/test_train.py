"""The trainer end to end on the tiny config: steps, resume, resharding, guards."""

import json
import os

import jax
import numpy as np
import pytest

from pfc_jax import checkpoint as ckpt_lib
from pfc_jax import train
from pfc_jax.config import load_recipe, total_steps


def _config(**overrides):
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny_cpu.py")
    return load_recipe(path, "test", overrides)


def _losses(workdir):
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "train/loss" in rec:
                out[rec["step"]] = rec["train/loss"]
    return out


def test_a_few_steps_write_metrics_and_checkpoints(tmp_path):
    cfg = _config()
    last = train.train_and_evaluate(cfg, str(tmp_path))
    assert np.isfinite(last["loss"]) and last["num_bad_labels"] == 0
    losses = _losses(tmp_path)
    assert sorted(losses) == [1, 2, 3, 4]
    ckpts = ckpt_lib.Checkpoints(str(tmp_path))
    assert ckpts.latest_step() == 4
    assert ckpts.meta(4)["num_classes"] == cfg.head.num_classes
    ckpts.close()
    assert os.path.exists(tmp_path / "config.json")


def test_resume_is_exact(tmp_path):
    """2N steps in one go == N steps, a stop, and N more from the checkpoint."""
    cfg = _config(max_steps=6, **{"checkpoint.every_steps": 3})
    straight = tmp_path / "straight"
    train.train_and_evaluate(cfg, str(straight))
    resumed = tmp_path / "resumed"
    train.train_and_evaluate(cfg, str(resumed), stop_after=3)
    assert sorted(_losses(resumed)) == [1, 2, 3]
    train.train_and_evaluate(cfg, str(resumed))
    a, b = _losses(straight), _losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]


def test_checkpoint_from_8_devices_restores_on_4(tmp_path):
    cfg8 = _config(max_steps=4, **{"checkpoint.every_steps": 2})
    train.train_and_evaluate(cfg8, str(tmp_path / "a"), stop_after=2)
    cfg4 = _config(max_steps=4, mesh_devices=4, **{"checkpoint.every_steps": 2})
    # Same run, finished on 4 devices; compare with finishing on 8.
    import shutil
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    train.train_and_evaluate(cfg8, str(tmp_path / "a"))
    train.train_and_evaluate(cfg4, str(tmp_path / "b"))
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    np.testing.assert_allclose([a[3], a[4]], [b[3], b[4]], rtol=2e-4)


def test_labels_beyond_num_classes_stop_before_step_one(tmp_path):
    cfg = _config(**{"head.num_classes": 32})  # the synthetic source has 64 identities
    with pytest.raises(ValueError, match="label"):
        train.train_and_evaluate(cfg, str(tmp_path))
    assert not os.path.exists(tmp_path / "metrics.jsonl") or not _losses(tmp_path)


def test_divergence_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    # Normalised embeddings and BN make the model hard to blow up with a large
    # finite rate; an infinite one turns the parameters into inf/NaN at once.
    cfg = _config(max_steps=8, **{"checkpoint.every_steps": 2, "optimizer.lr": float("inf"),
                                   "optimizer.grad_clip": 0.0, "optimizer.warmup_epochs": 0.0,
                                   "optimizer.schedule": "constant"})
    with pytest.raises(train.TrainingDiverged, match=r"step \d+") as err:
        train.train_and_evaluate(cfg, str(tmp_path))
    bad_step = int(err.value.args[0].split()[1].rstrip(":"))
    ckpts = ckpt_lib.Checkpoints(str(tmp_path))
    good = ckpts.latest_step()
    ckpts.close()
    assert good is None or good < bad_step
    if good is not None:
        assert f"step {good}" in str(err.value)


def test_bad_config_is_explained():
    cfg = _config(batch_size=12)
    with pytest.raises(ValueError, match="batch_size 12 is not divisible by the 8"):
        train.train_and_evaluate(cfg, "/nonexistent/never-created")
    cfg = _config(**{"model.name": "r999"})
    with pytest.raises(ValueError, match="unknown backbone"):
        train.train_and_evaluate(cfg, "/nonexistent/never-created")
    cfg = _config(**{"data.kind": "recordio"})
    with pytest.raises(ValueError, match="data.path is required"):
        train.train_and_evaluate(cfg, "/nonexistent/never-created")


def test_gradient_accumulation_equals_the_large_batch():
    """Two micro-batches sharing one sampled class set == one batch (BN-free backbone)."""
    cfg1 = _config(**{"model.name": "convnet_tiny"})
    cfg2 = _config(grad_accum_steps=2, **{"model.name": "convnet_tiny"})
    mesh = train.make_mesh(cfg1)
    t1, t2 = train.Trainer(cfg1, mesh), train.Trainer(cfg2, mesh)
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (16, 112, 112, 3), dtype=np.uint8),
             "label": rng.integers(0, cfg1.head.num_classes, 16).astype(np.int32),
             "valid": np.ones(16, bool)}
    from pfc_jax import mesh as mesh_lib
    gbatch = mesh_lib.host_local_to_global(batch, mesh)
    s1, m1 = t1.train_step(t1.init(t1.base_key), gbatch)
    s2, m2 = t2.train_step(t2.init(t2.base_key), gbatch)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(s1.head.centers), np.asarray(s2.head.centers),
                               rtol=1e-4, atol=1e-6)


def test_loss_falls_on_synthetic_identities(tmp_path):
    cfg = _config(max_steps=40, **{"optimizer.lr": 0.2, "checkpoint.every_steps": 1000,
                                   "log_every_steps": 1})
    assert total_steps(cfg) == 40
    train.train_and_evaluate(cfg, str(tmp_path))
    losses = _losses(tmp_path)
    first = np.mean([losses[s] for s in range(1, 6)])
    last = np.mean([losses[s] for s in range(36, 41)])
    assert last < first - 1.0, (first, last)
