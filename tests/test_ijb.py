"""IJB end to end on a small IJB-shaped release made here: alignment from the meta
landmarks, embeddings against a direct forward, 1:1 and 1:N against a brute-force
float64 NumPy reading of the protocol, the embedding cache, the CLI and its plots,
and the 1:N measures on hand-computed cases."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from pfc_jax import align, export, models
from pfc_jax.data.augment import normalize
from pfc_jax.data.synthetic import SyntheticFaces
from pfc_jax.evaluate import __main__ as eval_cli
from pfc_jax.evaluate import identification, ijb, ijb_release

FARS = ijb.IJB_FARS
MORE_FPIRS = (0.2, 0.4, 0.6)  # with 6 non-mated probes: 1, 2, 3 false alarms allowed
SUBJECTS = 6
TEMPLATES_PER_SUBJECT = 3


def _similarity(angle_deg, scale, tx, ty):
    a = np.deg2rad(angle_deg)
    r = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.concatenate([r, [[tx], [ty]]], axis=1)


def _loose_crop(face: np.ndarray, m: np.ndarray, size=(150, 140)) -> np.ndarray:
    """``face`` (an aligned crop) placed in a larger image by the similarity ``m``."""
    a = np.vstack([m, [0, 0, 1]])
    inv = np.linalg.inv(a)[:2]  # output pixel -> face pixel
    img = Image.fromarray(face).transform(size, Image.Transform.AFFINE,
                                          data=tuple(inv.ravel()),
                                          resample=Image.Resampling.BILINEAR)
    return np.asarray(img)


def _blobs(pts: np.ndarray, size=(150, 140)) -> np.ndarray:
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    img = np.zeros((size[1], size[0]))
    for x, y in pts:
        img += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 2.0**2))
    return np.repeat(np.clip(img * 255, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """IJBC/{loose_crop,meta}: 6 subjects x 3 templates of 1-4 images over 1-2 media,
    every template pair, galleries G1 = subjects 0-2 and G2 = 3-5 (their first
    template), the other templates as mixed probes. Two images are landmark blobs."""
    root = tmp_path_factory.mktemp("ijb")
    crops, meta = root / "IJBC" / "loose_crop", root / "IJBC" / "meta"
    crops.mkdir(parents=True)
    meta.mkdir()
    rng = np.random.default_rng(0)
    faces = SyntheticFaces(SUBJECTS, 4, seed=3)
    tid_mid, pts_lines, info = [], [], []
    tid, mid, img_no = 100, 500, 0
    blob_names = []
    for s in range(SUBJECTS):
        for t in range(TEMPLATES_PER_SUBJECT):
            tid += 1
            n_img = int(rng.integers(1, 5))
            medias = [mid + 1 + int(rng.integers(0, 2)) for _ in range(n_img)]
            mid += 2
            for k in range(n_img):
                m = _similarity(rng.uniform(-20, 20), rng.uniform(0.8, 1.2),
                                rng.uniform(5, 25), rng.uniform(5, 20))
                pts = align.TEMPLATE @ m[:, :2].T + m[:, 2]
                if img_no in (4, 11):
                    img = _blobs(pts)
                    blob_names.append(f"{img_no}.png")
                else:
                    img = _loose_crop(faces[s * 4 + int(rng.integers(0, 4))]["image"], m)
                name = f"{img_no}.png"
                Image.fromarray(img).save(crops / name)
                score = float(rng.uniform(0.5, 1.0))
                tid_mid.append(f"{name} {tid} {medias[k]}")
                pts_lines.append(name + " " + " ".join(f"{v:.4f}" for v in pts.ravel())
                                 + f" {score:.6f}")
                img_no += 1
            info.append((tid, s))
    (meta / "ijbc_face_tid_mid.txt").write_text("\n".join(tid_mid) + "\n")
    (meta / "ijbc_name_5pts_score.txt").write_text("\n".join(pts_lines) + "\n")
    pairs = [f"{a} {b} {int(sa == sb)}" for i, (a, sa) in enumerate(info)
             for (b, sb) in info[i + 1:]]
    (meta / "ijbc_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
    header = "TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID\n"
    first = {s: t for t, s in reversed(info)}
    for g, subs in (("G1", range(0, 3)), ("G2", range(3, 6))):
        rows = [f"{first[s]},{s},x.png,0" for s in subs for _ in range(2)]  # per image
        (meta / f"ijbc_1N_gallery_{g}.csv").write_text(header + "\n".join(rows) + "\n")
    probes = [f"{t},{s},x.png,0" for t, s in info if first[s] != t]
    (meta / "ijbc_1N_probe_mixed.csv").write_text(header + "\n".join(probes) + "\n")
    return dict(root=root, dir=root / "IJBC", info=info, first=first, blobs=blob_names)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model = models.get_model("convnet_tiny", embedding_dim=16)
    v = jax.jit(lambda k: model.init(k, jnp.zeros((1, 112, 112, 3))))(jax.random.key(1))
    return export.write_export("convnet_tiny", 16, v, str(tmp_path_factory.mktemp("m")))


@pytest.fixture(scope="module")
def cli_run(release, model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    res = eval_cli.main(["--model", model_dir, "--ijb", str(release["root"]), "--target",
                         "IJBC", "--batch-size", "8", "--ijb-cache", str(out / "cache"),
                         "--roc", str(out / "plots"), "--json", str(out / "r.json")])
    return dict(res=res["IJBC"], out=out)


# ----------------------------------------------------------------- brute force
def _tar_brute(pos, neg, far):
    """The largest TAR over every threshold t (accept score > t) with FAR(t) <= far."""
    best = 0.0
    for t in np.concatenate([pos, neg, [-np.inf]]):
        if np.mean(neg > t) <= far + 1e-12:
            best = max(best, float(np.mean(pos > t)))
    return best


def _protocol_reference(img_feats, release):
    meta = ijb.load_ijb_meta(release["dir"] / "meta", "IJBC")
    f = img_feats.astype(np.float64) * meta.det_scores[:, None].astype(np.float64)
    tf = {}
    for t in np.unique(meta.template_ids):
        acc = np.zeros(f.shape[1])
        sel = meta.template_ids == t
        for m in np.unique(meta.media_ids[sel]):
            acc += f[sel & (meta.media_ids == m)].mean(axis=0)
        tf[int(t)] = acc / np.linalg.norm(acc)
    scores = np.array([tf[a] @ tf[b] for a, b in zip(meta.pair_t1, meta.pair_t2)])
    lab = meta.pair_labels.astype(bool)
    tar = {far: _tar_brute(scores[lab], scores[~lab], far) for far in FARS}

    subj = {t: s for t, s in release["info"]}
    probes = [t for t, s in release["info"] if release["first"][s] != t]
    ident = {}
    for g, subs in (("G1", range(0, 3)), ("G2", range(3, 6))):
        gal = [release["first"][s] for s in subs]
        ranks, hits, nonmated_top = [], [], []
        for p in probes:
            sims = {q: tf[p] @ tf[q] for q in gal}
            if subj[p] in subs:
                mate = release["first"][subj[p]]
                rank = 1 + sum(v >= sims[mate] for q, v in sims.items() if q != mate)
                ranks.append(rank)
                hits.append(sims[mate] if rank == 1 else -np.inf)
            else:
                nonmated_top.append(max(sims.values()))
        ranks, hits, nonmated_top = map(np.array, (ranks, hits, nonmated_top))
        ident[g] = dict(rank={k: float(np.mean(ranks <= k)) for k in identification.RANKS},
                        tpir={f: _tar_brute(hits, nonmated_top, f)
                              for f in identification.FPIRS + MORE_FPIRS})
    return tar, ident, tf


# ----------------------------------------------------------------------- tests
def test_alignment_from_the_meta_landmarks_puts_them_on_the_template(release):
    meta = ijb.load_ijb_meta(release["dir"] / "meta", "IJBC")
    oy, ox = np.mgrid[0:112, 0:112]
    for name in release["blobs"]:
        i = int(np.flatnonzero(meta.image_names == name)[0])
        out = ijb_release.load_aligned(str(release["dir"] / "loose_crop"), name,
                                       meta.landmarks[i], "here").astype(np.float64)[..., 0]
        for tx, ty in align.TEMPLATE:
            w = out * ((np.abs(ox - tx) < 6) & (np.abs(oy - ty) < 6))
            cx, cy = (w * ox).sum() / w.sum(), (w * oy).sum() / w.sum()
            assert math.hypot(cx - tx, cy - ty) < 0.5, (name, cx, cy, tx, ty)


def test_image_embeddings_equal_a_direct_forward(release, model_dir, cli_run):
    model, variables = export.load_backbone(model_dir)
    meta = ijb.load_ijb_meta(release["dir"] / "meta", "IJBC")
    imgs = np.stack([align.align(np.asarray(Image.open(release["dir"] / "loose_crop" / n)
                                            .convert("RGB")), lm)
                     for n, lm in zip(meta.image_names, meta.landmarks)])
    fwd = jax.jit(lambda x: model.apply(variables, normalize(x), train=False))
    ref = np.asarray(fwd(imgs), np.float64) + np.asarray(fwd(imgs[:, :, ::-1]), np.float64)
    cached = np.load(next((cli_run["out"] / "cache").glob("ijbc_*.npy")))
    assert cached.shape == ref.shape
    # float32 forwards in another batch split: relative differences of a few ulps
    np.testing.assert_allclose(cached, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_one_to_one_and_one_to_n_equal_a_brute_force_reading(release, cli_run):
    feats = np.load(next((cli_run["out"] / "cache").glob("ijbc_*.npy")))
    tar, ident, tf = _protocol_reference(feats, release)
    res = cli_run["res"]
    for far in FARS:
        assert res["tar_at_far"][str(far)] == pytest.approx(tar[far], abs=1e-12), far
    num_templates = SUBJECTS * TEMPLATES_PER_SUBJECT
    assert res["num_pairs"] == num_templates * (num_templates - 1) // 2
    for g in ("G1", "G2"):
        got = res["identification"][g]
        assert got["num_mated"] == 6 and got["num_nonmated"] == 6
        for k in identification.RANKS:
            assert got["rank"][str(k)] == pytest.approx(ident[g]["rank"][k]), (g, k)
        for f in identification.FPIRS:
            assert got["tpir_at_fpir"][str(f)] == pytest.approx(ident[g]["tpir"][f]), (g, f)
    mean = res["identification"]["mean"]
    assert mean["rank"]["1"] == pytest.approx((ident["G1"]["rank"][1]
                                               + ident["G2"]["rank"][1]) / 2)
    for f in identification.FPIRS:
        assert mean["tpir_at_fpir"][str(f)] == pytest.approx(
            (ident["G1"]["tpir"][f] + ident["G2"]["tpir"][f]) / 2)
    # thresholds between the extremes, from the reference's own template features
    subj = dict(release["info"])
    probes = [t for t, s in release["info"] if release["first"][s] != t]
    for g, subs in (("G1", range(0, 3)), ("G2", range(3, 6))):
        gal = [release["first"][s] for s in subs]
        r = identification.identify(np.stack([tf[t] for t in probes]),
                                    np.array([subj[t] for t in probes]),
                                    np.stack([tf[t] for t in gal]), np.array(list(subs)),
                                    fpirs=MORE_FPIRS)
        for f in MORE_FPIRS:
            assert r.tpir_at_fpir[f] == pytest.approx(ident[g]["tpir"][f]), (g, f)
    both = res["identification"]["G1+G2"]
    assert both["num_mated"] == 12 and both["num_nonmated"] == 0
    assert both["tpir_at_fpir"] == {}


def test_the_cli_writes_its_plots_and_json(cli_run):
    plots = cli_run["out"] / "plots"
    for name in ("roc_IJBC.png", "tpir_IJBC.png"):
        with Image.open(plots / name) as im:
            assert im.format == "PNG" and im.size == (800, 600)
    saved = json.loads((cli_run["out"] / "r.json").read_text())
    assert saved["IJBC"]["tar_at_far"] == cli_run["res"]["tar_at_far"]
    from pfc_jax import plots as plots_lib
    far, tar = plots_lib.read_roc_results(str(cli_run["out"] / "r.json"))["IJBC"]
    assert far[0] == 0 and far[-1] == 1 and np.all(np.diff(tar) >= 0)


def test_the_cache_is_read_again_resumed_after_a_crash_and_keyed_by_the_model(
        release, model_dir, tmp_path):
    model, variables = export.load_backbone(model_dir)
    fn = eval_cli.make_embed_fn(model, variables, 8)
    rel = ijb_release.find_release(str(release["dir"]), "ijbc")
    meta = ijb.load_ijb_meta(rel.meta_dir, "IJBC")
    n = meta.image_names.shape[0]
    fresh, path, done = ijb_release.embed_images(fn, meta, rel, batch_size=8, chunk=8,
                                                 model_key="a", cache_dir=None)
    assert path is None and done == n

    calls = []

    def dies_after_two_chunks(x):
        calls.append(1)
        if len(calls) > 4:  # two chunks of one batch, image and mirror image
            raise KeyboardInterrupt
        return fn(x)

    with pytest.raises(KeyboardInterrupt):
        ijb_release.embed_images(dies_after_two_chunks, meta, rel, batch_size=8, chunk=8,
                                 model_key="a", cache_dir=str(tmp_path))
    resumed, path, done = ijb_release.embed_images(fn, meta, rel, batch_size=8, chunk=8,
                                                   model_key="a", cache_dir=str(tmp_path))
    assert done == n - 16
    np.testing.assert_array_equal(resumed, fresh)

    def never(x):
        raise AssertionError("embedded again")

    again, _, done = ijb_release.embed_images(never, meta, rel, batch_size=8, chunk=8,
                                              model_key="a", cache_dir=str(tmp_path))
    assert done == 0
    np.testing.assert_array_equal(again, fresh)
    _, _, done = ijb_release.embed_images(fn, meta, rel, batch_size=8, chunk=8,
                                          model_key="b", cache_dir=str(tmp_path))
    assert done == n  # another model: another cache entry
    # a sidecar that does not describe its file (a count past the end, a wrong width)
    # is not trusted: everything is embedded again, and equal
    side = next(p for p in tmp_path.glob("ijbc_*.json")
                if json.loads(p.read_text())["key"] == ijb_release.cache_key("a", meta, True))
    for bad in (dict(done=n + 5), dict(dim=3)):
        side.write_text(json.dumps({**json.loads(side.read_text()), **bad}))
        redo, _, done = ijb_release.embed_images(fn, meta, rel, batch_size=8, chunk=8,
                                                 model_key="a", cache_dir=str(tmp_path))
        assert done == n
        np.testing.assert_array_equal(redo, fresh)


def test_identification_measures_hand_computed():
    # Gallery: subjects 1, 2 (unit vectors at 0 and 90 degrees). Probes (angle, subject):
    g = np.array([[1.0, 0.0], [0.0, 1.0]])
    ang = np.deg2rad([10, 60, 100, 55, 30, 45])
    p = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    subj = np.array([1, 1, 2, 2, 7, 8])  # 7 and 8 are not enrolled
    s = identification.search(p, subj, g, np.array([1, 2]))
    np.testing.assert_array_equal(s.mate_rank, [1, 2, 1, 1, 0, 0])
    np.testing.assert_allclose(s.mate_score[:4], np.cos(np.deg2rad([10, 60, 10, 35])))
    np.testing.assert_allclose(s.top_score, np.cos(np.deg2rad([10, 30, 10, 35, 30, 45])))
    r = identification.evaluate(s, fpirs=(0.0, 0.5, 1.0), ranks=(1, 2))
    assert r.rank == {1: pytest.approx(3 / 4), 2: 1.0}
    # FPIR 0: the threshold is the highest non-mated top score, cos 30 = 0.866: the two
    # cos 10 mates pass it, the cos 35 = 0.819 one does not, the rank-2 mate never counts.
    assert r.tpir_at_fpir[0.0] == pytest.approx(2 / 4)
    # FPIR 0.5: one of the two non-mated may alarm: threshold cos 45 = 0.707, and the
    # cos 35 mate passes it too. FPIR 1: everything accepted, still not the rank-2 mate.
    assert r.tpir_at_fpir[0.5] == pytest.approx(3 / 4)
    assert r.tpir_at_fpir[1.0] == pytest.approx(3 / 4)
    # a mate scoring exactly the threshold is not a hit (accept means score > t)
    same = np.array([[np.cos(0.3), np.sin(0.3)]] * 2)
    tie = identification.search(same, np.array([1, 7]), g, np.array([1, 2]))
    assert identification.evaluate(tie, fpirs=(0.0,)).tpir_at_fpir[0.0] == 0.0
    with pytest.raises(ValueError, match="1 probe features are not finite"):
        identification.search(np.array([[np.nan, 0.0]]), np.array([1]), g, np.array([1, 2]))
    # a mate below the threshold: probe at 40 degrees of subject 1 with non-mated at 30
    s2 = identification.search(np.array([[np.cos(0.7), np.sin(0.7)], p[3]]),
                               np.array([1, 7]), g, np.array([1, 2]))
    assert identification.evaluate(s2, fpirs=(0.0,)).tpir_at_fpir[0.0] == 0.0
    assert identification.evaluate(s2, fpirs=(1.0,)).tpir_at_fpir[1.0] == 1.0
    # a tie between the mate and another subject's template is not a hit
    tie = identification.search(np.array([[1.0, 1.0]]), np.array([1]), g, np.array([1, 2]))
    assert tie.mate_rank[0] == 2


def test_bad_releases_are_named(release, model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="loose_crop/ and meta/"):
        ijb_release.find_release(str(tmp_path), "IJBC")
    with pytest.raises(SystemExit):
        eval_cli.main(["--model", model_dir, "--ijb", str(tmp_path)])
    with pytest.raises(ValueError, match="--target must be one of"):
        ijb_release.find_release(str(release["root"]), "LFW")
    bad = tmp_path / "g.csv"
    bad.write_text("TEMPLATE_ID,SUBJECT_ID\n1,5\n2,6\n1,7\n")
    with pytest.raises(ValueError, match=r"g\.csv, line 4: template 1 has subject 7 but "
                                         r"line 2 gave 5"):
        identification.read_template_subjects(bad)
    bad.write_text("TEMPLATE_ID,SUBJECT_ID\n1,x\n")
    with pytest.raises(ValueError, match=r"line 2: template and subject ids must be integers"):
        identification.read_template_subjects(bad)
    bad.write_text("\ufeffTEMPLATE_ID,SUBJECT_ID\n\n")  # a BOM, a header, nothing
    with pytest.raises(ValueError, match="no records"):
        identification.read_template_subjects(bad)
    bad.write_text("\ufeff3,4\n")  # a BOM and no header: the record is kept
    np.testing.assert_array_equal(identification.read_template_subjects(bad)[0], [3])
    # a 1:N template without images; a release with only some of the 1:N files
    import shutil
    feats = np.ones((len(release["info"]), 4))
    tids = np.array([t for t, _ in release["info"]])
    part = tmp_path / "part"
    shutil.copytree(release["dir"], part)
    (part / "meta" / "ijbc_1N_probe_mixed.csv").write_text("TEMPLATE_ID,SUBJECT_ID\n9999,1\n")
    rel = ijb_release.find_release(str(part), "IJBC")
    with pytest.raises(ValueError, match=r"probe_mixed\.csv: template 9999 has no image in "
                                         r".*ijbc_face_tid_mid\.txt"):
        ijb_release.identification_protocol(rel, tids, feats)
    (part / "meta" / "ijbc_1N_gallery_G2.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"gallery_G2\.csv missing"):
        ijb_release.identification_protocol(rel, tids, feats)
    # a model's fingerprint covers its definition as well as its weights
    model, variables = export.load_backbone(model_dir)
    assert ijb_release.model_fingerprint(variables, model) != ijb_release.model_fingerprint(
        variables, model.clone(dtype=jnp.bfloat16))
    # a missing image names the meta file, its record and the path
    copy = tmp_path / "IJBC"
    shutil.copytree(release["dir"], copy)
    (copy / "loose_crop" / "3.png").unlink()
    rel = ijb_release.find_release(str(copy), "IJBC")
    meta = ijb.load_ijb_meta(rel.meta_dir, "IJBC")
    with pytest.raises(ValueError, match=r"ijbc_name_5pts_score\.txt, record 4: cannot read "
                                         r"image .*3\.png"):
        ijb_release.embed_images(eval_cli.make_embed_fn(model, variables, 8), meta, rel,
                                 batch_size=8)
