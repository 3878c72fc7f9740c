"""Sub-centre cleaning and suspect lists against float64 NumPy, on sharded tables.

Hand-made tables: known sub-centres, images placed at known angles to them
(along a direction orthogonal to all of their class's sub-centres, so the
nearest sub-centre is the one they were placed at). Angles are compared with
a tolerance derived from float32: a cosine of unit vectors in D dimensions
carries an error of about D * 2**-24 (one rounding per product and sum,
worst case); through arccos that is err / sin(theta) radians, at most
16 * 6e-8 / sin(5 deg) = 1.1e-5 rad = 6.3e-4 degrees for the smallest angle
used. The test uses 2e-3 degrees.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pfc_jax import clean, suspects, train
from pfc_jax import mesh as mesh_lib
from pfc_jax import partial_fc as pf
from pfc_jax.data import keep as keep_lib
from pfc_jax.data import noise as noise_lib
from test_train import _config, _losses

ANGLE_TOL_DEG = 2e-3
LAYOUTS = [({"data": 1}, None), ({"data": 8}, None), ({"data": 2, "model": 4}, ("model",))]


def _mesh(shape):
    n = int(np.prod(list(shape.values())))
    return mesh_lib.make_mesh(shape, jax.devices()[:n])


class ArrayReader:
    """BatchReader's interface over precomputed embeddings (the identity 'backbone')."""

    def __init__(self, x, y, mesh, batch):
        self.x, self.y, self.batch, self.n = x.astype(np.float32), y.astype(np.int32), batch, len(y)
        self.sharding = mesh_lib.batch_sharding(mesh)

    def _place(self, host):
        return jax.device_put(host, self.sharding)

    def __iter__(self):
        for lo in range(0, self.n, self.batch):
            x = np.zeros((self.batch, self.x.shape[1]), np.float32)
            y = np.full((self.batch,), -1, np.int32)
            got = slice(lo, min(lo + self.batch, self.n))
            x[: got.stop - lo], y[: got.stop - lo] = self.x[got], self.y[got]
            yield lo, self._place(x), self._place(y)


def _orthonormal(rng, d, k):
    q, _ = np.linalg.qr(rng.normal(size=(d, k)))
    return q.T


def _hand_made(seed=0, c=13, k=3, d=16):
    """Table [c, K, D] and images with the angles (to their chosen sub-centre) they were
    placed at; returns what cleaning at 75 degrees must keep, by construction."""
    rng = np.random.default_rng(seed)
    table = np.zeros((c, k, d))
    xs, ys, expect_keep = [], [], []

    def place(w_all, j, theta_deg):
        u = w_all[j] / np.linalg.norm(w_all[j])
        v = rng.normal(size=d)
        basis = w_all / np.linalg.norm(w_all, axis=1, keepdims=True)
        v -= basis.T @ np.linalg.lstsq(basis.T, v, rcond=None)[0]   # orthogonal to all K
        v /= np.linalg.norm(v)
        t = np.radians(theta_deg)
        return np.cos(t) * u + np.sin(t) * v

    for cls in range(c):
        w = _orthonormal(rng, d, k) * rng.uniform(0.5, 3.0, size=(k, 1))  # raw, not unit
        table[cls] = w
        dom, other = cls % k, (cls + 1) % k
        if cls == c - 1:   # every image beyond the threshold: the class empties
            plan = [(dom, 80.0, False), (dom, 85.0, False), (dom, 77.0, False),
                    (other, 20.0, False)]
        else:
            plan = [(dom, a, True) for a in (5.0, 15.0, 30.0, 45.0, 60.0, 70.0)]
            plan += [(dom, 80.0, False), (other, 10.0, False), (other, 20.0, False)]
        for j, theta, kept in plan:
            # scaled: cleaning must normalise the embeddings too
            xs.append(place(w, j, theta) * rng.uniform(0.5, 4.0))
            ys.append(cls)
            expect_keep.append(kept)
    perm = rng.permutation(len(ys))
    return (table, np.array(xs)[perm], np.array(ys)[perm], np.array(expect_keep)[perm])


def _reference(table, x, y):
    """Float64 NumPy: nearest own sub-centre, dominant by count, angle to it."""
    w = table / np.linalg.norm(table, axis=-1, keepdims=True)
    xh = x / np.linalg.norm(x, axis=-1, keepdims=True)
    cos = np.einsum("nd,nkd->nk", xh, w[y])
    nearest = cos.argmax(1)
    counts = np.zeros(table.shape[:2], int)
    np.add.at(counts, (y, nearest), 1)
    dom = counts.argmax(1)[y]
    return cos, nearest, dom, np.degrees(np.arccos(np.clip(cos[np.arange(len(y)), dom], -1, 1)))


def _sharded_table(table, mesh, head_axes):
    shards = mesh_lib.axes_size(mesh, mesh_lib.resolve_head_axes(mesh, head_axes))
    padded = -(-table.shape[0] // shards) * shards
    t = np.zeros((padded, *table.shape[1:]), np.float32)
    t[: table.shape[0]] = table
    sh = mesh_lib.table_sharding(mesh, mesh_lib.resolve_head_axes(mesh, head_axes))
    return jax.device_put(t, sh)


@pytest.mark.parametrize("shape,head_axes", LAYOUTS)
def test_cleaning_a_hand_made_table_drops_exactly_the_planted_images(shape, head_axes):
    table, x, y, expect_keep = _hand_made()
    mesh = _mesh(shape)
    t = _sharded_table(table, mesh, head_axes)
    assert t.sharding.spec == jax.sharding.PartitionSpec(
        mesh_lib.resolve_head_axes(mesh, head_axes))
    scan = clean.TableScan(mesh, t.shape, table.shape[0], head_axes, block_rows=3)
    result = clean.scan_own_centres(ArrayReader(x, y, mesh, 16), scan, lambda e: e, t)
    report, keep = clean.summarize(result, table.shape[0], 75.0)

    cos, nearest, dom, angle = _reference(table, x, y)
    np.testing.assert_allclose(result["cos"], cos, atol=1e-6)
    np.testing.assert_array_equal(result["nearest"], nearest)
    np.testing.assert_array_equal(result["dominant"], dom)
    np.testing.assert_allclose(result["angle"], angle, atol=ANGLE_TOL_DEG)
    np.testing.assert_array_equal(keep, angle < 75.0)       # the float64 reference
    np.testing.assert_array_equal(keep, expect_keep)        # and the construction
    assert report["classes_kept"] == 12 and report["classes_dropped"] == 1
    assert report["images_kept"] == 12 * 6 and report["images_dropped"] == len(y) - 72
    assert result["counts_total"] == len(y)


def test_class_median_and_mad_equal_a_per_class_loop():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 9, 200)
    values = rng.normal(60, 10, 200)
    ok = rng.random(200) > 0.1
    med, mad = clean.class_median_mad(values, labels, ok)
    for c in range(9):
        v = values[ok & (labels == c)]
        m = np.median(v)
        np.testing.assert_allclose(med[ok & (labels == c)], m, rtol=1e-12)
        np.testing.assert_allclose(mad[ok & (labels == c)], np.median(np.abs(v - m)),
                                   rtol=1e-12)
    assert np.all(np.isnan(med[~ok]))   # records left out have no statistics
    # the relative rule keeps exactly the images within median + k * 1.4826 * MAD
    result = dict(readable=ok, labels=labels, angle=values)
    _, keep = clean.summarize(result, 9, 180.0, mad=0.5)
    np.testing.assert_array_equal(keep, ok & (values <= med + 0.5 * 1.4826 * mad))


def test_cleaning_scores_the_dropped_set_against_injected_flips():
    table, x, y, expect_keep = _hand_made()
    flipped = ~expect_keep & (np.arange(len(y)) % 2 == 0)     # half the dropped ones
    flipped |= expect_keep & (np.arange(len(y)) % 7 == 0)     # and a few kept ones
    truth = noise_lib.NoiseTruth(y, y, y, flipped, np.zeros((0, 2), np.int64), 13, 13)
    result = dict(readable=np.ones(len(y), bool), labels=y,
                  angle=np.where(expect_keep, 10.0, 80.0))
    report, _ = clean.summarize(result, 13, 75.0, truth)
    dropped = ~expect_keep
    hit = np.sum(dropped & flipped)
    assert report["noise"]["precision"] == hit / dropped.sum()
    assert report["noise"]["recall"] == hit / flipped.sum()
    by_angle = {row["angle"]: row for row in report["sweep"]}
    assert by_angle[85.0]["recall"] == 0.0   # every angle is below 85: nothing dropped
    assert by_angle[60.0]["recall"] == report["noise"]["recall"]


@pytest.mark.parametrize("shape,head_axes", LAYOUTS)
def test_nearest_other_class_equals_a_brute_force_search(shape, head_axes):
    rng = np.random.default_rng(1)
    c, k, d = 29, 2, 8
    table = rng.normal(size=(c, k, d)) * rng.uniform(0.5, 2, size=(c, k, 1))
    y = rng.integers(0, c, 40)
    x = rng.normal(size=(40, d))
    mesh = _mesh(shape)
    t = _sharded_table(table, mesh, head_axes)
    ts = clean.TableScan(mesh, t.shape, c, head_axes, block_rows=3)  # blocks don't divide Cl
    reader = ArrayReader(x, y, mesh, 16)
    got_cos, got_cls = [], []
    for _, xb, yb in reader:
        best, cls = ts.nearest_other(t, xb, yb)
        got_cos.append(np.asarray(best))
        got_cls.append(np.asarray(cls))
    got_cos, got_cls = np.concatenate(got_cos)[:40], np.concatenate(got_cls)[:40]
    w = table / np.linalg.norm(table, axis=-1, keepdims=True)
    cos = np.einsum("nd,ckd->nck", x / np.linalg.norm(x, axis=1, keepdims=True), w).max(-1)
    cos[np.arange(40), y] = -np.inf                    # never the own class
    np.testing.assert_array_equal(got_cls, cos.argmax(1))
    np.testing.assert_allclose(got_cos, cos.max(1), atol=1e-6)


def _trained_head_on_fixed_embeddings(mesh, flip=0.25, c=16, per=12, d=32, steps=300):
    """Embeddings fixed in clusters (one per identity); a K = 1 head trained on noisy
    labels with the real head step. Returns table, embeddings, noisy labels, truth."""
    rng = np.random.default_rng(0)
    mu = _orthonormal(rng, d, c)
    true = np.repeat(np.arange(c), per)
    x = mu[true] + 0.15 * rng.normal(size=(len(true), d)) / np.sqrt(d)
    truth = noise_lib.make_noise(true, c, flip=flip, seed=0)
    y = truth.noisy_label
    head = pf.PartialFC(pf.HeadConfig(num_classes=c, embedding_dim=d, scale=16.0,
                                      margins=(1.0, 0.0, 0.2), sample_rate=1.0),
                        mesh, optax.sgd(0.5, momentum=0.9))
    state = head.init(jax.random.key(0))
    for s in range(steps):
        idx = np.random.default_rng(s).choice(len(y), 64, replace=False)
        xb, yb = head.shard_batch(x[idx].astype(np.float32), y[idx].astype(np.int32))
        state, _, _ = head.step(state, xb, yb, jax.random.key(s))
    return state.centers, x, y, truth


def test_suspects_rank_planted_mislabels_first_after_training():
    mesh = _mesh({"data": 8})
    table, x, y, truth = _trained_head_on_fixed_embeddings(mesh)
    ts = clean.TableScan(mesh, table.shape, 16)
    result = suspects.scan(ArrayReader(x, y, mesh, 64), ts, lambda e: e, table)
    order = np.argsort(result["margin"], kind="stable")
    n_flip = int(truth.flipped.sum())
    assert n_flip == round(0.25 * len(y))
    assert set(order[:n_flip]) == set(np.flatnonzero(truth.flipped))
    # and each flipped image looks most like the identity it came from
    np.testing.assert_array_equal(result["nearest_class"][truth.flipped],
                                  truth.true_identity[truth.flipped])


def test_duplicate_identities_are_found_from_their_centres():
    rng = np.random.default_rng(3)
    c, d = 12, 64
    w = _orthonormal(rng, d, c)
    w[11] = 0.9 * w[5] + np.sqrt(1 - 0.81) * w[11]          # classes 5 and 11: cos 0.9
    table = (w * rng.uniform(0.5, 2, size=(c, 1)))[:, None, :]
    y = np.repeat(np.arange(c), 3)
    x = w[y] + 0.05 * rng.normal(size=(len(y), d)) / np.sqrt(d)
    mesh = _mesh({"data": 4})
    t = _sharded_table(table, mesh, None)
    result = suspects.scan(ArrayReader(x, y, mesh, 8), clean.TableScan(mesh, t.shape, c),
                           lambda e: e, t)
    dup = suspects.duplicate_pairs(result, t, threshold=0.7)
    np.testing.assert_array_equal(dup["pairs"], [[5, 11]])
    np.testing.assert_allclose(dup["centre_cos"], [0.9], atol=1e-6)
    assert dup["frac_a"][0] == 1.0 and dup["frac_b"][0] == 1.0


def test_clean_and_suspects_of_a_run_and_training_on_the_cleaned_list(tmp_path):
    """End to end: a K = 3 run with injected noise, cleaned from its checkpoint (the
    table alone restored, sharded), the keep-list trains with pfc-train unchanged."""
    run = str(tmp_path / "run")
    cfg = _config(**{"head.num_subcenters": 3, "data.noise.flip": 0.25,
                     "data.noise.conflict": 0.1})
    train.train_and_evaluate(cfg, run)
    assert os.path.exists(os.path.join(run, train.NOISE_TRUTH))
    out = str(tmp_path / "clean")
    report = clean.clean(run, out, angle=75.0, batch_size=48, recordio=True, progress=False)
    scan = np.load(os.path.join(out, "scan.npz"))
    kept = np.isfinite(scan["angle"]) & (scan["angle"] < 75.0)
    assert report["images_kept"] == kept.sum() > 0
    assert report["classes_kept"] == len(np.unique(scan["labels"][kept]))
    with open(os.path.join(out, "report.json")) as f:
        assert json.load(f)["images_kept"] == report["images_kept"]
    assert open(os.path.join(out, "angles.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    truth = noise_lib.load_truth(os.path.join(run, train.NOISE_TRUTH))
    dropped = ~kept
    assert report["noise"]["dropped_and_flipped"] == int(np.sum(dropped & truth.flipped))

    # the cleaned RecordIO holds the kept images under the re-indexed labels
    from pfc_jax.data.recordio import RecordIODataset
    with RecordIODataset(out) as rec:
        keep_list = np.load(os.path.join(out, "keep.npz"))
        assert len(rec) == report["images_kept"]
        np.testing.assert_array_equal(np.sort(rec.labels()), np.sort(keep_list["labels"]))

    # the keep-list trains unchanged; the head takes the cleaned class count
    cfg2 = _config(**{"data.noise.flip": 0.25, "data.noise.conflict": 0.1,
                      "data.keep_list": os.path.join(out, "keep.npz"), "max_steps": 2})
    train.train_and_evaluate(cfg2, str(tmp_path / "retrain"))
    assert sorted(_losses(str(tmp_path / "retrain"))) == [1, 2]
    assert cfg2.head.num_classes == report["classes_kept"]
    # a keep-list made under other noise settings is refused, naming the file
    cfg3 = _config(**{"data.keep_list": os.path.join(out, "keep.npz")})
    with pytest.raises(ValueError, match="keep.npz was made from a source with"):
        train.train_and_evaluate(cfg3, str(tmp_path / "wrong"))

    sus = suspects.find(run, str(tmp_path / "sus"), batch_size=48, progress=False,
                        drop_fraction=0.25)
    rows = _csv(tmp_path / "sus" / "mislabels.csv")
    margins = [float(r["margin"]) for r in rows]
    assert len(margins) == len(truth.flipped) and margins == sorted(margins)
    assert sus["mislabels_vs_truth"]["flipped"] == int(truth.flipped.sum())
    # the keep-list leaves out exactly the quarter ranked first
    n_drop = round(0.25 * len(rows))
    dropped = {int(r["record"]) for r in rows[:n_drop]}
    kept = np.load(tmp_path / "sus" / "keep.npz")["indices"]
    assert set(kept) == set(range(len(rows))) - dropped


def _csv(path):
    import csv
    with open(path) as f:
        return list(csv.DictReader(f))


def test_workdir_configs_from_before_noise_existed_build_a_plain_source():
    import ml_collections
    d = json.loads(_config().to_json_best_effort())
    del d["data"]["noise"], d["data"]["keep_list"]
    old = ml_collections.ConfigDict(d)
    src = train.build_source(old)
    assert type(src).__name__ == "SyntheticFaces" and train.classes_of(old, src) == 64
