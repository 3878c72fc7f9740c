"""Label noise for experiments: a view over any source, with its ground truth.

``NoisyLabels(source, flip=p, conflict=q, seed=s)`` changes labels only
(images are read from ``source`` unchanged), deterministically in ``seed``:

1. **Conflict** (inter-class noise, duplicate identities): ``round(q * C)``
   identities, drawn without replacement, are split in two. Of each split
   identity's readable records, a random half (rounded down, at least one when
   it has two or more) moves to a new label ``C + j``. Labels ``c`` and
   ``C + j`` are then *twins*: one person under two labels, the case Partial
   FC's sampling and filtering target. The view has ``C' = C + round(q * C)``
   classes.
2. **Flips** (label noise, mislabelled images): ``round(p * N)`` of the ``N``
   readable records, drawn without replacement, get a label drawn uniformly
   from the ``C' - 1`` classes other than the one they had after step 1.

Records that the source could not read (label -1 from ``labels()`` with
``skip_corrupt``) are never chosen and keep -1. Every label of the view lies
in ``[0, C')``.

Ground truth, for scoring cleaning and suspect lists: ``true_identity``
(the source's label of every record), ``flipped`` (bool per record),
``twins`` (``[n, 2]`` pairs ``(c, C + j)``) and ``clean_label`` (the label a
record would have after the split but without the flip). ``save_truth(path)``
writes them to ``.npz``; :func:`load_truth` reads them back.

In the trainer: ``--config.data.noise.flip=0.4 --config.data.noise.conflict=0.2``
(``noise.seed`` defaults to 0). With conflict the trainer's head gets the
``C'`` classes (:func:`num_classes_after`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from pfc_jax.data.sources import UNREADABLE_LABEL
from pfc_jax.data.views import Relabeled

_STREAM_CONFLICT, _STREAM_FLIP = 0xC0F1, 0xF11B


def num_classes_after(num_classes: int, conflict: float) -> int:
    """``C'``: the classes of a view with conflict fraction ``conflict`` over ``C``."""
    return int(num_classes) + int(round(float(conflict) * int(num_classes)))


def _check_fraction(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"noise.{name} must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= v < 1.0:
        raise ValueError(f"noise.{name} must be in [0, 1), got {value!r}")
    return v


@dataclasses.dataclass(frozen=True)
class NoiseTruth:
    """What the noise did, record by record (arrays of length ``len(view)``)."""

    true_identity: np.ndarray   # int64: the source's label (-1: unreadable)
    clean_label: np.ndarray     # int64: label after the split, before the flip
    noisy_label: np.ndarray     # int64: the view's label
    flipped: np.ndarray         # bool
    twins: np.ndarray           # int64 [n, 2]: (original class, its new twin label)
    num_classes: int            # C'
    source_classes: int         # C

    def save(self, path: str) -> None:
        np.savez(path, **{f.name: np.asarray(getattr(self, f.name))
                          for f in dataclasses.fields(self)})


def load_truth(path: str) -> NoiseTruth:
    with np.load(path) as z:
        return NoiseTruth(**{f.name: (int(z[f.name]) if f.name.endswith("classes")
                                      else np.array(z[f.name]))
                             for f in dataclasses.fields(NoiseTruth)})


def make_noise(labels: np.ndarray, num_classes: int, *, flip: float = 0.0,
               conflict: float = 0.0, seed: int = 0) -> NoiseTruth:
    """The noisy labels and ground truth for a label array (see the module docstring)."""
    flip, conflict = _check_fraction("flip", flip), _check_fraction("conflict", conflict)
    labels = np.asarray(labels, np.int64)
    c = int(num_classes)
    readable = labels != UNREADABLE_LABEL
    if np.any(readable & ((labels < 0) | (labels >= c))):
        bad = int(np.argmax(readable & ((labels < 0) | (labels >= c))))
        raise ValueError(f"noise: record {bad} has label {int(labels[bad])}, "
                         f"outside [0, {c})")
    clean = labels.copy()
    n_split = int(round(conflict * c))
    twins = np.zeros((n_split, 2), np.int64)
    if n_split:
        rng = np.random.default_rng([int(seed), _STREAM_CONFLICT])
        split = np.sort(rng.choice(c, n_split, replace=False))
        twin_of = np.full(c, -1, np.int64)
        twin_of[split] = c + np.arange(n_split)
        twins[:] = np.stack([split, twin_of[split]], axis=1)
        # Within each split class, records in a random order; the first half moves.
        members = np.flatnonzero(readable & (twin_of[np.clip(labels, 0, c - 1)] >= 0))
        order = members[np.lexsort((rng.random(len(members)), labels[members]))]
        cls = labels[order]
        start = np.searchsorted(cls, cls, side="left")
        size = np.searchsorted(cls, cls, side="right") - start
        rank = np.arange(len(order)) - start
        moved = order[rank < size // 2]
        clean[moved] = twin_of[labels[moved]]
    c_after = c + n_split
    noisy = clean.copy()
    flipped = np.zeros(len(labels), bool)
    n_flip = int(round(flip * int(readable.sum())))
    if n_flip:
        if c_after < 2:
            raise ValueError("noise.flip needs at least 2 classes")
        rng = np.random.default_rng([int(seed), _STREAM_FLIP])
        chosen = rng.choice(np.flatnonzero(readable), n_flip, replace=False)
        # Uniform over the other C' - 1 classes: draw in [0, C' - 1), skip own.
        other = rng.integers(0, c_after - 1, n_flip)
        noisy[chosen] = other + (other >= clean[chosen])
        flipped[chosen] = True
    return NoiseTruth(true_identity=labels, clean_label=clean, noisy_label=noisy,
                      flipped=flipped, twins=twins, num_classes=c_after, source_classes=c)


class NoisyLabels(Relabeled):
    """A source whose labels carry injected noise; images come from ``source``.

    A :class:`~pfc_jax.data.views.Relabeled` view; ``truth`` is the
    :class:`NoiseTruth`.
    """

    def __init__(self, source: Any, *, flip: float = 0.0, conflict: float = 0.0,
                 seed: int = 0):
        self.flip, self.conflict, self.seed = float(flip), float(conflict), int(seed)
        self.truth = make_noise(source.labels(), source.num_classes, flip=flip,
                                conflict=conflict, seed=seed)
        super().__init__(source, self.truth.noisy_label, self.truth.num_classes)

    def __repr__(self) -> str:
        return (f"NoisyLabels({self.source!r}, flip={self.flip}, conflict={self.conflict}, "
                f"seed={self.seed})")


def truth_of(source: Any) -> NoiseTruth | None:
    """The ground truth of the noise under ``source``, in ``source``'s own record
    order and labels (a keep-list over a noise view keeps its records' truth, and
    the twin pairs both of whose classes it kept, relabelled); None without noise."""
    views = []
    while source is not None and not isinstance(source, NoisyLabels):
        views.append(source)
        source = getattr(source, "source", None)
    if source is None:
        return None
    t = source.truth
    for view in reversed(views):  # innermost first
        idx = getattr(view, "indices", None)
        if idx is None:
            continue
        old = np.asarray(view.old_class)
        pos = np.searchsorted(old, t.twins).clip(0, max(len(old) - 1, 0))
        both = (old[pos] == t.twins).all(axis=1) if len(old) else np.zeros(len(t.twins), bool)
        t = NoiseTruth(true_identity=t.true_identity[idx], clean_label=t.clean_label[idx],
                       noisy_label=view.labels(), flipped=t.flipped[idx],
                       twins=pos[both].astype(np.int64), num_classes=view.num_classes,
                       source_classes=t.source_classes)
    return t
