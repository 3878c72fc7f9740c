"""A view of a source's records under new labels (all or a subset of them).

``Relabeled(source, labels, num_classes, indices=None)``: record ``i`` of
the view is the source's record ``indices[i]`` (``i`` itself when
``indices`` is None), its image untouched, its label ``labels[i]``. It
implements the source interface of :mod:`pfc_jax.data.sources`. The noise
views (:mod:`pfc_jax.data.noise`) and keep-lists (:mod:`pfc_jax.data.keep`)
are such views.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class Relabeled:
    def __init__(self, source: Any, labels: np.ndarray, num_classes: int,
                 indices: np.ndarray | None = None):
        self.source = source
        self._labels = np.asarray(labels, np.int64)
        self._num_classes = int(num_classes)
        self.indices = None if indices is None else np.asarray(indices, np.int64)
        self.skip_corrupt = getattr(source, "skip_corrupt", False)

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def labels(self) -> np.ndarray:
        return self._labels.copy()

    def _source_index(self, i: int) -> int:
        return i if self.indices is None else int(self.indices[i])

    def _check(self, index: Any) -> int:
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"{self!r}: index {index} out of range [0, {len(self)})")
        return i

    def record_name(self, index: int) -> str:
        j = self._source_index(int(index))
        name = getattr(self.source, "record_name", lambda i: f"record index {i}")(j)
        return f"{name} (label {int(self._labels[index])} in {self!r})"

    def _relabel(self, i: int, ex: Any) -> Any:
        return None if ex is None else dict(ex, label=np.int32(self._labels[i]))

    def __getitem__(self, index: Any) -> Any:
        i = self._check(index)
        return self._relabel(i, self.source[self._source_index(i)])

    def __getitems__(self, indices) -> list:
        indices = [self._check(i) for i in indices]
        src = [self._source_index(i) for i in indices]
        get = getattr(self.source, "__getitems__", None)
        exs = get(src) if get is not None else [self.source[j] for j in src]
        return [self._relabel(i, ex) for i, ex in zip(indices, exs)]

    _getitems = __getitems__

    def read_raw(self, index: int) -> tuple[bytes, int]:
        data, _ = self.source.read_raw(self._source_index(int(index)))
        return data, int(self._labels[index])

    @property
    def num_corrupt(self) -> int:
        return getattr(self.source, "num_corrupt", 0)

    @property
    def corrupt_indices(self) -> list[int]:
        """The source's corrupt records met so far (source indices)."""
        return getattr(self.source, "corrupt_indices", [])
