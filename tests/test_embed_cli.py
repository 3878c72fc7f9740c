"""pfc-embed: folders and list files (with landmarks) to embeddings and an index."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from pfc_jax import align, embed_cli, export, models
from pfc_jax.data.synthetic import SyntheticFaces
from pfc_jax.evaluate import verification
from pfc_jax.evaluate.__main__ import make_embed_fn


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = models.get_model("convnet_tiny", embedding_dim=32)
    v = jax.jit(lambda k: model.init(k, jnp.zeros((1, 112, 112, 3))))(jax.random.key(0))
    return export.write_export("convnet_tiny", 32, v, str(tmp_path_factory.mktemp("m")))


def test_a_folder_and_a_list_with_landmarks_embed_as_verification_does(exported, tmp_path):
    faces = SyntheticFaces(3, 2, seed=1)
    crops = [faces[i]["image"] for i in range(5)]
    (tmp_path / "f" / "sub").mkdir(parents=True)
    names = ["f/b.png", "f/a.png", "f/sub/c.png"]
    for name, img in zip(names, crops):
        Image.fromarray(img).save(tmp_path / name)
    # an unaligned image: crop 3 placed rotated and scaled in a 200x180 canvas
    m = np.array([[1.4, -0.3, 20.0], [0.3, 1.4, 10.0], [0, 0, 1]])
    inv = np.linalg.inv(m)[:2]
    half = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1.0]])
    pil_inv = (half @ np.vstack([inv, [0, 0, 1]]) @ np.linalg.inv(half))[:2]
    big = Image.fromarray(crops[3]).transform((200, 180), Image.Transform.AFFINE,
                                              data=tuple(pil_inv.ravel()),
                                              resample=Image.Resampling.BILINEAR)
    big.save(tmp_path / "big.jpg", quality=95)
    lm = np.round(align.TEMPLATE @ m[:2, :2].T + m[:2, 2], 4)  # as the list file holds them
    (tmp_path / "list.txt").write_text(
        "# path [x1 y1 ... x5 y5]\n"
        f"{tmp_path / 'f' / 'a.png'}\n"
        "big.jpg " + " ".join(f"{v:.4f}" for v in lm.ravel()) + "\n")
    model, v = export.load_backbone(exported)
    fn = make_embed_fn(model, v, 8)

    npy, txt = embed_cli.main(["--model", exported, "--images", str(tmp_path / "f"),
                               "--out", str(tmp_path / "out" / "folder"), "--batch-size", "8"])
    paths = open(txt).read().splitlines()
    assert paths == sorted(str(tmp_path / n) for n in names)
    got = np.load(npy)
    order = [names.index(str(p)[len(str(tmp_path)) + 1:]) for p in paths]
    want = verification.embed(fn, np.stack([crops[i] for i in order]), 8)
    assert got.dtype == np.float32 and got.shape == (3, 32)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)

    npy, txt = embed_cli.main(["--model", exported, "--images", str(tmp_path / "list.txt"),
                               "--out", str(tmp_path / "out" / "list"), "--no-flip"])
    got = np.load(npy)
    aligned = align.align(np.asarray(Image.open(tmp_path / "big.jpg").convert("RGB")), lm)
    want = verification.embed(fn, np.stack([crops[1], aligned]), 64, flip=False)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert open(txt).read().splitlines()[1] == str(tmp_path / "big.jpg")
    # the alignment found the face: nearer its own crop than the other crops
    e = verification.embed(fn, np.stack([aligned] + crops), 64, flip=False)
    sims = e[1:] @ e[0]
    assert int(np.argmax(sims)) == 3


def test_bad_inputs_are_named_and_nothing_is_written(exported, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "l1.txt").write_text("bad.png\n")
    out = tmp_path / "o"
    with pytest.raises(ValueError, match=r"l1.txt line 1: cannot read image .*bad.png"):
        embed_cli.main(["--model", exported, "--images", str(tmp_path / "l1.txt"),
                        "--out", str(out)])
    Image.fromarray(np.zeros((90, 80, 3), np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "l2.txt").write_text("small.png\n")
    with pytest.raises(ValueError, match="is 80x90, not an aligned 112x112 crop"):
        embed_cli.main(["--model", exported, "--images", str(tmp_path / "l2.txt"),
                        "--out", str(out)])
    (tmp_path / "l3.txt").write_text("small.png 1 2 3\n")
    with pytest.raises(ValueError, match="l3.txt line 1: expected a path, optionally"):
        embed_cli.main(["--model", exported, "--images", str(tmp_path / "l3.txt"),
                        "--out", str(out)])
    assert not list(tmp_path.glob("o*"))
