"""Writes InsightFace RecordIO (``train.rec`` + ``train.idx`` + ``property``).

The format is ``pfc_jax.data.recordio``'s, which reads it; this writer makes
valid sets of files for tests, small datasets and the cleaned copies
``pfc-clean`` writes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from pfc_jax.data import sources
from pfc_jax.data.recordio import MAX_EXACT_LABEL, frame_record, pack_payload


class RecordIOWriter:
    """Writes ``train.rec``, ``train.idx`` and ``property`` into ``folder``.

    With ``header=True`` (default) key 0 is the header record, images are keys
    ``1..N`` in the order added, and :meth:`close` appends one identity record
    per label ``0 .. num_classes - 1`` (``identities=True``; each identity's
    images must then be added consecutively; a label without images gets the
    empty range ``[0, 0)``). With ``header=False`` images are keys ``0..N-1``.

    Use as a context manager or call :meth:`close`::

        with RecordIOWriter(folder) as w:
            w.add_image(image_array, label=3)
    """

    def __init__(self, folder: str | os.PathLike, *, header: bool = True,
                 identities: bool | None = None, image_format: str = "jpeg",
                 quality: int = 95, write_property: bool = True):
        if identities is None:
            identities = header
        if identities and not header:
            raise ValueError("identity records need the header record (header=True)")
        self.folder = os.fspath(folder)
        os.makedirs(self.folder, exist_ok=True)
        self.rec_path = os.path.join(self.folder, "train.rec")
        self.idx_path = os.path.join(self.folder, "train.idx")
        self.property_path = os.path.join(self.folder, "property")
        self.header, self.identities = header, identities
        self.image_format, self.quality = image_format, quality
        self.write_property = write_property
        self._rec = open(self.rec_path, "wb")  # pylint: disable=consider-using-with
        self._index: list[tuple[int, int]] = []
        self._ranges: dict[int, list[int]] = {}
        self._last_label: int | None = None
        self._max_label = -1
        self._image_size: tuple[int, int] | None = None
        self._closed = False
        if header:
            self._header_frame = frame_record(pack_payload([0.0, 0.0]))
            self._write(0, self._header_frame)

    @property
    def num_images(self) -> int:
        """Images written so far."""
        return len(self._index) - (1 if self.header else 0)

    def _write(self, key: int, frame: bytes) -> None:
        self._index.append((key, self._rec.tell()))
        self._rec.write(frame)

    def add_image(self, image: np.ndarray | bytes, label: int, *,
                  extra_labels: Sequence[float] = (), id: int | None = None,
                  id2: int = 0) -> int:  # pylint: disable=redefined-builtin
        """Appends one image record and returns its key.

        Args:
          image: a uint8 array (encoded with ``image_format``/``quality``) or
            already-encoded bytes (written verbatim, even if not an image).
          label: the class label, an integer in ``[0, 2**24]``.
          extra_labels: more float labels; if given, the header has
            ``flag = 1 + len(extra_labels)`` and the labels follow it.
          id: the header's ``id`` field (default: the key); ``id2`` likewise.
        """
        if self._closed:
            raise ValueError(f"{self.rec_path}: writer is closed")
        label = int(label)
        if not 0 <= label <= MAX_EXACT_LABEL:
            raise ValueError(f"label {label} must be in [0, {MAX_EXACT_LABEL}] "
                             "(labels are stored as float32)")
        key = len(self._index)
        if self.identities and label != self._last_label and label in self._ranges:
            raise ValueError(
                f"label {label} at key {key}: with identity records, each identity's "
                "images must be added consecutively (or pass identities=False)")
        if isinstance(image, (bytes, bytearray, memoryview)):
            data = bytes(image)
        else:
            arr = np.asarray(image)
            if self._image_size is None:
                self._image_size = (int(arr.shape[0]), int(arr.shape[1]))
            data = sources.encode_image(arr, self.image_format, self.quality)
        labels: float | list[float] = float(label)
        if len(extra_labels):
            labels = [float(label)] + [float(x) for x in extra_labels]
        payload = pack_payload(labels, data, id=key if id is None else id, id2=id2)
        self._write(key, frame_record(payload))
        self._ranges.setdefault(label, [key, key])[1] = key + 1
        self._last_label = label
        self._max_label = max(self._max_label, label)
        return key

    def close(self, num_classes: int | None = None,
              image_size: tuple[int, int] | None = None) -> None:
        """Writes the identity records, the header record, the index and ``property``.

        Args:
          num_classes: written to ``property`` and the number of identity
            records; default max label + 1.
          image_size: ``(height, width)`` for ``property``; default the first
            array image's size, else (112, 112).
        """
        if self._closed:
            return
        if num_classes is None:
            num_classes = self._max_label + 1
        if num_classes <= self._max_label:
            raise ValueError(f"num_classes={num_classes} but label {self._max_label} was written")
        try:
            if self.header:
                first = len(self._index)
                if self.identities:
                    for c in range(num_classes):
                        start, end = self._ranges.get(c, (0, 0))
                        self._write(len(self._index),
                                    frame_record(pack_payload([start, end], id=c)))
                header = frame_record(pack_payload([float(first), float(len(self._index))]))
                assert len(header) == len(self._header_frame)
                self._rec.seek(0)
                self._rec.write(header)
        finally:
            self._rec.close()
            self._closed = True
        with open(self.idx_path, "w", encoding="ascii") as f:
            f.writelines(f"{k}\t{o}\n" for k, o in self._index)
        if self.write_property and num_classes > 0:
            h, w = image_size or self._image_size or (112, 112)
            with open(self.property_path, "w", encoding="ascii") as f:
                f.write(f"{num_classes},{h},{w}")

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is None:
            self.close()
        elif not self._closed:
            self._rec.close()
            self._closed = True
