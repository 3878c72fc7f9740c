"""Keep-lists: a subset of a source's records under new labels, as one file.

A keep-list is what ``pfc-clean`` and ``pfc-suspects --drop-fraction`` write
(``keep.npz``) and what the trainer reads with ``--config.data.keep_list=PATH``.
It works over every source kind
(RecordIO, image folder, ArrayRecord, TFDS, synthetic), because it stores
record indices, not images:

    indices      int64 [M]  records of the source that are kept, ascending
    labels       int64 [M]  their new labels, in [0, num_classes)
    num_classes  int        classes after cleaning (labels re-indexed 0..n-1)
    old_class    int64 [num_classes]  the source label each new label came from
    source_len, source_num_classes, source_labels_sha256
                 what the list was made from; a list applied to another
                 dataset, or to the same one under other noise settings, is
                 refused with a message that names the file and the mismatch

:class:`KeptRecords` is the view: ``len`` M, record ``i`` is the source's
record ``indices[i]`` with label ``labels[i]``.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from pfc_jax.data.views import Relabeled


def labels_digest(labels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(labels, np.int64).tobytes()).hexdigest()


def write_keep_list(path: str, source: Any, keep: np.ndarray) -> dict:
    """Writes the keep-list of ``source`` for a boolean ``keep [len(source)]``.

    Classes left without a record are dropped; the remaining ones are
    re-indexed in the order of their old labels. Returns the list's summary.
    """
    labels = np.asarray(source.labels(), np.int64)
    keep = np.asarray(keep, bool)
    if keep.shape != labels.shape:
        raise ValueError(f"keep mask has shape {keep.shape}, source has {labels.shape[0]} records")
    keep = keep & (labels >= 0)
    indices = np.flatnonzero(keep)
    old_class = np.unique(labels[indices])
    new_labels = np.searchsorted(old_class, labels[indices])
    summary = dict(indices=indices.astype(np.int64), labels=new_labels.astype(np.int64),
                   num_classes=np.int64(len(old_class)), old_class=old_class.astype(np.int64),
                   source_len=np.int64(len(labels)),
                   source_num_classes=np.int64(source.num_classes),
                   source_labels_sha256=np.array(labels_digest(labels)))
    tmp = path + ".tmp.npz"
    np.savez(tmp, **summary)
    os.replace(tmp, path)  # a reader never sees half a list
    return summary


class KeptRecords(Relabeled):
    """The records of ``source`` named by the keep-list at ``path``, relabelled."""

    def __init__(self, source: Any, path: str):
        self.path = os.fspath(path)
        try:
            with np.load(self.path) as z:
                indices = np.array(z["indices"], np.int64)
                kept_labels = np.array(z["labels"], np.int64)
                num_classes = int(z["num_classes"])
                self.old_class = np.array(z["old_class"], np.int64)
                made = (int(z["source_len"]), int(z["source_num_classes"]),
                        str(z["source_labels_sha256"]))
        except FileNotFoundError:
            raise FileNotFoundError(f"keep-list {self.path} does not exist") from None
        except (KeyError, ValueError, OSError) as e:
            raise ValueError(f"keep-list {self.path} is not a keep-list written by "
                             f"pfc-clean or pfc-suspects: {type(e).__name__}: {e}") from e
        labels = np.asarray(source.labels(), np.int64)
        now = (len(labels), int(source.num_classes), labels_digest(labels))
        for what, a, b in zip(("records", "classes", "labels (sha256)"), made, now):
            if a != b:
                raise ValueError(
                    f"keep-list {self.path} was made from a source with {what} {a}, but the "
                    f"configured source {source!r} has {b}: the same data and the same "
                    "data.noise settings are needed")
        m = len(indices)
        if (kept_labels.shape != (m,) or m == 0 or np.any(np.diff(indices) <= 0)
                or indices[0] < 0 or indices[-1] >= len(labels)
                or kept_labels.min() < 0 or kept_labels.max() >= num_classes):
            raise ValueError(f"keep-list {self.path}: indices or labels out of range "
                             f"({m} records, {num_classes} classes)")
        super().__init__(source, kept_labels, num_classes, indices)

    def __repr__(self) -> str:
        return f"KeptRecords({self.source!r}, {self.path!r}: {len(self)} records)"

