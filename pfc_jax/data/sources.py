"""What every dataset source shares: the interface, errors, decoding and checks.

A *source* is a random-access data source that grain can read
(``grain.python.RandomAccessDataSource`` protocol):

    len(src) -> int
    src[i] -> {"image": uint8 [H, W, 3] RGB, "label": np.int32 scalar} or None
    src.__getitems__(indices) -> list of the same (also exposed as ``_getitems``,
                                 grain's batched-read fast path)
    src.num_classes -> int
    src.labels() -> int64 [len(src)]   # every label, no image decoded
    src.record_name(i) -> str          # where record i lives, for messages
    src.num_corrupt -> int             # distinct corrupt records met so far
    src.corrupt_indices -> list[int]   # and which
    src.read_raw(i) -> (bytes, int)    # encoded image + label (RecordIO, folder,
                                       # ArrayRecord), used by the converter

Decoded images are writable uint8 arrays of the stored size (no resizing).

Corrupt records. Every source takes ``skip_corrupt``. When it is False, a
record that cannot be read raises :class:`CorruptRecordError` naming the file,
the record (index, key, offset) and the reason. When it is True, the source
logs a warning naming the record (once per record), remembers its index, and
returns ``None`` in its place; the pipeline drops the ``None``. In grain worker
processes the counter lives in the worker's copy of the source.

A record whose label cannot be read (a broken frame, a negative or fractional
label, one above 2**24) is corrupt too. With ``skip_corrupt=True``, ``labels()`` gives such a
record the label :data:`UNREADABLE_LABEL` (-1) and :func:`check_labels` leaves
it out, since the record itself will be dropped when read. No readable record
ever has a negative label, so -1 is unambiguous.

``open_source(kind, path, **kw)`` opens any of the kinds by name.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

logger = logging.getLogger("pfc_jax.data")

UNREADABLE_LABEL = -1
KINDS = ("recordio", "folder", "arrayrecord", "tfds")

Example = dict[str, Any]


class CorruptRecordError(ValueError):
    """A record that cannot be read: bad framing, truncated data, an undecodable image."""


def decode_image(data: bytes) -> np.ndarray:
    """Decodes an encoded image (JPEG, PNG, BMP, ...) to uint8 RGB ``[H, W, 3]``.

    Raises:
      ValueError: the bytes are empty or Pillow cannot decode them completely;
        the message gives Pillow's reason. Truncated images are errors.
    """
    if not data:
        raise ValueError("empty image data (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode != "RGB":
                im = im.convert("RGB")
            arr = np.array(im, dtype=np.uint8)  # a writable copy
    except MemoryError:
        raise
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, struct.error...)
        head = bytes(data[:8]).hex()
        raise ValueError(
            f"cannot decode image ({len(data)} bytes, starts {head}): "
            f"{type(e).__name__}: {e}") from e
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"decoded image has unexpected shape {arr.shape}")
    return arr


def decode_record_image(data: bytes, where: str) -> np.ndarray:
    """:func:`decode_image`, a failure raised as CorruptRecordError naming ``where``."""
    try:
        return decode_image(data)
    except ValueError as e:
        raise CorruptRecordError(f"{where}: {e}") from e


def encode_image(image: np.ndarray, image_format: str = "jpeg", quality: int = 95) -> bytes:
    """Encodes uint8 ``[H, W, 3]`` (or ``[H, W]``) as ``"jpeg"`` or ``"png"`` bytes."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {arr.dtype}")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3))):
        raise ValueError(f"image must be [H, W], [H, W, 1] or [H, W, 3], got {arr.shape}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    fmt = image_format.lower()
    buf = io.BytesIO()
    if fmt in ("jpeg", "jpg"):
        Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality))
    elif fmt == "png":
        Image.fromarray(arr).save(buf, format="PNG")
    else:
        raise ValueError(f"image_format must be 'jpeg' or 'png', got {image_format!r}")
    return buf.getvalue()


def image_format_of(data: bytes) -> str | None:
    """``"jpeg"``, ``"png"``, ``"bmp"`` from the leading magic bytes, else None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:2] == b"BM":
        return "bmp"
    return None


MAX_EXACT_LABEL = 1 << 24
"""The largest label float32 stores exactly (every integer up to it is exact)."""


def label_from_float(value: float, where: str, limit: int | None = MAX_EXACT_LABEL) -> int:
    """An integer class label from a stored float; CorruptRecordError if not one.

    Labels are stored as float32 by the RecordIO format, which is exact up to
    2**24 (16,777,216) classes: a larger value is no label that was written
    (a damaged record). ``limit=None`` drops that bound (for record keys).
    """
    v = float(value)
    if not np.isfinite(v) or v != int(v) or v < 0:
        raise CorruptRecordError(f"{where}: label {v!r} is not a non-negative integer")
    if limit is not None and v > limit:
        raise CorruptRecordError(f"{where}: label {v!r} exceeds {limit}, the largest "
                                 "label float32 stores exactly")
    return int(v)


def make_example(image: np.ndarray, label: int) -> Example:
    """The record dict every source returns."""
    return {"image": image, "label": np.int32(label)}


class CorruptCounter:
    """Base of the file sources: the corrupt records met so far in this process,
    and what every reader does the same way.

    A source sets ``skip_corrupt``, ``_corrupt = set()`` and ``_num_classes``
    (None: max label + 1) and reports through :func:`handle_corrupt`.
    """

    skip_corrupt: bool
    _corrupt: set[int]
    _num_classes: int | None

    @property
    def num_classes(self) -> int:
        """The count the source's metadata gives, else max label + 1."""
        if self._num_classes is None:
            labels = self.labels()
            self._num_classes = int(labels.max()) + 1 if len(labels) else 0
        return self._num_classes

    def _example_or_skip(self, i: int, read) -> Example | None:
        """``make_example(*read())`` for record ``i``; a CorruptRecordError from
        ``read`` goes to :func:`handle_corrupt` (raised, or None when skipping)."""
        try:
            image, label = read()
        except CorruptRecordError as e:
            handle_corrupt(self, i, e)
            return None
        return make_example(image, label)

    def _label_or_unreadable(self, i: int, read) -> int:
        """``read()``, record ``i``'s label; ``UNREADABLE_LABEL`` when it is corrupt
        and skipped."""
        try:
            return read()
        except CorruptRecordError as e:
            handle_corrupt(self, i, e)
            return UNREADABLE_LABEL

    @property
    def num_corrupt(self) -> int:
        """Distinct corrupt records met so far in this process."""
        return len(self._corrupt)

    @property
    def corrupt_indices(self) -> list[int]:
        """Indices of the corrupt records met so far in this process."""
        return sorted(self._corrupt)


def handle_corrupt(src: Any, index: int, error: CorruptRecordError) -> None:
    """Raises ``error`` unless ``src.skip_corrupt``; then records and logs it once.

    ``src`` must have ``skip_corrupt: bool`` and ``_corrupt: set[int]``.
    """
    if not src.skip_corrupt:
        raise error
    if index not in src._corrupt:  # pylint: disable=protected-access
        src._corrupt.add(index)  # pylint: disable=protected-access
        logger.warning("skipping corrupt record %d: %s", index, error)


def check_index(index: Any, n: int, where: str) -> int:
    """A valid record index in ``[0, n)``; negative indices count from the end."""
    try:
        i = index.__index__()
    except AttributeError:
        raise TypeError(f"{where}: record index must be an integer, got {index!r}") from None
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"{where}: record index {index} out of range [0, {n})")
    return i


def check_labels(src: Any, num_classes: int) -> None:
    """Raises ValueError if any label of ``src`` is outside ``[0, num_classes)``.

    Reads ``src.labels()`` only (no image is decoded). The message names the
    first offending record (index and, where the source can say, its file,
    key and offset), its label, and how many records are out of range.
    Records that a ``skip_corrupt`` source could not read at all
    (label :data:`UNREADABLE_LABEL`) are left out: the pipeline masks them
    (label -1, ``valid = False``), so they add nothing to the loss.
    """
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    labels = np.asarray(src.labels())
    if labels.shape != (len(src),):
        raise ValueError(
            f"labels() of {src!r} has shape {labels.shape}, expected ({len(src)},)")
    bad = (labels < 0) | (labels >= num_classes)
    if getattr(src, "skip_corrupt", False):
        unreadable = labels == UNREADABLE_LABEL
        if unreadable.any():
            logger.warning("%d unreadable records of %r will be skipped",
                           int(unreadable.sum()), src)
        bad &= ~unreadable
    n_bad = int(bad.sum())
    if n_bad:
        i = int(np.argmax(bad))
        name = src.record_name(i) if hasattr(src, "record_name") else f"record index {i}"
        raise ValueError(
            f"{n_bad} of {len(labels)} records have a label outside [0, {num_classes}); "
            f"the first is {name} with label {int(labels[i])} "
            f"(labels seen: min {int(labels.min())}, max {int(labels.max())})")


def open_source(kind: str, path: str, **kw: Any) -> Any:
    """Opens a source by kind: ``"recordio" | "folder" | "arrayrecord" | "tfds"``.

    ``path`` is the RecordIO folder (or ``.rec`` file), the image-folder root,
    the ArrayRecord file or glob, or the TFDS dataset name. Keyword arguments
    go to the source's constructor (e.g. ``skip_corrupt=True``; for TFDS
    ``split``, ``data_dir``, ``image_key``, ``label_key``).
    """
    cls: Callable[..., Any]
    if kind == "recordio":
        from pfc_jax.data.recordio import RecordIODataset as cls
    elif kind == "folder":
        from pfc_jax.data.folder import ImageFolderDataset as cls
    elif kind == "arrayrecord":
        from pfc_jax.data.arrayrecord import ArrayRecordDataset as cls
    elif kind == "tfds":
        from pfc_jax.data.tfds_source import TFDSDataset as cls
    else:
        raise ValueError(f"unknown source kind {kind!r}; expected one of {', '.join(KINDS)}")
    return cls(path, **kw)
