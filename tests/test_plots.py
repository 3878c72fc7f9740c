"""ROC curves and training plots: the curve's numbers, the PNGs, the pixels where they belong."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pfc_jax import plots
from pfc_jax.evaluate import verification

PNG = b"\x89PNG\r\n\x1a\n"
C0 = np.array([0x1F, 0x77, 0xB4])  # matplotlib's first line colour


def test_roc_of_a_hand_made_case():
    # accept when score > t: t = 3 accepts nothing, t = 2 the same pair scored 3, ...
    far, tar = verification.roc_curve([3.0, 1.0], [2.0, 0.0])
    np.testing.assert_array_equal(far, [0, 0, 0, 0.5, 0.5, 1])
    np.testing.assert_array_equal(tar, [0, 0, 0.5, 0.5, 1, 1])
    with pytest.raises(ValueError, match="both kinds"):
        verification.roc_curve([1.0], [])


def test_a_thinned_roc_is_tar_at_far_at_its_points():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1.0, 1.0, 3000), rng.normal(-1.0, 1.0, 5000)
    far, tar = verification.roc_curve(pos, neg, max_points=64)
    assert far.shape == tar.shape == (64,)
    assert far[0] == 0 and far[1] == pytest.approx(1 / 5000) and far[-1] == 1
    assert np.all(np.diff(far) > 0) and np.all(np.diff(tar) >= 0)
    for f, t in zip(far, tar):
        assert t == verification.tar_at_far_scores(pos, neg, f)[0], f
    # evaluate() keeps the curve of its pairs: at 1e-3 it reads what tar_at_far says
    emb = rng.normal(size=(400, 8))
    issame = rng.random(200) < 0.5
    res = verification.evaluate(emb, issame, fars=(1e-2,))
    rfar, rtar = res.roc
    assert rtar[np.searchsorted(rfar, 1e-2, side="right") - 1] == res.tar_at_far[1e-2]


def _pixel(fig, path, x, y):
    """RGB at data point (x, y) of the figure's first axes in the saved PNG."""
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    px, py = fig.axes[0].transData.transform((x, y))
    col, row = int(round(px)), img.shape[0] - int(round(py))
    return img[row - 1:row + 2, col - 1:col + 2].reshape(-1, 3)


def test_a_known_roc_is_drawn_where_it_should_be(tmp_path):
    # A step curve: TAR 0.25 from FAR 1e-4 up to 0.1, then 0.75 up to 1.
    curve = (np.array([0.0, 1e-4, 1e-1, 1.0]), np.array([0.0, 0.25, 0.75, 1.0]))
    fig = plots.roc_figure({"model": curve}, "known")
    path = str(tmp_path / "roc.png")
    fig.savefig(path, format="png")  # save() closes the figure; its transform is needed here

    def near_c0(x, y):
        return bool(np.any(np.abs(_pixel(fig, path, x, y) - C0).sum(axis=1) < 60))

    assert near_c0(1e-3, 0.25) and near_c0(1e-2, 0.25) and near_c0(0.3, 0.75)
    assert not near_c0(1e-2, 0.75) and not near_c0(0.3, 0.25) and not near_c0(1e-3, 0.5)
    assert fig.axes[0].get_xscale() == "log" and fig.axes[0].get_xlim() == (1e-4, 1.0)
    with open(path, "rb") as f:
        assert f.read(8) == PNG
    assert Image.open(path).size == (800, 600)
    plots.pyplot().close(fig)


def _records():
    recs = []
    for step in (1, 25, 50, 75, 100):
        recs.append({"step": step, "train/loss": 20.0 - step / 10, "train/top1": step / 100,
                     "train/margin_top1": step / 200, "train/lr": 0.1 * (1 - step / 100)})
    recs.append({"step": 50, "eval/lfw/accuracy": 0.9, "eval/lfw/accuracy_std": 0.01})
    recs.append({"step": 100, "eval/lfw/accuracy": 0.95})
    return recs


def test_pfc_plot_draws_a_workdir_and_overlays_rocs(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        for r in _records():
            f.write(json.dumps(r) + "\n")
    (out,) = plots.main([str(run)])
    assert out == str(run / "training.png") and Image.open(out).size == (800, 600)
    fig = plots.training_figure(_records())
    loss_ax, top1_ax, lr_ax, eval_ax = fig.axes
    np.testing.assert_array_equal(loss_ax.lines[0].get_xdata(), [1, 25, 50, 75, 100])
    assert [ln.get_label() for ln in top1_ax.lines] == ["top1", "margin_top1"]
    np.testing.assert_array_equal(eval_ax.lines[0].get_ydata(), [0.9, 0.95])
    plots.pyplot().close(fig)
    # Two models' pfc-eval --json results, two sets: one PNG per set, both curves on each.
    for name, shift in (("a", 0.0), ("b", 0.5)):
        res = {}
        for s in ("lfw", "cfp"):
            far, tar = verification.roc_curve(np.arange(10.0) + shift, np.arange(10.0) - 3)
            res[s] = {"accuracy": 0.9, "roc": {"far": far.tolist(), "tar": tar.tolist()}}
        (tmp_path / f"{name}.json").write_text(json.dumps(res))
    outs = plots.main(["--roc", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                       "--out", str(tmp_path / "cmp.png")])
    assert outs == [str(tmp_path / "cmp_lfw.png"), str(tmp_path / "cmp_cfp.png")]
    for p in outs:
        with open(p, "rb") as f:
            assert f.read(8) == PNG


def test_bad_inputs_are_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2,\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2: not JSON"):
        plots.read_metrics(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plots.read_metrics(str(tmp_path / "nowhere"))
    (tmp_path / "old.json").write_text(json.dumps({"lfw": {"accuracy": 0.9}}))
    with pytest.raises(ValueError, match=r"old.json: set 'lfw' has no ROC"):
        plots.read_roc_results(str(tmp_path / "old.json"))
    with pytest.raises(SystemExit):
        plots.main([])
