"""ArrayRecord files for fast random access, and a converter to them.

Record layout (version 1). Each ArrayRecord record is a 16-byte header
``<4sHHq`` — magic ``b"PFCR"``, format version, reserved (0), int64 label —
followed by the encoded image (JPEG or PNG). Files are written with
``group_size:1`` (one record per chunk, as grain wants for random access)
and no compression (the images already are compressed).

A conversion to ``OUT.array_record`` writes, beside the data:

* ``OUT.array_record`` (one shard) or ``OUT-00000-of-00004.array_record`` ...
  (records split into contiguous blocks, in source order);
* ``OUT.meta.json``: format, version, num_classes, num_records, the shards
  and their record counts, the image format, and the source records that
  were skipped as corrupt;
* ``OUT.labels.npy``: every record's label (int64), so ``labels()`` needs no
  pass over the data.

Command line::

    python -m pfc_jax.data.arrayrecord --src-kind recordio --src /data/ms1m \\
        --out /data/ms1m.array_record --num-shards 16

The ``tfds`` adaptor is ``pfc_jax.data.tfds_source``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import struct
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from pfc_jax.data import sources
from pfc_jax.data.sources import CorruptRecordError

FORMAT_NAME = "pfc_jax.arrayrecord"
FORMAT_VERSION = 1
RECORD_MAGIC = b"PFCR"
WRITER_OPTIONS = "group_size:1,uncompressed"
_RECORD_HEADER = struct.Struct("<4sHHq")  # magic, version, reserved, label
_SHARD_RE = re.compile(r"-\d{5}-of-\d{5}$")
_SUFFIX = ".array_record"
_GLOB_CHARS = re.compile(r"[*?\[]")


# ----------------------------------------------------------------------------- records


def pack_record(label: int, image: bytes) -> bytes:
    """One ArrayRecord record: the 16-byte header and the encoded image."""
    return _RECORD_HEADER.pack(RECORD_MAGIC, FORMAT_VERSION, 0, int(label)) + bytes(image)


def unpack_record(record: bytes, where: str) -> tuple[int, bytes]:
    """``(label, image bytes)`` of a record; CorruptRecordError if malformed."""
    if len(record) < _RECORD_HEADER.size:
        raise CorruptRecordError(
            f"{where}: record of {len(record)} bytes is shorter than the "
            f"{_RECORD_HEADER.size}-byte header")
    magic, version, _, label = _RECORD_HEADER.unpack_from(record, 0)
    if magic != RECORD_MAGIC:
        raise CorruptRecordError(
            f"{where}: record starts with {magic!r}, expected {RECORD_MAGIC!r} "
            "(not written by pfc_jax.data.arrayrecord)")
    if version != FORMAT_VERSION:
        raise CorruptRecordError(
            f"{where}: record format version {version}, this reader knows {FORMAT_VERSION}")
    if label < 0:
        raise CorruptRecordError(f"{where}: negative label {label}")
    return label, record[_RECORD_HEADER.size:]


def _stem(path: str) -> str:
    """``d/x`` from ``d/x.array_record`` or ``d/x-00001-of-00004.array_record``."""
    base = path[:-len(_SUFFIX)] if path.endswith(_SUFFIX) else path
    return _SHARD_RE.sub("", base)


def shard_paths(out_path: str, num_shards: int) -> list[str]:
    """The file names a conversion to ``out_path`` with ``num_shards`` writes."""
    if num_shards == 1:
        return [out_path]
    stem = _stem(out_path)
    return [f"{stem}-{s:05d}-of-{num_shards:05d}{_SUFFIX}" for s in range(num_shards)]


def meta_path(path: str) -> str:
    """The sidecar JSON of a conversion output (or any of its shards)."""
    return _stem(path) + ".meta.json"


def labels_path(path: str) -> str:
    """The sidecar labels ``.npy`` of a conversion output (or any of its shards)."""
    return _stem(path) + ".labels.npy"


# ----------------------------------------------------------------------------- converter


def _encoded_record(src: Any, i: int, image_format: str, quality: int,
                    validate: bool) -> tuple[bytes, int] | None:
    """``(encoded image, label)`` of source record ``i``, or None if the source skips it."""
    if hasattr(src, "read_raw"):
        data, label = src.read_raw(i)
        if sources.image_format_of(data) == image_format:
            if validate:
                try:
                    sources.decode_image(data)
                except ValueError as e:
                    name = src.record_name(i) if hasattr(src, "record_name") else f"record {i}"
                    raise CorruptRecordError(f"{name}: {e}") from e
            return data, label
    example = src[i]
    if example is None:
        return None
    return (sources.encode_image(example["image"], image_format, quality),
            int(example["label"]))


def convert_to_arrayrecord(src: Any, out_path: str | os.PathLike, *, num_shards: int = 1,
                           image_format: str = "jpeg", quality: int = 95,
                           validate: bool = True,
                           progress: bool | None = None) -> dict[str, Any]:
    """Writes every record of ``src`` (any source) to ArrayRecord file(s) + sidecars.

    Images already encoded in ``image_format`` (sources with ``read_raw``:
    RecordIO, folder) are copied byte for byte, after a decode check when
    ``validate``; anything else is decoded by the source and re-encoded.
    A corrupt source record raises :class:`CorruptRecordError`, unless the
    source has ``skip_corrupt=True``: then it is left out and listed in the
    sidecar's ``skipped_source_indices``.

    Args:
      src: the source to convert.
      out_path: ``OUT.array_record``; shards are named from it (see module doc).
      num_shards: number of files; records go to them in contiguous blocks.
      image_format: ``"jpeg"`` or ``"png"``.
      quality: JPEG quality when re-encoding.
      validate: decode copied images once to catch corrupt ones now.
      progress: a progress line on stderr (None: when it is a terminal).

    Returns:
      The sidecar metadata (also written to ``OUT.meta.json``).
    """
    # pylint: disable-next=import-outside-toplevel
    from array_record.python.array_record_module import ArrayRecordWriter

    out_path = os.fspath(out_path)
    image_format = image_format.lower().replace("jpg", "jpeg")
    if image_format not in ("jpeg", "png"):
        raise ValueError(f"image_format must be 'jpeg' or 'png', got {image_format!r}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    n = len(src)
    num_classes = int(src.num_classes)
    paths = shard_paths(out_path, num_shards)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    bounds = [n * s // num_shards for s in range(num_shards + 1)]
    labels: list[int] = []
    skipped: list[int] = []
    shards = []
    from pfc_jax import logs
    bar = logs.Progress(f"converting to {os.path.basename(out_path)}", n, progress)
    for s, path in enumerate(paths):
        writer = ArrayRecordWriter(path, WRITER_OPTIONS)
        count = 0
        try:
            for i in range(bounds[s], bounds[s + 1]):
                try:
                    rec = _encoded_record(src, i, image_format, quality, validate)
                except CorruptRecordError as e:
                    if not getattr(src, "skip_corrupt", False):
                        raise
                    sources.logger.warning("conversion skips corrupt record %d: %s", i, e)
                    rec = None
                if rec is None:
                    skipped.append(i)
                    continue
                writer.write(pack_record(rec[1], rec[0]))
                labels.append(rec[1])
                count += 1
                if i % 256 == 0:
                    bar.update(i + 1)
        finally:
            writer.close()
        shards.append({"file": os.path.basename(path), "num_records": count})
    bar.update(n)
    np.save(labels_path(out_path), np.array(labels, np.int64))
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "num_classes": num_classes,
        "num_records": len(labels),
        "image_format": image_format,
        "shards": shards,
        "labels_file": os.path.basename(labels_path(out_path)),
        "num_skipped": len(skipped),
        "skipped_source_indices": skipped,
        "source": repr(src),
    }
    with open(meta_path(out_path), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    return meta


# ----------------------------------------------------------------------------- reader


def _find_files(path_or_glob: str) -> list[str]:
    """The ArrayRecord files named by a file, a glob, a sidecar JSON or an OUT path."""
    p = path_or_glob
    if p.endswith(".meta.json"):
        with open(p, encoding="utf-8") as f:
            meta = json.load(f)
        folder = os.path.dirname(p)
        return [os.path.join(folder, s["file"]) for s in meta.get("shards", [])]
    if _GLOB_CHARS.search(p):
        files = sorted(glob.glob(p))
        if not files:
            raise FileNotFoundError(f"no ArrayRecord files match {p!r}")
        return files
    if os.path.isfile(p):
        return [p]
    if os.path.isfile(meta_path(p)):  # a sharded conversion's OUT path
        return _find_files(meta_path(p))
    raise FileNotFoundError(f"ArrayRecord file {p!r} not found (nor its sidecar {meta_path(p)})")


class ArrayRecordDataset(sources.CorruptCounter):
    """Random-access source over ArrayRecord files written by :func:`convert_to_arrayrecord`.

    Args:
      path_or_glob: one file, a glob of shards (sorted by name), the sidecar
        ``.meta.json``, or the ``OUT.array_record`` given to the converter.
      skip_corrupt: return None for (and count) corrupt records instead of
        raising :class:`CorruptRecordError`.

    ``num_classes`` and ``labels()`` come from the sidecars when present
    (validated against the files), else from a pass over every record.
    """

    def __init__(self, path_or_glob: str | os.PathLike, skip_corrupt: bool = False):
        # pylint: disable-next=import-outside-toplevel
        from array_record.python import array_record_data_source, array_record_module

        self.path = os.fspath(path_or_glob)
        self.skip_corrupt = bool(skip_corrupt)
        self._corrupt: set[int] = set()
        self.files = _find_files(self.path)
        sizes = []
        for f in self.files:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"ArrayRecord file {f!r} not found")
            try:
                reader = array_record_module.ArrayRecordReader(f)
                sizes.append(int(reader.num_records()))
                reader.close()
            except (RuntimeError, ValueError, OSError) as e:
                raise ValueError(f"{f}: not a readable ArrayRecord file: {e}") from e
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._source = array_record_data_source.ArrayRecordDataSource(self.files)
        if len(self._source) != int(self._starts[-1]):
            raise ValueError(f"{self.path}: ArrayRecordDataSource sees {len(self._source)} "
                             f"records, the files hold {int(self._starts[-1])}")
        self.meta: dict[str, Any] | None = None
        self._labels: np.ndarray | None = None
        self._num_classes: int | None = None
        self._load_sidecars(sizes)

    def _load_sidecars(self, sizes: list[int]) -> None:
        mpath = meta_path(self.files[0])
        if not os.path.isfile(mpath):
            sources.logger.warning("%s: no sidecar %s; labels() reads every record",
                                   self.path, mpath)
            return
        with open(mpath, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{mpath}: format {meta.get('format')!r} version "
                             f"{meta.get('version')!r}, expected {FORMAT_NAME!r} "
                             f"version {FORMAT_VERSION}")
        starts, pos = {}, 0
        for shard in meta["shards"]:
            starts[shard["file"]] = (pos, int(shard["num_records"]))
            pos += int(shard["num_records"])
        lpath = os.path.join(os.path.dirname(mpath), meta["labels_file"])
        all_labels = np.load(lpath)
        if all_labels.shape != (pos,) or pos != meta["num_records"]:
            raise ValueError(f"{lpath}: {all_labels.shape} labels, but {mpath} lists "
                             f"{pos} records in shards ({meta['num_records']} in total)")
        parts = []
        for f, size in zip(self.files, sizes):
            name = os.path.basename(f)
            if name not in starts:
                raise ValueError(f"{f} is not listed in its sidecar {mpath}")
            start, count = starts[name]
            if count != size:
                raise ValueError(f"{f} holds {size} records, its sidecar {mpath} says {count}")
            parts.append(all_labels[start:start + count])
        self.meta = meta
        self._labels = np.concatenate(parts).astype(np.int64)
        self._num_classes = int(meta["num_classes"])

    # -- interface

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __repr__(self) -> str:
        return f"ArrayRecordDataset({self.path!r}, skip_corrupt={self.skip_corrupt})"

    def record_name(self, index: int) -> str:
        """``"<file>: record r (record index i)"`` for messages."""
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return (f"{self.files[shard]}: record {index - int(self._starts[shard])} "
                f"(record index {index})")

    def labels(self) -> np.ndarray:
        """Every record's label (int64): from the sidecar, else from each record's header."""
        if self._labels is None:
            out = np.empty(len(self), np.int64)
            for i in range(len(self)):
                out[i] = self._label_or_unreadable(
                    i, lambda: unpack_record(self._read(i), self.record_name(i))[0])
            self._labels = out
        return self._labels.copy()

    def read_raw(self, index: int) -> tuple[bytes, int]:
        """``(encoded image bytes, label)`` of record ``index`` without decoding."""
        i = sources.check_index(index, len(self), repr(self))
        label, data = unpack_record(self._read(i), self.record_name(i))
        return data, label

    def _read(self, i: int) -> bytes:
        try:
            return self._source[i]
        except (RuntimeError, ValueError, OSError) as e:
            raise CorruptRecordError(f"{self.record_name(i)}: cannot read: {e}") from e

    def _decode(self, i: int, record: bytes) -> sources.Example | None:
        where = self.record_name(i)

        def read():
            label, data = unpack_record(record, where)
            return sources.decode_record_image(data, where), label

        return self._example_or_skip(i, read)

    def __getitem__(self, index: Any) -> sources.Example | None:
        i = sources.check_index(index, len(self), repr(self))
        try:
            record = self._read(i)
        except CorruptRecordError as e:
            sources.handle_corrupt(self, i, e)
            return None
        return self._decode(i, record)

    def __getitems__(self, indices: Sequence[int]) -> list[sources.Example | None]:
        """Batched read (one call per shard into ArrayRecord), then decoding."""
        idx = [sources.check_index(i, len(self), repr(self)) for i in indices]
        try:
            records = self._source.__getitems__(idx)
        except (RuntimeError, ValueError, OSError):
            return [self[i] for i in idx]  # find and name the unreadable record(s)
        return [self._decode(i, r) for i, r in zip(idx, records)]

    _getitems = __getitems__  # grain's batched-read hook

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_corrupt"] = set(self._corrupt)
        return state


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: convert a RecordIO / folder / TFDS / ArrayRecord source."""
    from pfc_jax import platform
    platform.choose()  # before JAX starts (a no-op when it already has)
    parser = argparse.ArgumentParser(
        prog="python -m pfc_jax.data.arrayrecord",
        description="Convert a face dataset to ArrayRecord files (+ .meta.json, .labels.npy).")
    parser.add_argument("--src-kind", required=True, choices=sources.KINDS)
    parser.add_argument("--src", required=True,
                        help="RecordIO folder or .rec, image-folder root, ArrayRecord path, "
                             "or TFDS name")
    parser.add_argument("--out", required=True, help="OUT.array_record")
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument("--image-format", default="jpeg", choices=("jpeg", "png"))
    parser.add_argument("--quality", type=int, default=95)
    parser.add_argument("--skip-corrupt", action="store_true",
                        help="leave corrupt records out (listed in the sidecar) instead of failing")
    parser.add_argument("--no-validate", action="store_true",
                        help="copy already-encoded images without a decode check")
    parser.add_argument("--split", default="train", help="TFDS split")
    parser.add_argument("--data-dir", default=None, help="TFDS data_dir")
    args = parser.parse_args(argv)
    kw: dict[str, Any] = {"skip_corrupt": args.skip_corrupt}
    if args.src_kind == "tfds":
        kw.update(split=args.split, data_dir=args.data_dir)
    src = sources.open_source(args.src_kind, args.src, **kw)
    meta = convert_to_arrayrecord(src, args.out, num_shards=args.num_shards,
                                  image_format=args.image_format, quality=args.quality,
                                  validate=not args.no_validate)
    summary = {k: meta[k] for k in ("num_records", "num_classes", "num_skipped")}
    summary["files"] = [s["file"] for s in meta["shards"]]
    summary["meta"] = meta_path(os.fspath(args.out))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
