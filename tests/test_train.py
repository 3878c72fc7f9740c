"""The trainer end to end on the tiny config: steps, resume, resharding, guards."""

import json
import os

import jax
import numpy as np
import pytest

from pfc_jax import checkpoint as ckpt_lib
from pfc_jax import train
from pfc_jax.config import load_recipe, total_steps
from tolerances import batch_change_rtol


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
    assert [a[1], a[2]] == [b[1], b[2]], "the records up to the checkpoint are the same run's"
    # Steps 3-4 sum in another order on 4 devices (see tests/tolerances.py).
    np.testing.assert_allclose([a[3], a[4]], [b[3], b[4]], rtol=batch_change_rtol(a))


def test_labels_beyond_num_classes_stop_before_step_one(tmp_path):
    cfg = _config(**{"head.num_classes": 32})  # the synthetic source has 64 identities
    with pytest.raises(ValueError, match="label"):
        train.train_and_evaluate(cfg, str(tmp_path))
    assert not os.path.exists(tmp_path / "metrics.jsonl") or not _losses(tmp_path)


def _restored(cfg, workdir, step):
    """The checkpoint of ``step`` as numpy leaves, restored on the config's mesh."""
    trainer = train.Trainer(cfg, train.make_mesh(cfg))
    ckpts = ckpt_lib.Checkpoints(str(workdir))
    try:
        state = ckpts.restore(step, trainer.abstract_state, None)
    finally:
        ckpts.close()
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def _files(directory):
    import hashlib
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_divergence_after_a_checkpoint_keeps_it_intact(tmp_path):
    """A run resumed from step 4 with a broken learning rate diverges at step 5, saving nothing.

    The loss of step 5 is computed before its update and is finite; the state
    after it is not (lr = inf), so the check must look at the update too, or
    a checkpoint of NaN parameters would be saved as "good" at step 5.
    """
    good = _config(max_steps=8, **{"checkpoint.every_steps": 2, "optimizer.warmup_epochs": 0.0,
                                    "optimizer.schedule": "constant", "optimizer.lr": 0.01})
    train.train_and_evaluate(good, str(tmp_path), stop_after=4)
    saved = _restored(good, tmp_path, 4)
    files = _files(tmp_path / "checkpoints" / "4")
    assert all(np.isfinite(x).all() for x in saved if x.dtype.kind == "f")

    bad = _config(max_steps=8, **{"checkpoint.every_steps": 1, "optimizer.warmup_epochs": 0.0,
                                   "optimizer.schedule": "constant",
                                   "optimizer.lr": float("inf")})
    with pytest.raises(train.TrainingDiverged,
                       match=r"^step 5: .*not finite: .*update_norm.*this step's state is not "
                             r"saved \(the last good checkpoint is step 4\)"):
        train.train_and_evaluate(bad, str(tmp_path))
    ckpts = ckpt_lib.Checkpoints(str(tmp_path))
    assert ckpts.manager.all_steps() == [2, 4]
    ckpts.close()
    assert _files(tmp_path / "checkpoints" / "4") == files
    for a, b in zip(saved, _restored(good, tmp_path, 4)):
        np.testing.assert_array_equal(a, b)
    assert sorted(_losses(tmp_path)) == [1, 2, 3, 4], "metrics after the checkpoint were kept"


def test_a_checkpoint_restores_every_leaf_bit_for_bit(tmp_path):
    """Saved state == restored state: params, BN statistics, optimizer states, the
    sharded table and its rows' optimizer state, the step, and the input position."""
    cfg = _config()
    trainer = train.Trainer(cfg, train.make_mesh(cfg))
    loader = train.make_loader(cfg, train.build_source(cfg))
    it = iter(loader)
    from pfc_jax import mesh as mesh_lib
    state = trainer.init(trainer.base_key)
    for _ in range(2):
        host = next(it)
        state, _ = trainer.train_step(state, mesh_lib.host_local_to_global(
            {k: host[k] for k in ("image", "label", "valid")}, trainer.mesh))
    saved = [np.asarray(x) for x in jax.tree.leaves(state)]
    position = it.get_state()
    ckpts = ckpt_lib.Checkpoints(str(tmp_path), async_save=True)
    ckpts.save(2, state, it, {"padded_classes": trainer.head.padded_classes})
    ckpts.close()
    assert len(saved) > 10 and any(x.shape == trainer.head.table_shape for x in saved)

    fresh = iter(train.make_loader(cfg, train.build_source(cfg)))
    ckpts = ckpt_lib.Checkpoints(str(tmp_path))
    restored = ckpts.restore(2, trainer.abstract_state, fresh)
    ckpts.close()
    leaves = jax.tree.leaves(restored)
    assert len(leaves) == len(saved)
    for a, b, sharding in zip(saved, leaves, jax.tree.leaves(trainer.state_shardings)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, np.asarray(b))
        assert b.sharding.is_equivalent_to(sharding, b.ndim)
    assert fresh.get_state() == position
    np.testing.assert_array_equal(next(fresh)["label"], next(it)["label"])


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
    cfg = _config(**{"eval.batch_size": 12})
    with pytest.raises(ValueError, match=r"eval.batch_size 12 is not divisible by the 8 devices"
                                         r".*--config.eval.batch_size=64"):
        train.train_and_evaluate(cfg, "/nonexistent/never-created")


def test_every_head_field_is_set_from_the_trainer_config_under_its_own_name():
    import dataclasses

    from pfc_jax import partial_fc as pf
    from pfc_jax.config import base_config
    fields = {f.name for f in dataclasses.fields(pf.HeadConfig)} - {"embedding_dim"}
    assert fields == set(base_config().head), "config.head and HeadConfig differ"
    # A value unlike every default, per field, through the dotted overrides.
    changed = {"num_classes": 77, "num_subcenters": 3, "sample_rate": 0.25, "scale": 30.0,
               "margins": (1.0, 0.0, 0.35), "grad_mode": "straight_through",
               "filter_threshold": 0.75, "filter_mode": "zero", "matmul_dtype": "bfloat16",
               "row_update": "dense", "sampler": "topk", "init_std": 0.02,
               "softmax": "blockwise", "block_size": 256, "logits_budget_mib": 8.0,
               "cosine_stash_mib": 64.0, "block_budget_mib": 4.0, "fused_update": False}
    assert set(changed) == fields
    cfg = _config(**{f"head.{k}": v for k, v in changed.items()}, **{"model.embedding_dim": 96})
    head = train.head_config(cfg)
    defaults = pf.HeadConfig(num_classes=1)
    for name, value in changed.items():
        assert getattr(head, name) == value and getattr(defaults, name) != value, name
    assert head.embedding_dim == 96
    # An older run's config.json without the newer fields: HeadConfig's defaults.
    del cfg.head["init_std"], cfg.head["fused_update"]
    head = train.head_config(cfg)
    assert head.init_std == defaults.init_std and head.fused_update == defaults.fused_update


def test_eval_batch_size_defaults_to_a_multiple_of_the_devices():
    from pfc_jax.config import eval_batch_size, validate
    assert [eval_batch_size(None, n) for n in (1, 8, 48, 64, 128, 6144)] == \
        [64, 64, 96, 64, 128, 6144]
    assert eval_batch_size(24, 8) == 24
    cfg = _config(batch_size=128, **{"eval.batch_size": None})
    validate(cfg, 128)  # unset: fine on any device count
    cfg.eval.batch_size = 64
    with pytest.raises(ValueError, match="eval.batch_size 64 is not divisible by the 128"):
        validate(cfg, 128)


def test_gradient_accumulation_equals_the_large_batch():
    """Two micro-batches sharing one sampled class set == one batch (BN-free backbone),
    for the whole-logits head and for the blockwise head with its fused row update."""
    model = {"model.name": "convnet_tiny"}
    blocked = {"head.softmax": "blockwise", "head.block_size": 3}
    cfg1 = _config(**model, **{"head.softmax": "full"})
    cfg2 = _config(grad_accum_steps=2, **model)
    cfg3 = _config(**model, **blocked)
    mesh = train.make_mesh(cfg1)
    t1, t2, t3 = (train.Trainer(c, mesh) for c in (cfg1, cfg2, cfg3))
    assert not t1.head.fuses_update(16) and t3.head.fuses_update(16)
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (16, 112, 112, 3), dtype=np.uint8),
             "label": rng.integers(0, cfg1.head.num_classes, 16).astype(np.int32),
             "valid": np.ones(16, bool)}
    from pfc_jax import mesh as mesh_lib
    gbatch = mesh_lib.host_local_to_global(batch, mesh)
    s2, m2 = t2.train_step(t2.init(t2.base_key), gbatch)
    for t in (t1, t3):
        s1, m1 = t.train_step(t.init(t.base_key), gbatch)
        np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
        np.testing.assert_allclose(float(m1["row_grad_norm"]), float(m2["row_grad_norm"]),
                                   rtol=1e-5)
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


def test_training_top1_is_the_nearest_sampled_centre_without_the_margin():
    """top1 == a float64 count of samples whose own centre has the largest plain
    cosine among the sampled classes; margin_top1 counts margin logits instead."""
    # 400 classes, 50 per device: 16 of them sampled per device (the batch size).
    cfg = _config(**{"model.name": "convnet_tiny", "head.num_classes": 400})
    t = train.Trainer(cfg, train.make_mesh(cfg))
    rng = np.random.default_rng(3)
    labels = rng.choice(cfg.head.num_classes, 16, replace=False).astype(np.int32)
    batch = {"image": rng.integers(0, 256, (16, 112, 112, 3), dtype=np.uint8),
             "label": labels, "valid": np.ones(16, bool)}
    from pfc_jax import mesh as mesh_lib
    gbatch = mesh_lib.host_local_to_global(batch, t.mesh)
    state = t.init(t.base_key)
    # BN-free backbone, no dropout: the eval embedding is the train step's.
    emb = np.asarray(t.embedder.apply({"params": state.params, "batch_stats": state.batch_stats},
                                     gbatch["image"]), np.float64)
    centers = np.asarray(state.head.centers, np.float64).copy()
    # Nine centres moved towards their samples by different amounts: some beat
    # every negative only without the margin.
    unit = emb[:9] / np.linalg.norm(emb[:9], axis=1, keepdims=True)
    noise = rng.standard_normal(unit.shape)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    a = np.linspace(0.3, 1.0, 9)[:, None]
    centers[labels[:9], 0] = a * unit + (1 - a) * noise
    state = state.replace(head=state.head._replace(centers=jax.device_put(
        centers.astype(np.float32), state.head.centers.sharding)))
    k_sample, _ = jax.random.split(jax.random.fold_in(t.base_key, 0))
    sampled = t.head.sampled_classes(jax.jit(t.head.sample)(gbatch["label"], k_sample))
    assert len(sampled) < cfg.head.num_classes, "sampling is off: a weak check"
    _, m = t.train_step(state, gbatch)

    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    w = centers[sampled, 0] / np.linalg.norm(centers[sampled, 0], axis=1, keepdims=True)
    cos = x @ w.T
    own = sampled[None, :] == labels[:, None]
    gap = cos[own] - np.where(own, -2.0, cos).max(axis=1)
    m3, s = cfg.head.margins[2], cfg.head.scale
    # float32 in the step may order near-ties either way: there must be none.
    assert np.all(np.abs(gap) > 1e-5) and np.all(np.abs(gap - m3) > 1e-5), gap
    expect = float(np.mean(gap > 0))
    assert 0 < expect < 1
    assert float(m["top1"]) == expect
    # CosFace lowers the target logit by s * m3: fewer margin wins, never more.
    margin_wins = s * (cos[own] - m3) >= s * (cos[own] - gap)  # target logit vs best negative
    assert margin_wins.sum() < (gap > 0).sum(), "no sample tells the two apart"
    assert float(m["margin_top1"]) == float(np.mean(margin_wins))
