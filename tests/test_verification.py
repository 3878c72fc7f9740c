"""Tests for pair verification (.bin sets) and IJB template verification."""

from __future__ import annotations

import math
import pickle
import struct

import numpy as np
import pytest

from pfc_jax.evaluate import ijb
from pfc_jax.evaluate import verification as ver

# ---------------------------------------------------------------------------
# helpers


def _pairs_from_distances(dist: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D unit vectors, pair i at angle theta_i apart: squared L2 = 2 - 2 cos(theta_i)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 2 * np.pi, size=len(dist))
    theta = np.arccos(1.0 - np.asarray(dist) / 2.0)
    emb = np.empty((2 * len(dist), 2))
    emb[0::2] = np.stack([np.cos(base), np.sin(base)], 1)
    emb[1::2] = np.stack([np.cos(base + theta), np.sin(base + theta)], 1)
    return emb


def _smooth_images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients (JPEG-friendly), distinct per image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    imgs = []
    for _ in range(n):
        a, b, c = rng.uniform(20, 230, size=(3, 3))
        img = a + (b - a) * xx[..., None] * 0.5 + (c - a) * yy[..., None] * 0.5
        imgs.append(img)
    return np.clip(np.round(np.stack(imgs)), 0, 255).astype(np.uint8)


def _py2_pickle(bins: list[bytes], issame: list[bool]) -> bytes:
    """A protocol-2 pickle as Python 2 writes it: images as ``str`` (BINSTRING) opcodes."""
    out = [b"\x80\x02", b"]", b"("]
    for blob in bins:
        out += [b"T", struct.pack("<i", len(blob)), blob]
    out += [b"e", b"]", b"("]
    out += [b"\x88" if s else b"\x89" for s in issame]
    out += [b"e", b"\x86", b"."]
    return b"".join(out)


# ---------------------------------------------------------------------------
# folds and evaluate


def test_fold_bounds_uneven():
    # 23 pairs in 10 folds: the first 3 folds get 3 pairs, the other 7 get 2.
    bounds = ver.fold_bounds(23, 10)
    assert list(np.diff(bounds)) == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert bounds[0] == 0 and bounds[-1] == 23
    assert list(np.diff(ver.fold_bounds(20, 10))) == [2] * 10
    with pytest.raises(ValueError, match="5 pairs cannot be split into 10 folds"):
        ver.fold_bounds(5, 10)


def test_evaluate_uneven_folds_accuracy_is_per_fold():
    # 13 pairs, 10 folds (sizes 2,2,2,1,...). Every pair is correct except pair 0
    # (a same pair far away), so fold 0 (pairs 0, 1) scores 1/2 and the rest 1.
    dist = np.full(13, 0.5)
    issame = np.array([True, False] * 6 + [True])
    dist[~issame] = 3.0
    dist[0] = 3.5
    res = ver.evaluate(_pairs_from_distances(dist), issame, nfolds=10)
    np.testing.assert_allclose(res.fold_accuracies, [0.5] + [1.0] * 9)
    assert res.num_pairs == 13


def test_evaluate_hand_computed_folds():
    # 20 pairs, 10 folds of 2 (pair 2f, 2f+1 = fold f), grid 0.00 ... 3.99,
    # predicted "same" when dist < t.
    # folds 0-7: same at 0.205 + 0.1 f, different at 1.505 + 0.1 f
    # fold 8:    same at 1.205 (hard), different at 2.005
    # fold 9:    same at 0.105,        different at 1.105 (hard)
    same_d = [0.205 + 0.1 * f for f in range(8)] + [1.205, 0.105]
    diff_d = [1.505 + 0.1 * f for f in range(8)] + [2.005, 1.105]
    dist = np.empty(20)
    dist[0::2], dist[1::2] = same_d, diff_d
    issame = np.array([True, False] * 10)
    res = ver.evaluate(_pairs_from_distances(dist, seed=3), issame, nfolds=10)

    # Training on folds != f:
    # f = 0..6: t in [0.91, 1.10] errs only on same@1.205, t in [1.21, 1.50] only on
    #   diff@1.105: a tie, the smallest (0.91) wins; the held-out fold is right.
    # f = 7:    same@0.905 is held out, so 0.81 already reaches the 1-error optimum;
    #   the held-out same@0.905 is then rejected: 1/2.
    # f = 8:    no same@1.205 in training: t = 0.91 has no error; the held-out
    #   same@1.205 is rejected: 1/2.
    # f = 9:    no diff@1.105 in training: t = 1.21 has no error; the held-out
    #   diff@1.105 is accepted: 1/2.
    np.testing.assert_allclose(res.best_thresholds, [0.91] * 7 + [0.81, 0.91, 1.21],
                               atol=1e-9)
    np.testing.assert_allclose(res.fold_accuracies, [1.0] * 7 + [0.5] * 3)
    assert res.accuracy_mean == pytest.approx(0.85)
    # population std: 7 deviations of +0.15 and 3 of -0.35 -> var = 0.0525
    assert res.accuracy_std == pytest.approx(math.sqrt(0.0525))

    # TAR@FAR over all 20 pairs, 10 different-identity pairs:
    # FAR 1e-3 allows 0 false accepts -> t = 1.105 (smallest different distance):
    #   9 of 10 same pairs are below it (all but 1.205).
    # FAR 0.1 allows 1 -> t = 1.505 (second smallest): all 10 same pairs.
    res2 = ver.evaluate(_pairs_from_distances(dist, seed=3), issame, fars=(1e-3, 0.1))
    assert res2.tar_at_far[1e-3] == pytest.approx(0.9)
    assert res2.tar_at_far[0.1] == pytest.approx(1.0)


def test_evaluate_matches_loop_over_folds():
    # the protocol written out with loops, on noisy data and uneven folds (37 pairs)
    rng = np.random.default_rng(8)
    n = 37
    issame = rng.random(n) < 0.5
    dist = np.clip(np.where(issame, 0.9, 1.4) + rng.normal(0, 0.35, n), 0.01, 3.9)
    thresholds = np.arange(0, 4, 0.01)
    res = ver.evaluate(_pairs_from_distances(dist, seed=8), issame, thresholds=thresholds)
    start = 0
    for f in range(10):
        size = 4 if f < 7 else 3
        test = np.zeros(n, bool)
        test[start:start + size] = True
        start += size
        best_t, best_acc = None, -1.0
        for t in thresholds:
            acc = np.mean((dist[~test] < t) == issame[~test])
            if acc > best_acc + 1e-12:
                best_t, best_acc = t, acc
        assert res.best_thresholds[f] == pytest.approx(best_t)
        test_acc = np.mean((dist[test] < best_t) == issame[test])
        assert res.fold_accuracies[f] == pytest.approx(test_acc)
    assert 0.0 < res.accuracy_std  # noisy: the folds differ


def test_evaluate_separable_is_perfect():
    rng = np.random.default_rng(1)
    n = 40
    issame = rng.permutation(np.arange(n) % 2 == 0)
    # The chosen threshold sits just above the largest *training* same distance,
    # so a held-out same pair beyond every training one would fail: give the
    # largest same distance (0.5) to several pairs, in different folds.
    same_d = np.resize([0.2, 0.35, 0.5], int(issame.sum()))
    dist = rng.uniform(1.5, 3.5, n)
    dist[issame] = same_d
    folds_with_max = {i // 4 for i in np.flatnonzero(issame & (dist == 0.5))}
    assert len(folds_with_max) >= 2
    res = ver.evaluate(_pairs_from_distances(dist), issame)
    assert res.accuracy_mean == 1.0 and res.accuracy_std == 0.0
    assert res.tar_at_far[1e-3] == 1.0
    np.testing.assert_allclose(res.best_thresholds, 0.51)  # smallest t with 0.5 < t


def test_evaluate_random_labels_near_chance():
    rng = np.random.default_rng(2)
    n = 600
    emb = rng.normal(size=(2 * n, 16))
    issame = rng.permutation(np.arange(n) % 2 == 0)
    res = ver.evaluate(emb, issame)
    assert abs(res.accuracy_mean - 0.5) < 0.08
    # rows are normalised inside evaluate: scaling them changes nothing
    res_scaled = ver.evaluate(emb * rng.uniform(0.5, 3.0, size=(2 * n, 1)), issame)
    np.testing.assert_allclose(res_scaled.fold_accuracies, res.fold_accuracies)


def test_evaluate_strict_threshold_single_fold():
    # exact distances: identical vectors (0) and orthogonal ones (2). "same" means
    # dist < t, so t = 2 rejects the orthogonal different pair and t = 3 accepts it.
    emb = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    res = ver.evaluate(emb, [True, False], nfolds=1, thresholds=np.array([2.0, 3.0]))
    assert res.best_thresholds.tolist() == [2.0]  # nfolds=1: chosen and tested on all pairs
    assert res.fold_accuracies.tolist() == [1.0]


def test_evaluate_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match=r"expected \[10, D\]"):
        ver.evaluate(np.ones((12, 4)), np.ones(5, bool))


def test_tar_at_far_ties_are_not_split():
    # one positive and one negative tie at 0.5; the other negative is 0.1
    tar, far, thr = ver.tar_at_far_scores(np.array([0.5]), np.array([0.5, 0.1]), 0.5)
    assert (tar, far, thr) == (1.0, 0.5, 0.1)
    tar, far, thr = ver.tar_at_far_scores(np.array([0.5]), np.array([0.5, 0.1]), 0.4)
    assert (tar, far, thr) == (0.0, 0.0, 0.5)
    tar, far, thr = ver.tar_at_far_scores(np.array([0.5]), np.array([0.5, 0.1]), 1.0)
    assert (tar, far, thr) == (1.0, 1.0, -math.inf)


# ---------------------------------------------------------------------------
# .bin files


def test_bin_png_round_trip_exact(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, size=(6, 16, 16, 3), dtype=np.uint8)
    issame = [True, False, True]
    path = tmp_path / "toy.bin"
    ver.write_bin(path, imgs, issame, fmt="png")
    vset = ver.load_bin(path, image_size=16)
    assert vset.name == "toy"
    np.testing.assert_array_equal(vset.images, imgs)
    assert vset.issame.dtype == bool
    np.testing.assert_array_equal(vset.issame, issame)
    assert vset.num_pairs == 3


def test_bin_jpeg_round_trip_close(tmp_path):
    imgs = _smooth_images(4)
    path = tmp_path / "j.bin"
    ver.write_bin(path, imgs, [False, True], fmt="jpeg")
    vset = ver.load_bin(path, image_size=16)
    err = np.abs(vset.images.astype(int) - imgs.astype(int))
    assert err.mean() < 2.0 and err.max() < 16
    np.testing.assert_array_equal(vset.issame, [False, True])


def test_bin_resizes(tmp_path):
    # constant-colour 20x20 images stay constant after resizing to 16x16
    colours = np.array([[10, 200, 30], [250, 0, 128]], dtype=np.uint8)
    imgs = np.broadcast_to(colours[:, None, None, :], (2, 20, 20, 3)).copy()
    path = tmp_path / "r.bin"
    ver.write_bin(path, imgs, [True], fmt="png")
    vset = ver.load_bin(path, image_size=16)
    assert vset.images.shape == (2, 16, 16, 3)
    expect = np.broadcast_to(colours[:, None, None], (2, 16, 16, 3))
    np.testing.assert_array_equal(vset.images, expect)


def test_bin_python2_pickle(tmp_path):
    imgs = np.random.default_rng(4).integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    ref = tmp_path / "ref.bin"
    ver.write_bin(ref, imgs, [True, False], fmt="png")
    with open(ref, "rb") as f:
        bins, _ = pickle.load(f)
    path = tmp_path / "py2.bin"
    path.write_bytes(_py2_pickle(bins, [True, False]))
    with open(path, "rb") as f:  # really Python-2 style: non-ASCII str opcodes
        with pytest.raises(UnicodeDecodeError):
            pickle.load(f)
    vset = ver.load_bin(path, image_size=8)
    np.testing.assert_array_equal(vset.images, imgs)
    np.testing.assert_array_equal(vset.issame, [True, False])


def test_bin_errors(tmp_path):
    imgs = _smooth_images(4, size=8)
    path = tmp_path / "bad.bin"
    ver.write_bin(path, imgs, [True, False], fmt="png")
    with open(path, "rb") as f:
        bins, issame = pickle.load(f)

    with open(path, "wb") as f:
        pickle.dump((bins, issame + [True]), f)
    with pytest.raises(ValueError, match=r"bad\.bin: 4 images but 3 issame labels"):
        ver.load_bin(path, image_size=8)

    bins[3] = b"definitely not an image"
    with open(path, "wb") as f:
        pickle.dump((bins, issame), f)
    with pytest.raises(ValueError, match=r"bad\.bin: image 3 does not decode"):
        ver.load_bin(path, image_size=8)

    with pytest.raises(ValueError, match="2 images per pair"):
        ver.write_bin(path, imgs, [True], fmt="png")


# ---------------------------------------------------------------------------
# embed and verify


_W = np.random.default_rng(7).normal(size=(6, 4))


def _half_means(batch: np.ndarray) -> np.ndarray:
    """A flip-sensitive embedding: channel means of the left and right halves, times W."""
    x = batch.astype(np.float64)
    w = x.shape[2] // 2
    feats = np.concatenate([x[:, :, :w].mean(axis=(1, 2)), x[:, :, w:].mean(axis=(1, 2))], 1)
    return feats @ _W


def test_embed_flip_and_partial_batch():
    imgs = np.random.default_rng(5).integers(0, 256, size=(10, 6, 8, 3), dtype=np.uint8)
    seen = []

    def fn(batch):
        seen.append(batch.shape)
        return _half_means(batch)

    out = ver.embed(fn, imgs, batch_size=4, flip=True)
    assert seen == [(4, 6, 8, 3)] * 6  # 3 batches (last one padded) x (original, flip)
    expect = np.stack([_half_means(im[None])[0] + _half_means(im[None, :, ::-1])[0]
                       for im in imgs])
    expect /= np.linalg.norm(expect, axis=1, keepdims=True)
    np.testing.assert_allclose(out, expect, rtol=1e-12, atol=1e-12)

    no_flip = ver.embed(_half_means, imgs, batch_size=4, flip=False)
    # with a progress line: the same numbers, and the count reaches the images
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        again = ver.embed(_half_means, imgs, batch_size=4, flip=False, progress=True, what="e")
    np.testing.assert_array_equal(again, no_flip)
    assert "e: 10/10" in err.getvalue()
    expect_nf = _half_means(imgs)
    expect_nf /= np.linalg.norm(expect_nf, axis=1, keepdims=True)
    np.testing.assert_allclose(no_flip, expect_nf, rtol=1e-12, atol=1e-12)
    assert not np.allclose(no_flip, out)  # the flip matters for this embedding


def test_embed_rejects_bad_output():
    imgs = np.zeros((3, 4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="embed_fn returned shape"):
        ver.embed(lambda b: np.zeros((1, 2)), imgs, batch_size=2)


def test_verify_and_format():
    # each pair: an image and itself (same) or another image (different)
    rng = np.random.default_rng(6)
    base = _smooth_images(20, size=8, seed=6)
    issame = rng.permutation(np.arange(10) % 2 == 0)
    imgs = np.empty((20, 8, 8, 3), np.uint8)
    imgs[0::2] = base[:10]
    imgs[1::2] = np.where(issame[:, None, None, None], base[:10], base[10:])
    vset = ver.VerificationSet("toy", imgs, issame)
    results = ver.verify(_half_means, {"toy": vset}, batch_size=8)
    res = results["toy"]
    assert res.num_pairs == 10 and res.fold_accuracies.shape == (10,)
    line = ver.format_results(results)
    assert line.startswith(f"toy: acc {res.accuracy_mean:.5f} +- {res.accuracy_std:.5f}")
    assert "TAR@FAR=0.001" in line and "10 pairs" in line


# ---------------------------------------------------------------------------
# IJB


def test_template_features_hand_computed():
    # template 7: a, b in media 100, c in media 200; template 3: d in media 100.
    # image order interleaves templates: a, d, c, b
    feats = np.array([[2.0, 0.0],   # a
                      [1.0, 1.0],   # d
                      [0.0, 1.0],   # c
                      [0.0, 4.0]])  # b
    scores = np.array([0.5, 0.9, 2.0, 0.25])
    media = np.array([100, 100, 200, 100])
    tmpl = np.array([7, 3, 7, 7])

    tids, tf = ijb.template_features(feats, scores, media, tmpl)
    np.testing.assert_array_equal(tids, [3, 7])
    # template 7: mean(a*0.5, b*0.25) = mean([1,0],[0,1]) = [.5,.5]; + c*2 = [0,2]
    t7 = np.array([0.5, 2.5]) / math.sqrt(6.5)
    t3 = np.array([1.0, 1.0]) / math.sqrt(2.0)
    np.testing.assert_allclose(tf, [t3, t7], atol=1e-12)

    _, tf_plain = ijb.template_features(feats, None, media, tmpl)
    # without scores: mean(a, b) = [1, 2]; + c = [1, 3]
    np.testing.assert_allclose(tf_plain[1], np.array([1.0, 3.0]) / math.sqrt(10.0), atol=1e-12)

    s = ijb.verify_pairs(tf, tids, np.array([7, 3, 7]), np.array([3, 7, 7]))
    np.testing.assert_allclose(s, [3 / math.sqrt(13), 3 / math.sqrt(13), 1.0], atol=1e-12)
    with pytest.raises(ValueError, match=r"p2\[1\] = 5 is not a template"):
        ijb.verify_pairs(tf, tids, np.array([7, 3]), np.array([3, 5]))


# positives 0.9 0.8 0.7 0.4; negatives 0.85 0.6 0.5 0.3 0.2 0.1 0.05 0 -0.1 -0.2
# ROC (fpr, tpr) by threshold: 0.9 (0, .25), 0.85 (.1, .25), 0.8 (.1, .5),
# 0.7 (.1, .75), 0.6 (.2, .75), 0.5 (.3, .75), 0.4 (.3, 1), then fpr .4 ... 1 at tpr 1.
_POS = [0.9, 0.8, 0.7, 0.4]
_NEG = [0.85, 0.6, 0.5, 0.3, 0.2, 0.1, 0.05, 0.0, -0.1, -0.2]


def _roc_case():
    scores = np.array(_POS + _NEG)
    labels = np.array([1] * len(_POS) + [0] * len(_NEG))
    perm = np.random.default_rng(0).permutation(len(scores))
    return scores[perm], labels[perm]


def test_roc_curve_hand_built():
    fpr, tpr, thr = ijb.roc_curve(*_roc_case())
    np.testing.assert_allclose(fpr[:8], [0, 0, .1, .1, .1, .2, .3, .3])
    np.testing.assert_allclose(tpr[:8], [0, .25, .25, .5, .75, .75, .75, 1])
    np.testing.assert_allclose(thr[1:8], [0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4])
    assert fpr[-1] == 1.0 and tpr[-1] == 1.0 and len(fpr) == 15


def test_tar_at_far_hand_built_roc():
    scores, labels = _roc_case()
    at_most = ijb.tar_at_far(scores, labels, fars=(1e-3, 0.05, 0.1, 0.25, 0.26, 0.3))
    assert at_most == {1e-3: 0.25, 0.05: 0.25, 0.1: 0.75, 0.25: 0.75, 0.26: 0.75, 0.3: 1.0}
    nearest = ijb.tar_at_far(scores, labels, fars=(1e-3, 0.04, 0.09, 0.26), rule="nearest")
    # 0.26 is nearest to fpr 0.3, where the largest tpr is 1.0
    assert nearest == {1e-3: 0.25, 0.04: 0.25, 0.09: 0.75, 0.26: 1.0}


def test_ijb_meta_loaders(tmp_path):
    (tmp_path / "ijbb_face_tid_mid.txt").write_text("1.jpg 1 69544\n2.jpg 1 69544\n3.jpg 5 7\n")
    (tmp_path / "ijbb_template_pair_label.txt").write_text("1 5 0\n1 1 1\n")
    lm = " ".join(str(float(v)) for v in range(10))
    (tmp_path / "ijbb_name_5pts_score.txt").write_text(
        f"1.jpg {lm} 0.9\n2.jpg {lm} 0.5\n\n3.jpg {lm} 0.25\n")
    meta = ijb.load_ijb_meta(tmp_path, "ijbb")
    assert meta.target == "IJBB"
    assert list(meta.image_names) == ["1.jpg", "2.jpg", "3.jpg"]
    np.testing.assert_array_equal(meta.template_ids, [1, 1, 5])
    np.testing.assert_array_equal(meta.media_ids, [69544, 69544, 7])
    np.testing.assert_allclose(meta.det_scores, [0.9, 0.5, 0.25])
    assert meta.landmarks.shape == (3, 5, 2)
    np.testing.assert_array_equal(meta.landmarks[2, 1], [2.0, 3.0])  # x2, y2
    np.testing.assert_array_equal(meta.pair_t1, [1, 1])
    np.testing.assert_array_equal(meta.pair_t2, [5, 1])
    np.testing.assert_array_equal(meta.pair_labels, [0, 1])

    # end to end on the tiny meta: template 1 = media 69544 mean, template 5 = image 3
    feats = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    res = ijb.evaluate_ijb(feats, meta, fars=(0.5,))
    np.testing.assert_allclose(res.scores, [0.9 / math.hypot(0.9, 0.5), 1.0])
    assert res.num_templates == 2 and res.num_pairs == 2
    assert res.tar_at_far == {0.5: 1.0}
    assert ijb.format_ijb("IJBB", res) == "IJBB: TAR@FAR=0.5 1.0000 | 2 pairs"


def test_ijb_meta_errors(tmp_path):
    p = tmp_path / "ijbc_face_tid_mid.txt"
    p.write_text("1.jpg 1 2\n2.jpg 1\n")
    with pytest.raises(ValueError, match=r"ijbc_face_tid_mid\.txt, line 2: expected 3 fields"):
        ijb.read_template_media(p)
    p.write_text("1.jpg 1 2\n2.jpg one 2\n")
    with pytest.raises(ValueError, match=r"line 2: template id 'one'"):
        ijb.read_template_media(p)

    q = tmp_path / "ijbc_template_pair_label.txt"
    q.write_text("1 2 1\n1 3 2\n")
    with pytest.raises(ValueError, match=r"record 2 \(blank lines not counted\): label 2 is not"):
        ijb.read_template_pairs(q)

    p.write_text("1.jpg 1 2\n2.jpg 1 2\n")
    q.write_text("1 1 1\n")
    lm = " ".join(["1.0"] * 10)
    (tmp_path / "ijbc_name_5pts_score.txt").write_text(f"1.jpg {lm} 0.9\n9.jpg {lm} 0.9\n")
    with pytest.raises(ValueError, match=r"line 2: image '9\.jpg' but"):
        ijb.load_ijb_meta(tmp_path, "IJBC")
    with pytest.raises(ValueError, match="target must be one of"):
        ijb.load_ijb_meta(tmp_path, "LFW")
