"""InsightFace RecordIO (``train.rec`` + ``train.idx`` [+ ``property``]), pure Python.

File layout (METHODS.md, last section):

* ``train.rec`` is a sequence of records. Each record is framed as a u32
  magic ``0xced7230a``, a u32 ``lrec`` whose low 29 bits are the length of the
  data that follows and whose upper 3 bits are a continuation flag, the data,
  and zero padding to a multiple of 4 bytes. Flag 0 is a whole record. A
  record whose data contains the magic at a 4-byte-aligned position is
  written in parts: flag 1 (first part), 2 (middle), 3 (last); the magic that
  stood between two parts is not stored, so reading puts it back.
* The record payload is a header ``<IfQQ`` (flag, label, id, id2). If
  ``flag > 0``, ``flag`` float32 labels follow and the first is the label;
  else the header's ``label`` field is. The encoded image (JPEG/PNG) follows.
* Key 0 is a header record whose labels are ``[first_identity_record, end]``:
  images are keys ``1 .. first_identity_record - 1``; keys in
  ``[first_identity_record, end)`` are identity records, each holding the
  ``[start, end)`` key range of one identity's images. If key 0's flag is 0
  (or there is no key 0), the file has no header and every key in the index
  is an image, in index order.
* ``train.idx`` has one ``key<TAB>offset`` line per record.
* ``property`` (optional) holds ``num_classes,height,width``. Without it,
  ``num_classes`` is the number of identity records, else max label + 1.

Labels are stored as float32, exact for up to 2**24 classes.

:class:`RecordIODataset` reads with ``os.pread`` on a descriptor opened lazily
in each process, so it pickles (grain workers) and works after ``fork``.
``pfc_jax.data.recordio_writer.RecordIOWriter`` writes a valid set of files (tests,
small datasets).
"""

from __future__ import annotations

import dataclasses
import os
import struct
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from pfc_jax.data import sources
from pfc_jax.data.sources import CorruptRecordError

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
LENGTH_BITS = 29
LENGTH_MASK = (1 << LENGTH_BITS) - 1
MAX_EXACT_LABEL = sources.MAX_EXACT_LABEL  # float32 holds every integer up to this
_MAX_INT64 = (1 << 63) - 1

_FRAME = struct.Struct("<II")  # magic, lrec
_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2
_FLOAT = struct.Struct("<f")
_LABEL_PREFIX = _HEADER.size + _FLOAT.size  # header + first float label
_OPEN_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class RecordHeader:
    """The decoded ``<IfQQ`` header of one record and its float labels."""

    flag: int
    label: float
    id: int
    id2: int
    labels: np.ndarray  # float32 [max(flag, 1)]: the extra labels, or [label] if flag == 0


# ----------------------------------------------------------------------------- format


def pack_payload(labels: float | Sequence[float], image: bytes = b"", *,
                 id: int = 0, id2: int = 0) -> bytes:  # pylint: disable=redefined-builtin
    """A record payload: header, float labels if several (or a sequence), image bytes.

    A scalar ``labels`` gives ``flag = 0`` with the label in the header; a
    sequence gives ``flag = len(labels)`` with the floats after the header.
    """
    if isinstance(labels, (int, float, np.integer, np.floating)):
        head = _HEADER.pack(0, float(labels), id, id2)
        return head + bytes(image)
    arr = np.asarray(labels, dtype="<f4").reshape(-1)
    if arr.size == 0:
        raise ValueError("labels sequence is empty; pass a scalar for flag 0")
    return _HEADER.pack(arr.size, 0.0, id, id2) + arr.tobytes() + bytes(image)


def unpack_payload(payload: bytes, where: str = "record") -> tuple[RecordHeader, bytes]:
    """Splits a payload into its header and the image bytes.

    Raises:
      CorruptRecordError: the payload is shorter than its header says.
    """
    if len(payload) < _HEADER.size:
        raise CorruptRecordError(
            f"{where}: payload of {len(payload)} bytes is shorter than the "
            f"{_HEADER.size}-byte record header")
    flag, label, rid, rid2 = _HEADER.unpack_from(payload, 0)
    if flag == 0:
        return RecordHeader(0, label, rid, rid2, np.array([label], np.float32)), \
            payload[_HEADER.size:]
    end = _HEADER.size + 4 * flag
    if end > len(payload):
        raise CorruptRecordError(
            f"{where}: header flag {flag} announces {flag} float labels "
            f"({4 * flag} bytes) but the payload has only {len(payload) - _HEADER.size} "
            "bytes after the header")
    labels = np.frombuffer(payload, dtype="<f4", count=flag, offset=_HEADER.size)
    return RecordHeader(flag, label, rid, rid2, labels.astype(np.float32)), payload[end:]


def frame_record(payload: bytes) -> bytes:
    """Frames a payload as stored in a ``.rec`` file, splitting at aligned magics."""
    payload = bytes(payload)
    n = len(payload)
    if n > LENGTH_MASK:
        raise ValueError(f"record of {n} bytes exceeds the format's {LENGTH_MASK}-byte limit")
    out = []
    start = 0
    aligned_end = n - n % 4
    i = payload.find(MAGIC_BYTES)
    while 0 <= i < aligned_end:
        if i % 4:  # only magics at 4-byte-aligned positions split the record
            i = payload.find(MAGIC_BYTES, i + 1)
            continue
        cflag = 1 if start == 0 else 2
        out.append(_FRAME.pack(MAGIC, (cflag << LENGTH_BITS) | (i - start)))
        out.append(payload[start:i])
        start = i + 4
        i = payload.find(MAGIC_BYTES, start)
    cflag = 3 if start else 0
    out.append(_FRAME.pack(MAGIC, (cflag << LENGTH_BITS) | (n - start)))
    out.append(payload[start:])
    out.append(b"\0" * (-n % 4))
    return b"".join(out)


def read_index(idx_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Parses a ``.idx`` file into ``(keys, offsets)`` int64 arrays in file order.

    Raises:
      ValueError: a malformed line (named by line number), a key or offset
        that does not fit in 64 bits, a duplicate key, two keys with the
        same offset, a negative key or offset.
    """
    with open(idx_path, "rb") as f:
        text = f.read()
    tokens = text.split()
    n_lines = text.count(b"\n") + (0 if text.endswith(b"\n") or not text else 1)
    keys = offsets = None
    if len(tokens) == 2 * n_lines:  # one "key offset" pair per line: vectorised parse
        try:
            pairs = np.array(tokens, dtype=np.bytes_).reshape(-1, 2).astype(np.int64)
            keys, offsets = pairs[:, 0].copy(), pairs[:, 1].copy()
        except (ValueError, OverflowError):  # the slow parse names the line
            pass
    if keys is None:
        keys, offsets = _read_index_slowly(idx_path, text)
    if len(keys) == 0:
        raise ValueError(f"{idx_path}: index file has no records")
    bad = np.flatnonzero((keys < 0) | (offsets < 0))
    if bad.size:
        j = int(bad[0])
        raise ValueError(f"{idx_path}: entry {j} has a negative key or offset "
                         f"({int(keys[j])}, {int(offsets[j])})")
    order = np.argsort(keys, kind="stable")
    dup = np.flatnonzero(np.diff(keys[order]) == 0)
    if dup.size:
        j = int(order[dup[0] + 1])
        raise ValueError(f"{idx_path}: key {int(keys[j])} appears more than once "
                         f"(second time at entry {j})")
    order = np.argsort(offsets, kind="stable")
    dup = np.flatnonzero(np.diff(offsets[order]) == 0)
    if dup.size:  # two keys cannot start at the same byte: one offset is wrong
        j, k = int(order[dup[0]]), int(order[dup[0] + 1])
        raise ValueError(f"{idx_path}: keys {int(keys[j])} (entry {j}) and {int(keys[k])} "
                         f"(entry {k}) have the same offset {int(offsets[k])}")
    return keys, offsets


def _read_index_slowly(idx_path: str, text: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Line-by-line parse that names the first bad line."""
    keys, offsets = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            key, offset = int(parts[0]), int(parts[1])
        except ValueError:
            raise ValueError(
                f"{idx_path}: line {lineno} is {line[:80]!r}, expected 'key<TAB>offset'"
            ) from None
        if not (-_MAX_INT64 <= key <= _MAX_INT64 and -_MAX_INT64 <= offset <= _MAX_INT64):
            raise ValueError(f"{idx_path}: line {lineno} is {line[:80]!r}: key or offset "
                             "does not fit in 64 bits")
        keys.append(key)
        offsets.append(offset)
    return np.array(keys, np.int64), np.array(offsets, np.int64)


def read_property(path: str) -> tuple[int, int, int]:
    """``(num_classes, height, width)`` from a ``property`` file.

    Raises:
      ValueError: not three integers, ``num_classes`` outside
        ``[1, MAX_EXACT_LABEL + 1]`` or a size below 1 (the file and its text named).
    """
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="backslashreplace").strip()
    fields = [x.strip() for x in text.split(",")]
    try:
        values = [int(x) for x in fields]
        if (len(values) != 3 or not 1 <= values[0] <= MAX_EXACT_LABEL + 1
                or min(values[1:]) < 1):
            raise ValueError
    except ValueError:
        raise ValueError(
            f"{path}: expected 'num_classes,height,width' with 1 <= num_classes <= "
            f"{MAX_EXACT_LABEL + 1} and a size of at least 1x1, got {text[:80]!r}") from None
    return values[0], values[1], values[2]


def _resolve(path: str | os.PathLike) -> tuple[str, str, str]:
    """``(rec, idx, property)`` paths from a folder or a ``.rec`` file; checks they exist."""
    path = os.fspath(path)
    if os.path.isdir(path):
        rec = os.path.join(path, "train.rec")
    else:
        rec = path
    base = rec[:-4] if rec.endswith(".rec") else rec
    idx = base + ".idx"
    prop = os.path.join(os.path.dirname(rec), "property")
    missing = [p for p in (rec, idx) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"RecordIO dataset at {path!r}: missing {', '.join(missing)} "
            "(need train.rec and train.idx)")
    return rec, idx, prop


# ----------------------------------------------------------------------------- reader


class RecordIODataset(sources.CorruptCounter):
    """Random-access InsightFace RecordIO source (see the module docstring).

    Args:
      path: the folder holding ``train.rec``/``train.idx`` (``property``
        optional), or the ``.rec`` file itself (its ``.idx`` beside it).
      skip_corrupt: return None for (and count) corrupt records instead of
        raising :class:`CorruptRecordError`.

    Raises:
      FileNotFoundError: ``train.rec`` or ``train.idx`` is missing (named).
      ValueError: a malformed ``.idx`` line (numbered) or duplicate key, a bad
        ``property`` file, image keys missing from the index (unless
        ``skip_corrupt``), or an unreadable header record (key 0).
    """

    def __init__(self, path: str | os.PathLike, skip_corrupt: bool = False):
        self.rec_path, self.idx_path, self.property_path = _resolve(path)
        self.skip_corrupt = bool(skip_corrupt)
        self._corrupt: set[int] = set()
        self._fd: int | None = None
        self._fd_pid: int | None = None
        self._labels: np.ndarray | None = None
        self._file_size = os.path.getsize(self.rec_path)
        keys, offsets = read_index(self.idx_path)
        order = np.argsort(keys)
        self._sorted_keys: np.ndarray | None = keys[order]
        self._sorted_offsets: np.ndarray | None = offsets[order]

        self.has_header = False
        self.first_identity_record = self.end_record = 0
        zero = self._offset_of(0)
        if zero >= 0:
            where = f"{self.rec_path}: header record (key 0, offset {zero})"
            head, _ = unpack_payload(self._read_payload(zero, where), where)
            if head.flag > 0:
                self.has_header = True
                first = sources.label_from_float(head.labels[0], where, limit=None)
                end = (sources.label_from_float(head.labels[1], where, limit=None)
                       if head.flag > 1 else first)
                max_key = int(keys.max())
                if first < 1 or end < first or end > max_key + 1:
                    raise CorruptRecordError(
                        f"{where}: header labels [first_identity_record={first}, end={end}] "
                        "are inconsistent (need 1 <= first_identity_record <= end <= "
                        f"{max_key + 1}, one past the largest key in {self.idx_path})")
                self.first_identity_record, self.end_record = first, end
        if self.has_header:
            self._keys = np.arange(1, self.first_identity_record, dtype=np.int64)
        else:
            self._keys = keys
        self._offsets = self._offsets_of(self._keys) if self.has_header else offsets
        missing = np.flatnonzero(self._offsets < 0)
        if missing.size:
            msg = (f"{self.idx_path}: {missing.size} image keys in [1, "
                   f"{self.first_identity_record}) are missing from the index "
                   f"(first: key {int(self._keys[missing[0]])})")
            if not self.skip_corrupt:
                raise ValueError(msg)
            sources.logger.warning("%s; those records will be skipped", msg)

        self.image_size: tuple[int, int] | None = None
        self._num_classes: int | None = None
        if os.path.isfile(self.property_path):
            n, h, w = read_property(self.property_path)
            self._num_classes, self.image_size = n, (h, w)
        elif self.num_identities > 0:
            self._num_classes = self.num_identities

    # -- interface

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"RecordIODataset({self.rec_path!r}, skip_corrupt={self.skip_corrupt})"

    @property
    def num_identities(self) -> int:
        """Number of identity records (0 without a header)."""
        return self.end_record - self.first_identity_record

    def key_of(self, index: int) -> int:
        """The RecordIO key of record ``index``."""
        return int(self._keys[sources.check_index(index, len(self), repr(self))])

    def record_name(self, index: int) -> str:
        """``"<file>: record index i (key k, offset o)"`` for messages."""
        return (f"{self.rec_path}: record index {index} (key {int(self._keys[index])}, "
                f"offset {int(self._offsets[index])})")

    def __getitem__(self, index: Any) -> sources.Example | None:
        i = sources.check_index(index, len(self), repr(self))
        where = self.record_name(i)

        def read():
            head, image_bytes = unpack_payload(self._read_payload_at(i, where), where)
            label = sources.label_from_float(head.labels[0], where)
            return sources.decode_record_image(image_bytes, where), label

        return self._example_or_skip(i, read)

    def __getitems__(self, indices: Sequence[int]) -> list[sources.Example | None]:
        return [self[i] for i in indices]

    _getitems = __getitems__  # grain's batched-read hook

    def read_raw(self, index: int) -> tuple[bytes, int]:
        """``(encoded image bytes, label)`` of record ``index`` without decoding.

        Raises CorruptRecordError for a broken frame or header regardless of
        ``skip_corrupt`` (the image itself is not checked).
        """
        i = sources.check_index(index, len(self), repr(self))
        where = self.record_name(i)
        head, image_bytes = unpack_payload(self._read_payload_at(i, where), where)
        return image_bytes, sources.label_from_float(head.labels[0], where)

    def labels(self) -> np.ndarray:
        """Every record's label (int64), reading only record headers.

        With ``skip_corrupt``, a record whose label cannot be read gets
        ``sources.UNREADABLE_LABEL``; otherwise the error is raised.
        """
        if self._labels is None:
            out = np.empty(len(self), np.int64)
            for i in range(len(self)):
                out[i] = self._label_or_unreadable(i, lambda: self._read_label(i))
            self._labels = out
        return self._labels.copy()

    def identity_ranges(self) -> np.ndarray:
        """``[num_identities, 2]`` int64 ``[start, end)`` image-key ranges, one per identity.

        Raises CorruptRecordError naming an identity record that cannot be read
        or holds a range outside the image keys.
        """
        out = np.zeros((self.num_identities, 2), np.int64)
        for j, key in enumerate(range(self.first_identity_record, self.end_record)):
            off = self._offset_of(key)
            where = f"{self.rec_path}: identity record {j} (key {key}, offset {off})"
            if off < 0:
                raise CorruptRecordError(f"{where}: key missing from {self.idx_path}")
            head, _ = unpack_payload(self._read_payload(off, where), where)
            if head.flag < 2:
                raise CorruptRecordError(f"{where}: expected 2 labels [start, end), "
                                         f"found flag {head.flag}")
            start = sources.label_from_float(head.labels[0], where, limit=None)
            end = sources.label_from_float(head.labels[1], where, limit=None)
            if not start <= end <= self.first_identity_record:
                raise CorruptRecordError(
                    f"{where}: range [{start}, {end}) is not inside the image keys "
                    f"[1, {self.first_identity_record})")
            out[j] = start, end
        return out

    # -- file access

    def close(self) -> None:
        """Closes this process's descriptor (reopened on the next read)."""
        if self._fd is not None and self._fd_pid == os.getpid():
            os.close(self._fd)
        self._fd = self._fd_pid = None

    def __enter__(self) -> RecordIODataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pylint: disable=broad-except
            pass

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fd"] = state["_fd_pid"] = None
        state["_labels"] = None
        state["_sorted_keys"] = state["_sorted_offsets"] = None  # re-read from .idx if needed
        state["_corrupt"] = set(self._corrupt)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _descriptor(self) -> int:
        """This process's read-only descriptor, opened on first use (after fork: anew)."""
        pid = os.getpid()
        if self._fd is None or self._fd_pid != pid:
            with _OPEN_LOCK:  # reader threads of one process share one descriptor
                if self._fd is None or self._fd_pid != pid:
                    self._fd = os.open(self.rec_path, os.O_RDONLY)
                    self._fd_pid = pid
        return self._fd

    def _pread(self, n: int, offset: int) -> bytes:
        return os.pread(self._descriptor(), n, offset)

    def _offsets_of(self, keys: np.ndarray) -> np.ndarray:
        """Offsets of ``keys`` (int64), -1 where a key is not in the index."""
        if self._sorted_keys is None:
            all_keys, all_offsets = read_index(self.idx_path)
            order = np.argsort(all_keys)
            self._sorted_keys, self._sorted_offsets = all_keys[order], all_offsets[order]
        j = np.minimum(np.searchsorted(self._sorted_keys, keys), len(self._sorted_keys) - 1)
        found = self._sorted_keys[j] == keys
        return np.where(found, self._sorted_offsets[j], -1).astype(np.int64)

    def _offset_of(self, key: int) -> int:
        return int(self._offsets_of(np.array([key], np.int64))[0])

    def _read_payload_at(self, i: int, where: str, limit: int | None = None) -> bytes:
        offset = int(self._offsets[i])
        if offset < 0:
            raise CorruptRecordError(f"{where}: key missing from {self.idx_path}")
        return self._read_payload(offset, where, limit)

    def _read_label(self, i: int) -> int:
        where = self.record_name(i)
        offset = int(self._offsets[i])
        if offset >= 0 and offset + _FRAME.size + _LABEL_PREFIX <= self._file_size:
            # fast path: frame + header + first float in one read
            buf = self._pread(_FRAME.size + _LABEL_PREFIX, offset)
            magic, lrec = _FRAME.unpack_from(buf, 0)
            length = lrec & LENGTH_MASK
            if (magic == MAGIC and lrec >> LENGTH_BITS == 0 and length >= _LABEL_PREFIX
                    and offset + _FRAME.size + length <= self._file_size):
                flag, label, _, _ = _HEADER.unpack_from(buf, _FRAME.size)
                if flag > 0:
                    if _HEADER.size + 4 * flag > length:
                        unpack_payload(self._read_payload(offset, where), where)  # raises
                    label = _FLOAT.unpack_from(buf, _FRAME.size + _HEADER.size)[0]
                return sources.label_from_float(label, where)
        payload = self._read_payload_at(i, where, limit=_LABEL_PREFIX)
        head, _ = unpack_payload(payload, where)
        return sources.label_from_float(head.labels[0], where)

    def _read_payload(self, offset: int, where: str, limit: int | None = None) -> bytes:
        """Reads the payload of the record framed at ``offset`` (joining parts).

        With ``limit``, stops once at least ``limit`` bytes are read (every
        frame met is still checked against the end of the file).
        """
        parts: list[bytes] = []
        total = 0
        pos = offset
        first = True
        while True:
            if first and pos >= self._file_size:
                raise CorruptRecordError(
                    f"{where}: offset {pos} is past the end of the file ({self._file_size} "
                    "bytes): wrong offset in the index, or the file truncated")
            # checked before reading: pread fails (EINVAL) at offsets near 2**63
            head = self._pread(_FRAME.size, pos) if pos + _FRAME.size <= self._file_size else b""
            if len(head) < _FRAME.size:
                raise CorruptRecordError(
                    f"{where}: the file ends at byte {self._file_size}, inside the "
                    f"record frame at offset {pos}: file truncated?")
            magic, lrec = _FRAME.unpack(head)
            if magic != MAGIC:
                raise CorruptRecordError(
                    f"{where}: bad magic 0x{magic:08x} at offset {pos} "
                    f"(expected 0x{MAGIC:08x}): wrong offset in the index, or a damaged file")
            cflag, length = lrec >> LENGTH_BITS, lrec & LENGTH_MASK
            if first and cflag not in (0, 1):
                raise CorruptRecordError(
                    f"{where}: continuation flag {cflag} at offset {pos} where a record "
                    "starts (expected 0 = whole record or 1 = first part)")
            if not first and cflag not in (2, 3):
                raise CorruptRecordError(
                    f"{where}: continuation flag {cflag} at offset {pos} inside a "
                    "multi-part record (expected 2 = middle part or 3 = last part)")
            end = pos + _FRAME.size + length
            if end > self._file_size:
                raise CorruptRecordError(
                    f"{where}: the record part at offset {pos} is {length} bytes long and "
                    f"runs to byte {end}, past the end of the file ({self._file_size} "
                    "bytes): file truncated?")
            want = length if limit is None else max(0, min(length, limit - total))
            if want:
                data = self._pread(want, pos + _FRAME.size)
                if len(data) != want:
                    raise CorruptRecordError(
                        f"{where}: short read at offset {pos + _FRAME.size} "
                        f"({len(data)} of {want} bytes): file changed while reading?")
                parts.append(data)
                total += want
            if cflag in (0, 3) or (limit is not None and total >= limit):
                break
            parts.append(MAGIC_BYTES)
            total += len(MAGIC_BYTES)
            pos = end + (-length % 4)
            first = False
        return b"".join(parts)
