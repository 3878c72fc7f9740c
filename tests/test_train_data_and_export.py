"""The trainer on real file formats, then export and pfc-eval on its checkpoint."""

import json
import os

import jax
import numpy as np
import pytest

from pfc_jax import export, train
from pfc_jax.data.recordio_writer import RecordIOWriter
from pfc_jax.data.synthetic import SyntheticFaces
from pfc_jax.evaluate import __main__ as eval_cli
from pfc_jax.evaluate import verification
from test_train import _config, _losses

IDS, PER_ID = 16, 4


def _faces():
    return SyntheticFaces(IDS, PER_ID, seed=3)


@pytest.fixture(scope="module")
def recordio_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rec")
    src = _faces()
    with RecordIOWriter(folder) as w:
        for i in range(len(src)):
            rec = src[i]
            w.add_image(rec["image"], int(rec["label"]))
    return str(folder)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, recordio_dir):
    """A 4-step run on the RecordIO dataset; its workdir."""
    workdir = str(tmp_path_factory.mktemp("run"))
    cfg = _config(**{"data.kind": "recordio", "data.path": recordio_dir,
                     "head.num_classes": IDS, "data.num_images": IDS * PER_ID})
    train.train_and_evaluate(cfg, workdir)
    return workdir


def test_training_on_recordio_runs_and_checks_labels(trained, recordio_dir, tmp_path):
    assert sorted(_losses(trained)) == [1, 2, 3, 4]
    cfg = _config(**{"data.kind": "recordio", "data.path": recordio_dir,
                     "head.num_classes": IDS - 1, "data.num_images": IDS * PER_ID})
    with pytest.raises(ValueError, match=f"label {IDS - 1}"):
        train.train_and_evaluate(cfg, str(tmp_path))


def test_training_on_an_image_folder(tmp_path):
    from PIL import Image
    src = _faces()
    for i in range(len(src)):
        rec = src[i]
        d = tmp_path / "faces" / f"person_{int(rec['label']):03d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rec["image"]).save(d / f"{i}.png")
    cfg = _config(max_steps=2, **{"data.kind": "folder", "data.path": str(tmp_path / "faces"),
                                  "head.num_classes": IDS, "data.num_images": IDS * PER_ID})
    last = train.train_and_evaluate(cfg, str(tmp_path / "run"))
    assert np.isfinite(last["loss"])


def test_export_matches_the_checkpoint_and_eval_cli_scores_it(trained, tmp_path):
    model, variables, step = export.restore_backbone(trained)
    assert step == 4
    out = export.export_backbone(trained, str(tmp_path / "exported"))
    model2, variables2 = export.load_backbone(out)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(variables2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A verification set of held-out identities, scored by the CLI from both sources.
    held = SyntheticFaces(8, 4, seed=5, identity_offset=IDS)
    images, issame = held.verification_pairs(20, seed=1)
    path = str(tmp_path / "held.bin")
    verification.write_bin(path, images, issame, fmt="png")
    r1 = eval_cli.main(["--workdir", trained, "--bin", path, "--batch-size", "8"])
    r2 = eval_cli.main(["--model", out, "--bin", path, "--batch-size", "8",
                        "--json", str(tmp_path / "m.json"), "--roc", str(tmp_path / "roc")])
    assert r1 == r2 and r1["held"]["num_pairs"] == 20
    with open(tmp_path / "m.json") as f:  # the curve pfc-plot --roc overlays
        assert json.load(f) == r2
    assert (tmp_path / "roc" / "roc_held.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Independent check of the CLI: embed with the exported model directly.
    fn = eval_cli.make_embed_fn(model2, variables2, 8)
    emb = verification.embed(fn, images, 8)
    expect = verification.evaluate(emb, issame)
    assert r1["held"]["accuracy"] == pytest.approx(expect.accuracy_mean)


def test_pfc_export_writes_onnx_beside_the_msgpack(trained, tmp_path):
    """--format onnx: the msgpack export and model.onnx, which embeds as it does."""
    ort = pytest.importorskip("onnxruntime")
    from pfc_jax.data.augment import normalize
    out = str(tmp_path / "exported")
    export.main(["--workdir", trained, "--out", out, "--format", "onnx"])
    model, v = export.load_backbone(out)
    with open(os.path.join(out, "model.json")) as f:
        meta = json.load(f)
    assert meta["onnx"]["file"] == "model.onnx" and meta["onnx"]["input"]["layout"] == "NCHW"
    sess = ort.InferenceSession(os.path.join(out, "model.onnx"),
                                providers=["CPUExecutionProvider"])
    images = np.stack([_faces()[i]["image"] for i in range(3)])
    x = np.asarray(normalize(jax.numpy.asarray(images)))
    got = sess.run(None, {"input": np.ascontiguousarray(x.transpose(0, 3, 1, 2))})[0]
    want = np.asarray(model.apply(v, x, train=False))
    unit = verification.l2_normalize
    np.testing.assert_allclose(unit(got), unit(want), rtol=0, atol=1e-4)  # test_onnx.py's bound
    with pytest.raises(ValueError, match="export format 'tflite'"):
        export.export_backbone(trained, out, formats=("tflite",))


def test_training_starts_from_an_export_with_a_fresh_head(trained, recordio_dir, tmp_path):
    """--config.init_from: with lr 0 the backbone after two steps is the export's, bit
    for bit, while the head is a fresh draw; a mismatched backbone is refused."""
    out = export.export_backbone(trained, str(tmp_path / "exported"))
    overrides = {"data.kind": "recordio", "data.path": recordio_dir, "head.num_classes": IDS,
                 "data.num_images": IDS * PER_ID, "optimizer.lr": 0.0, "init_from": out,
                 "seed": 7}
    work = str(tmp_path / "finetune")
    train.train_and_evaluate(_config(max_steps=2, **overrides), work)
    _, v_export = export.load_backbone(out)
    _, v_run, step = export.restore_backbone(work)
    assert step == 2
    for a, b in zip(jax.tree.leaves(v_export["params"]), jax.tree.leaves(v_run["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="holds r_tiny with 128-d embeddings"):
        train.train_and_evaluate(_config(max_steps=2, **dict(overrides, **{
            "model.name": "convnet_tiny"})), str(tmp_path / "wrong"))


def test_missing_workdir_config_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        export.restore_backbone(str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")
