"""Label-noise views and keep-lists: exact fractions, determinism, ground truth, refusals."""

import numpy as np
import pytest

from pfc_jax.data import keep as keep_lib
from pfc_jax.data import noise as noise_lib
from pfc_jax.data.sources import UNREADABLE_LABEL


class _Labels:
    """A source of labels only (images are tagged with their record index)."""

    def __init__(self, labels, num_classes):
        self._labels = np.asarray(labels, np.int64)
        self.num_classes = num_classes

    def __len__(self):
        return len(self._labels)

    def labels(self):
        return self._labels.copy()

    def __getitem__(self, i):
        if self._labels[i] < 0:
            return None
        return {"image": np.full((2, 2, 3), i % 256, np.uint8), "label": np.int32(self._labels[i])}

    def __getitems__(self, idx):
        return [self[i] for i in idx]


def _uneven(num_classes=50, seed=0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 12, num_classes)
    return np.repeat(np.arange(num_classes), sizes)


@pytest.mark.parametrize("flip,conflict", [(0.4, 0.0), (0.0, 0.2), (0.25, 0.3), (0.0, 0.0)])
def test_noise_changes_exactly_the_requested_fraction(flip, conflict):
    labels = _uneven()
    c = 50
    t = noise_lib.make_noise(labels, c, flip=flip, conflict=conflict, seed=3)
    n_split = round(conflict * c)
    assert t.num_classes == c + n_split == noise_lib.num_classes_after(c, conflict)
    assert t.noisy_label.min() >= 0 and t.noisy_label.max() < t.num_classes
    np.testing.assert_array_equal(t.true_identity, labels)
    # flips: exactly round(p N) records, each to a label other than its clean one
    assert t.flipped.sum() == round(flip * len(labels))
    assert np.all(t.noisy_label[t.flipped] != t.clean_label[t.flipped])
    np.testing.assert_array_equal(t.noisy_label[~t.flipped], t.clean_label[~t.flipped])
    # conflict: round(q C) identities split; each moves floor(n/2) of its records
    assert t.twins.shape == (n_split, 2)
    assert len(np.unique(t.twins[:, 0])) == n_split
    np.testing.assert_array_equal(t.twins[:, 1], c + np.arange(n_split))
    for orig, twin in t.twins:
        members = labels == orig
        assert np.sum(t.clean_label == twin) == members.sum() // 2
        assert set(np.unique(t.clean_label[members])) <= {orig, twin}
        # a twin label holds images of its original identity only
        np.testing.assert_array_equal(t.true_identity[t.clean_label == twin], orig)
    untouched = ~np.isin(labels, t.twins[:, 0])
    np.testing.assert_array_equal(t.clean_label[untouched], labels[untouched])


def test_flips_are_uniform_over_the_other_classes():
    # 20,000 flips over 5 classes: each of the 4 other classes gets ~1/4 (binomial)
    labels = np.repeat(np.arange(5), 10_000)
    t = noise_lib.make_noise(labels, 5, flip=0.4, seed=0)
    moved = t.noisy_label[t.flipped] - t.clean_label[t.flipped]
    for own in range(5):
        got = t.noisy_label[t.flipped & (labels == own)]
        counts = np.bincount(got, minlength=5)
        assert counts[own] == 0
        n = counts.sum()
        sd = np.sqrt(n * 0.25 * 0.75)
        assert np.all(np.abs(counts[np.arange(5) != own] - n / 4) < 5 * sd)
    assert np.all(moved != 0)


def test_noise_is_deterministic_in_the_seed_and_skips_unreadable_records():
    labels = _uneven()
    labels[[3, 17, 40]] = UNREADABLE_LABEL
    a = noise_lib.make_noise(labels, 50, flip=0.3, conflict=0.2, seed=7)
    b = noise_lib.make_noise(labels, 50, flip=0.3, conflict=0.2, seed=7)
    c = noise_lib.make_noise(labels, 50, flip=0.3, conflict=0.2, seed=8)
    np.testing.assert_array_equal(a.noisy_label, b.noisy_label)
    assert np.any(a.noisy_label != c.noisy_label)
    assert np.all(a.noisy_label[[3, 17, 40]] == UNREADABLE_LABEL)
    assert not a.flipped[[3, 17, 40]].any()
    assert a.flipped.sum() == round(0.3 * (len(labels) - 3))


def test_noisy_view_serves_noisy_labels_and_saves_its_truth(tmp_path):
    src = _Labels(_uneven(), 50)
    view = noise_lib.NoisyLabels(src, flip=0.4, conflict=0.1, seed=1)
    assert len(view) == len(src) and view.num_classes == 55
    got = np.array([view[i]["label"] for i in range(len(view))])
    np.testing.assert_array_equal(got, view.labels())
    batch = view.__getitems__([5, 0, 9])
    assert [int(e["label"]) for e in batch] == [int(view.labels()[i]) for i in (5, 0, 9)]
    assert int(batch[0]["image"][0, 0, 0]) == 5   # the source's image, untouched
    view.truth.save(str(tmp_path / "t.npz"))
    back = noise_lib.load_truth(str(tmp_path / "t.npz"))
    np.testing.assert_array_equal(back.flipped, view.truth.flipped)
    np.testing.assert_array_equal(back.twins, view.truth.twins)
    assert back.num_classes == 55 and back.source_classes == 50


def test_bad_fractions_and_labels_are_refused():
    with pytest.raises(ValueError, match="noise.flip must be in"):
        noise_lib.make_noise(np.zeros(4, int), 2, flip=1.0)
    with pytest.raises(ValueError, match="noise.conflict must be a number"):
        noise_lib.make_noise(np.zeros(4, int), 2, conflict="lots")
    with pytest.raises(ValueError, match="record 1 has label 9"):
        noise_lib.make_noise(np.array([0, 9]), 2, flip=0.5)


def test_keep_list_relabels_drops_empty_classes_and_refuses_other_data(tmp_path):
    labels = np.array([0, 0, 1, 1, 2, 3, 3, 3])
    src = _Labels(labels, 4)
    keep = np.array([1, 0, 0, 0, 1, 1, 0, 1], bool)   # class 1 left empty
    path = str(tmp_path / "keep.npz")
    s = keep_lib.write_keep_list(path, src, keep)
    assert int(s["num_classes"]) == 3
    view = keep_lib.KeptRecords(src, path)
    assert len(view) == 4 and view.num_classes == 3
    np.testing.assert_array_equal(view.labels(), [0, 1, 2, 2])      # 0, 2, 3 -> 0, 1, 2
    np.testing.assert_array_equal(view.old_class, [0, 2, 3])
    assert [int(view[i]["image"][0, 0, 0]) for i in range(4)] == [0, 4, 5, 7]
    assert [int(e["label"]) for e in view.__getitems__([3, 0])] == [2, 0]
    with pytest.raises(IndexError):
        view[4]
    other = _Labels(labels[::-1].copy(), 4)        # same size and classes, other labels
    with pytest.raises(ValueError, match=r"keep.npz was made from a source with labels"):
        keep_lib.KeptRecords(other, path)
    with pytest.raises(ValueError, match="records 8"):
        keep_lib.KeptRecords(_Labels(labels[:6], 4), path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        keep_lib.KeptRecords(src, str(tmp_path / "none.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a keep-list"):
        keep_lib.KeptRecords(src, str(tmp_path / "junk.npz"))


def test_truth_follows_a_keep_list_over_a_noise_view(tmp_path):
    src = _Labels(np.repeat(np.arange(10), 6), 10)
    view = noise_lib.NoisyLabels(src, flip=0.3, conflict=0.2, seed=2)
    t = view.truth
    keep = np.ones(len(view), bool)
    keep[view.labels() == t.twins[0, 1]] = False        # the first twin label empties
    keep[::7] = False
    keep_lib.write_keep_list(str(tmp_path / "k.npz"), view, keep)
    kept = keep_lib.KeptRecords(view, str(tmp_path / "k.npz"))
    sub = noise_lib.truth_of(kept)
    np.testing.assert_array_equal(sub.flipped, t.flipped[kept.indices])
    np.testing.assert_array_equal(sub.true_identity, t.true_identity[kept.indices])
    np.testing.assert_array_equal(sub.noisy_label, kept.labels())
    # twin pairs whose classes both survive, in the new labels; the emptied one is gone
    expect = [[int(np.searchsorted(kept.old_class, a)), int(np.searchsorted(kept.old_class, b))]
              for a, b in t.twins[1:]]
    np.testing.assert_array_equal(sub.twins, np.array(expect).reshape(-1, 2))
    assert noise_lib.truth_of(src) is None
    assert noise_lib.truth_of(view) is t
