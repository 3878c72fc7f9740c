"""``tfds`` datasets as pfc_jax sources, read without TensorFlow."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pfc_jax.data import sources
from pfc_jax.data.sources import CorruptRecordError


class TFDSDataset(sources.CorruptCounter):
    """A ``tfds`` dataset (already prepared in ``data_dir``) as a pfc_jax source.

    Reads through ``builder.as_data_source`` (no TensorFlow needed). An
    ``Image`` feature is read undecoded and decoded here, so a corrupt image
    follows the same policy as every other source and ``labels()`` decodes
    no image. ``num_classes`` is the label feature's (``ClassLabel``), or the
    ``num_classes`` argument.
    """

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None,
                 image_key: str = "image", label_key: str = "label", *,
                 skip_corrupt: bool = False, num_classes: int | None = None,
                 download: bool = False):
        self.name, self.split, self.data_dir = name, split, data_dir
        self.image_key, self.label_key = image_key, label_key
        self.skip_corrupt = bool(skip_corrupt)
        self.download = download
        self._corrupt: set[int] = set()
        self._labels: np.ndarray | None = None
        self._ds: Any = None
        ds, features = self._open()
        self._len = len(ds)
        if num_classes is None:
            num_classes = getattr(features[label_key], "num_classes", None)
            if num_classes is None:
                raise ValueError(
                    f"tfds {name}: feature {label_key!r} ({type(features[label_key]).__name__}) "
                    "does not give num_classes; pass num_classes=")
        self._num_classes = int(num_classes)

    def _open(self) -> tuple[Any, Any]:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

        builder = tfds.builder(self.name, data_dir=self.data_dir)
        if self.download:
            builder.download_and_prepare()
        features = builder.info.features
        for key in (self.image_key, self.label_key):
            if key not in features:
                raise ValueError(f"tfds {self.name}: no feature {key!r}; features are "
                                 f"{', '.join(features.keys())}")
        decoders = None
        if isinstance(features[self.image_key], tfds.features.Image):
            decoders = {self.image_key: tfds.decode.SkipDecoding()}
        self._ds = builder.as_data_source(split=self.split, decoders=decoders)
        return self._ds, features

    def _source(self) -> Any:
        if self._ds is None:
            self._open()
        return self._ds

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return (f"TFDSDataset({self.name!r}, split={self.split!r}, data_dir={self.data_dir!r}, "
                f"skip_corrupt={self.skip_corrupt})")

    @property
    def num_classes(self) -> int:
        """The label feature's number of classes (or the constructor's)."""
        return self._num_classes

    def record_name(self, index: int) -> str:
        """``"tfds <name>/<split> record index i"`` for messages."""
        return f"tfds {self.name}/{self.split} record index {index}"

    def _label(self, i: int, example: dict[str, Any]) -> int:
        value = np.asarray(example[self.label_key])
        if value.ndim != 0 or not np.issubdtype(value.dtype, np.integer) or value < 0:
            raise CorruptRecordError(f"{self.record_name(i)}: label {value!r} is not a "
                                     "non-negative integer")
        return int(value)

    def _convert(self, i: int, example: dict[str, Any]) -> sources.Example | None:
        where = self.record_name(i)
        try:
            label = self._label(i, example)
            value = example[self.image_key]
            if isinstance(value, (bytes, np.bytes_)):
                image = sources.decode_record_image(bytes(value), where)
            else:
                image = np.asarray(value)
                if image.ndim == 3 and image.shape[2] == 1:
                    image = image[:, :, 0]
                if image.ndim == 2:
                    image = np.stack([image] * 3, axis=-1)
                if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                    raise CorruptRecordError(
                        f"{where}: image {image.dtype} {image.shape} is not uint8 [H, W, 3]")
        except CorruptRecordError as e:
            sources.handle_corrupt(self, i, e)
            return None
        return sources.make_example(image, label)

    def __getitem__(self, index: Any) -> sources.Example | None:
        i = sources.check_index(index, len(self), repr(self))
        return self._convert(i, self._source()[i])

    def __getitems__(self, indices: Sequence[int]) -> list[sources.Example | None]:
        idx = [sources.check_index(i, len(self), repr(self)) for i in indices]
        examples = self._source().__getitems__(idx)
        return [self._convert(i, ex) for i, ex in zip(idx, examples)]

    _getitems = __getitems__  # grain's batched-read hook

    def labels(self) -> np.ndarray:
        """Every record's label (int64), with images left undecoded."""
        if self._labels is None:
            out = np.empty(len(self), np.int64)
            ds = self._source()
            for start in range(0, len(self), 1024):
                idx = list(range(start, min(start + 1024, len(self))))
                for i, ex in zip(idx, ds.__getitems__(idx)):
                    out[i] = self._label_or_unreadable(i, lambda: self._label(i, ex))
            self._labels = out
        return self._labels.copy()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_ds"] = None  # reopened lazily in the worker
        state["_labels"] = None
        state["_corrupt"] = set(self._corrupt)
        return state
