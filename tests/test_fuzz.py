"""Bad input, fuzzed: mutated RecordIO sets, broken image folders, broken ``.bin`` files.

Every case is read the way a trainer (or the evaluator) reads it: open the
source (``skip_corrupt`` False and True), ``len``, every record, ``labels()``,
``check_labels``; for ``.bin`` files ``load_bin``. Each case must end in one of

* a correct example: a record whose bytes the mutation left alone reads back
  exactly (label and pixels) -- a mutation of one record must not spoil another;
* a ``CorruptRecordError`` / ``ValueError`` whose message names the file and
  the record (record index and key, ``.idx`` line or entry, image index, path);
* a counted skip: with ``skip_corrupt=True`` the record reads as None and its
  index is in ``corrupt_indices``;

never a hang (each case runs under a ``signal.alarm`` watchdog) and never any
other exception type. A record whose own bytes were mutated may still read as
a well-formed example (e.g. a flipped bit in JPEG entropy data, or in a label
that stays a valid class): the format has no checksum, so only its shape,
type and the label range (``check_labels``) can be checked.

Mutations are deterministic (``np.random.default_rng([SEED, case number])``
for RecordIO, fixed seeds derived from ``SEED`` elsewhere); every failure
message starts with the case description (kind, number, seed, mutation), so a
failure reproduces by running this file again. ``pytest -s`` prints the number
of cases per kind and how they ended.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import signal
import struct
import traceback
import zlib
from collections import Counter
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image

from pfc_jax.data import recordio_writer
from pfc_jax.data.sources import CorruptRecordError, check_labels, open_source
from pfc_jax.evaluate import verification as ver

SEED = 20240617
CASE_SECONDS = 10  # per run; a healthy one takes milliseconds
MAGIC = 0xCED7230A
SIZE = 112  # the readers decode 112x112 JPEGs
MIN_CASES = {"recordio": 100, "folder": 20, "bin": 20}


# ----------------------------------------------------------------------------- harness


class CaseTimeout(BaseException):
    """Raised by the watchdog; a BaseException so no reader's ``except Exception`` eats it."""


@contextlib.contextmanager
def time_limit(desc: str) -> Iterator[None]:
    def on_alarm(signum, frame):
        raise CaseTimeout(f"{desc}: still running after {CASE_SECONDS} s (hang?)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(CASE_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


class CaseFailure(AssertionError):
    pass


def expect(cond: bool, desc: str, what: str) -> None:
    if not cond:
        raise CaseFailure(f"{desc}: {what}")


def run_cases(kind: str, runs: list[tuple[str, Callable[[str], str]]], n_cases: int) -> None:
    """Runs every run of ``n_cases`` cases under the watchdog; reports all failures at once.

    Each run returns how it ended; the tally is printed with the count of cases.
    """
    failures = []
    outcomes: Counter[str] = Counter()
    for desc, fn in runs:
        try:
            with time_limit(desc):
                outcomes[fn(desc)] += 1
        except CaseFailure as e:
            failures.append(str(e))
        except (Exception, CaseTimeout) as e:  # anything that leaked out of a reader
            tb = traceback.extract_tb(e.__traceback__)[-1]
            failures.append(f"{desc}: leaked {type(e).__name__}: {e} "
                            f"(at {os.path.basename(tb.filename)}:{tb.lineno})")
    print(f"\nfuzz {kind}: {n_cases} cases tried ({len(runs)} runs), {len(failures)} runs "
          f"failed; outcomes: {dict(sorted(outcomes.items()))}")
    assert not failures, f"{len(failures)} of {len(runs)} {kind} runs failed:\n" + \
        "\n".join(failures[:40])
    assert n_cases >= MIN_CASES[kind], f"only {n_cases} {kind} cases"


def smooth(seed: int, h: int = SIZE, w: int = SIZE) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    c = np.array([(seed * 37) % 120, (seed * 71) % 120, (seed * 13) % 120])
    return (c[None, None, :] + x[..., None] + y[..., None] // 2).clip(0, 255).astype(np.uint8)


def encode(arr: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def decoded(data: bytes) -> np.ndarray:
    """The independent expectation of a decode: Pillow, RGB."""
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("RGB"))


def well_formed(ex: object) -> bool:
    return (isinstance(ex, dict) and isinstance(ex.get("image"), np.ndarray)
            and ex["image"].dtype == np.uint8 and ex["image"].ndim == 3
            and ex["image"].shape[2] == 3 and min(ex["image"].shape) >= 1
            and isinstance(ex.get("label"), np.int32))


# ----------------------------------------------------------------------------- RecordIO


class RecBase:
    """A small valid RecordIO set kept as bytes, with its layout (from the writer's idx)."""

    def __init__(self, folder: str, name: str, header: bool, labels: list[int],
                 split_key: int | None, write_property: bool):
        self.name, self.header = name, header
        path = os.path.join(folder, name)
        self.images: dict[int, tuple[int, np.ndarray]] = {}  # key -> (label, pixels)
        with recordio_writer.RecordIOWriter(path, header=header,
                                     write_property=write_property) as w:
            for j, label in enumerate(labels):
                data = encode(smooth(j + (10 if header else 50)))
                key = w.num_images + (1 if header else 0)
                # id = MAGIC at an aligned payload offset forces a multi-part record
                w.add_image(data, label, id=MAGIC if key == split_key else None)
                self.images[key] = (label, decoded(data))
        self.files = {}
        for f in ("train.rec", "train.idx", "property"):
            p = os.path.join(path, f)
            if os.path.exists(p):
                with open(p, "rb") as fh:
                    self.files[f] = fh.read()
        self.num_classes = max(labels) + 1
        self.index = parse_idx(self.files["train.idx"])  # key -> offset
        starts = sorted(self.index.values()) + [len(self.files["train.rec"])]
        self.extent = {a: b for a, b in zip(starts, starts[1:])}  # record start -> end
        self.image_offsets = {self.index[k]: k for k in self.images}
        if split_key is not None:  # the split really happened
            o = self.index[split_key]
            lrec = struct.unpack_from("<I", self.files["train.rec"], o + 4)[0]
            assert lrec >> 29 == 1, "the multi-part record was not split"


def parse_idx(text: bytes) -> dict[int, int]:
    out = {}
    for line in text.split(b"\n"):
        if line.strip():
            k, o = line.split()
            out[int(k)] = int(o)
    return out


def flip_bits(rng, data: bytearray, lo: int, hi: int, n: int) -> list[tuple[int, int]]:
    touched = []
    for _ in range(n):
        pos = int(rng.integers(lo, hi))
        data[pos] ^= 1 << int(rng.integers(0, 8))
        touched.append((pos, pos + 1))
    return touched


def put(data: bytearray, pos: int, raw: bytes) -> list[tuple[int, int]]:
    data[pos:pos + len(raw)] = raw
    return [(pos, pos + len(raw))]


def record_mutations(base: RecBase) -> list[tuple[str, Callable]]:
    """``(name, mutate(rng, files) -> touched rec byte ranges)`` for one base set."""
    rec_len = len(base.files["train.rec"])
    keys = sorted(base.index)
    img_keys = sorted(base.images)

    def rec_op(fn):
        def mutate(rng, files):
            data = bytearray(files["train.rec"])
            touched = fn(rng, data)
            files["train.rec"] = bytes(data)
            return touched
        return mutate

    def pick(rng, pool):
        return int(pool[int(rng.integers(0, len(pool)))])

    def in_record(field_lo, field_hi):
        """Flips a bit in bytes [lo, hi) of a random record (relative to its start)."""
        def fn(rng, data):
            pool = [k for k in keys if base.extent[base.index[k]] - base.index[k] > field_lo]
            o = base.index[pick(rng, pool)]
            hi = min(base.extent[o] - o, field_hi)
            return flip_bits(rng, data, o + field_lo, o + hi, 1)
        return fn

    def set_u32(rel, value_fn, pool=None):
        def fn(rng, data):
            key = pick(rng, pool or keys)
            o = base.index[key]
            old = struct.unpack_from("<I", data, o + rel)[0]
            return put(data, o + rel, struct.pack("<I", value_fn(rng, old, o) & 0xFFFFFFFF))
        return fn

    def set_f32(rel, value, pool):
        def fn(rng, data):
            o = base.index[pick(rng, pool)]
            return put(data, o + rel, struct.pack("<f", value))
        return fn

    def truncate(where):
        def mutate(rng, files):
            cut = where(rng)
            files["train.rec"] = files["train.rec"][:cut]
            return [(cut, rec_len)]
        return mutate

    def zero_span(rng, data):
        a = int(rng.integers(0, rec_len - 1))
        b = min(rec_len, a + int(rng.integers(1, 65)))
        return put(data, a, bytes(b - a))

    def zero_record(rng, data):
        o = base.index[pick(rng, keys)]
        return put(data, o, bytes(base.extent[o] - o))

    def idx_op(fn):
        def mutate(rng, files):
            lines = files["train.idx"].splitlines(keepends=True)
            out = fn(rng, lines)
            files["train.idx"] = out if isinstance(out, bytes) else b"".join(out)
            return []
        return mutate

    def insert(text: bytes):
        def fn(rng, lines):
            lines.insert(int(rng.integers(0, len(lines) + 1)), text)
            return lines
        return fn

    def replace_field(col, value_fn):
        def fn(rng, lines):
            j = int(rng.integers(0, len(lines)))
            parts = lines[j].split()
            parts[col] = str(value_fn(rng, int(parts[col]))).encode()
            lines[j] = b"\t".join(parts) + b"\n"
            return lines
        return fn

    def drop_key(pool):
        def fn(rng, lines):
            key = pick(rng, pool)
            return [ln for ln in lines if int(ln.split()[0]) != key]
        return fn

    def dup_line(rng, lines):
        j = int(rng.integers(0, len(lines)))
        lines.insert(int(rng.integers(0, len(lines) + 1)), lines[j])
        return lines

    def dup_key_new_offset(rng, lines):
        j = int(rng.integers(0, len(lines)))
        lines.append(lines[j].split()[0] + b"\t%d\n" % int(rng.integers(0, rec_len)))
        return lines

    def dup_offset_new_key(rng, lines):
        j = int(rng.integers(0, len(lines)))
        lines.append(b"%d\t" % (max(keys) + 1 + int(rng.integers(0, 5)))
                     + lines[j].split()[1] + b"\n")
        return lines

    def swap_offsets(rng, lines):
        a, b = rng.choice(len(lines), 2, replace=False)
        pa, pb = lines[a].split(), lines[b].split()
        lines[a], lines[b] = pa[0] + b"\t" + pb[1] + b"\n", pb[0] + b"\t" + pa[1] + b"\n"
        return lines

    def shuffle(rng, lines):
        return [lines[j] for j in rng.permutation(len(lines))]

    def flip_idx_bits(rng, lines):
        data = bytearray(b"".join(lines))
        flip_bits(rng, data, 0, len(data), 2)
        return bytes(data)

    def prop(text):
        def mutate(rng, files):
            if text is None:
                files.pop("property", None)
            else:
                files["property"] = text if isinstance(text, bytes) else text.encode()
            return []
        return mutate

    def prop_random(rng, files):
        files["property"] = rng.integers(0, 256, int(rng.integers(1, 40)), np.uint8).tobytes()
        return []

    def append_garbage(rng, files):
        files["train.rec"] += rng.integers(0, 256, 37, np.uint8).tobytes()
        return []

    def replace_rec(rng, files):
        files["train.rec"] = rng.integers(0, 256, rec_len, np.uint8).tobytes()
        return [(0, rec_len)]

    last = base.index[keys[-1]]
    m: list[tuple[str, Callable]] = []
    for n in (1, 1, 2, 3, 8, 32):
        m.append((f"flip {n} random bits of train.rec",
                  rec_op(lambda rng, d, n=n: flip_bits(rng, d, 0, rec_len, n))))
    for field, lo, hi in (("magic", 0, 4), ("lrec", 4, 8), ("payload flag", 8, 12),
                          ("label", 12, 16), ("id", 16, 24), ("label float", 32, 40),
                          ("image bytes", 40, 1 << 30)):
        for _ in range(2):
            m.append((f"flip a bit of one record's {field}", rec_op(in_record(lo, hi))))
    for _ in range(4):
        m.append(("truncate train.rec at a random byte",
                  truncate(lambda rng: int(rng.integers(0, rec_len)))))
    m += [("truncate train.rec to 0 bytes", truncate(lambda rng: 0)),
          ("truncate train.rec inside the first frame", truncate(lambda rng: 5)),
          ("truncate train.rec by one byte", truncate(lambda rng: rec_len - 1)),
          ("truncate train.rec inside the last frame", truncate(lambda rng: last + 6)),
          ("truncate train.rec inside the last payload header",
           truncate(lambda rng: last + 20))]
    m += [("zero a random span of train.rec", rec_op(zero_span))] * 4
    m += [("zero a whole record", rec_op(zero_record))] * 2
    m += [("wrong magic on one record",
           rec_op(set_u32(0, lambda rng, old, o: int(rng.integers(0, 1 << 32))))),
          ("byte-swapped magic on one record",
           rec_op(set_u32(0, lambda rng, old, o: 0x0A23D7CE))),
          ("huge length (2**29 - 1)", rec_op(set_u32(4, lambda rng, old, o: (1 << 29) - 1))),
          ("length running one word past the file",
           rec_op(set_u32(4, lambda rng, old, o: rec_len - o - 8 + 4))),
          ("zero length", rec_op(set_u32(4, lambda rng, old, o: 0))),
          ("zero length, continuation flag 1",
           rec_op(set_u32(4, lambda rng, old, o: 1 << 29))),
          ("continuation flag 1 on a whole record",
           rec_op(set_u32(4, lambda rng, old, o: old | (1 << 29)))),
          ("continuation flag 3 where a record starts",
           rec_op(set_u32(4, lambda rng, old, o: (old & ((1 << 29) - 1)) | (3 << 29)))),
          ("continuation flag 7", rec_op(set_u32(4, lambda rng, old, o: old | (7 << 29)))),
          ("length one short", rec_op(set_u32(4, lambda rng, old, o: old - 1))),
          ("length 40 long", rec_op(set_u32(4, lambda rng, old, o: old + 40))),
          ("payload flag 0xffffffff", rec_op(set_u32(8, lambda rng, old, o: 0xFFFFFFFF))),
          ("payload flag 1000", rec_op(set_u32(8, lambda rng, old, o: 1000))),
          ("payload flag 1 on an image", rec_op(set_u32(8, lambda rng, old, o: 1, img_keys))),
          ("payload flag 5 on an image", rec_op(set_u32(8, lambda rng, old, o: 5, img_keys)))]
    for value in (float("nan"), float("inf"), -1.0, 1.5, 2.0 ** 30, 1e38, -0.0, 2.0):
        m.append((f"image label {value!r}", rec_op(set_f32(12, value, img_keys))))
    m += [("append garbage to train.rec", append_garbage),
          ("train.rec replaced by random bytes", replace_rec)]
    if base.header:
        ids = [k for k in keys if k > max(img_keys)]
        for first, end in ((1e9, 1e9), (3.0, 1e30), (0.0, 2.0), (6.0, 3.0), (2.0 ** 24, 2.0 ** 25),
                           (float("nan"), 9.0), (2.5, 9.0), (float(len(img_keys) + 1), 1e6)):
            m.append((f"header record labels [{first}, {end}]",
                      rec_op(lambda rng, d, f=first, e=end:
                             put(d, base.index[0] + 8 + 24, struct.pack("<ff", f, e)))))
        m += [("header record flag 0", rec_op(set_u32(8, lambda rng, old, o: 0, [0]))),
              ("header record flag 1", rec_op(set_u32(8, lambda rng, old, o: 1, [0]))),
              ("header record flag 3", rec_op(set_u32(8, lambda rng, old, o: 3, [0]))),
              ("flip a bit of the header record", rec_op(
                  lambda rng, d: flip_bits(rng, d, 0, base.extent[0], 1))),
              ("identity record range [1e9, 2e9]", rec_op(
                  lambda rng, d: put(d, base.index[pick(rng, ids)] + 8 + 24,
                                     struct.pack("<ff", 1e9, 2e9)))),
              ("identity record flag 0", rec_op(set_u32(8, lambda rng, old, o: 0, ids))),
              ("drop an identity record's idx line", idx_op(drop_key(ids))),
              ("drop the header record's idx line", idx_op(drop_key([0])))]
    for text in ("hello world\n", "\x00\x7f\n", "1\t2\t3\n", "5\n", "-1\t0\n", "abc\t12\n",
                 "3\t-8\n", "1.5\t0\n", f"{2 ** 64}\t0\n", f"{2 ** 63}\t0\n",
                 f"{2 ** 200}\t8\n", f"{max(keys) + 7}\t{2 ** 64}\n",
                 f"{max(keys) + 7}\t{2 ** 63 - 1}\n", f"{max(keys) + 7}\t{rec_len}\n",
                 f"{max(keys) + 7}\t{rec_len + 4096}\n", f"{max(keys) + 7}\t3\n"):
        m.append((f"idx line {text!r} inserted", idx_op(insert(text.encode()))))
    m += [("idx key 2**64", idx_op(replace_field(0, lambda rng, v: 2 ** 64))),
          ("idx key 2**63 - 1", idx_op(replace_field(0, lambda rng, v: 2 ** 63 - 1))),
          ("idx offset 2**63 - 1", idx_op(replace_field(1, lambda rng, v: 2 ** 63 - 1))),
          ("idx offset 2**64 + 8", idx_op(replace_field(1, lambda rng, v: 2 ** 64 + 8))),
          ("idx offset + 4", idx_op(replace_field(1, lambda rng, v: v + 4))),
          ("idx offset + 1", idx_op(replace_field(1, lambda rng, v: v + 1))),
          ("idx offset = file size", idx_op(replace_field(1, lambda rng, v: rec_len))),
          ("idx duplicate line", idx_op(dup_line)),
          ("idx duplicate key, other offset", idx_op(dup_key_new_offset)),
          ("idx duplicate offset, new key", idx_op(dup_offset_new_key)),
          ("idx two offsets swapped", idx_op(swap_offsets)),
          ("idx lines shuffled", idx_op(shuffle)),
          ("idx drop an image key", idx_op(drop_key(img_keys))),
          ("idx drop the last line", idx_op(lambda rng, lines: lines[:-1])),
          ("idx empty", idx_op(lambda rng, lines: b"")),
          ("idx blank lines and CRLF", idx_op(
              lambda rng, lines: b"\r\n\r\n".join(ln.rstrip(b"\n") for ln in lines))),
          ("idx separated by spaces", idx_op(
              lambda rng, lines: [ln.replace(b"\t", b"   ") for ln in lines])),
          ("idx random bytes", idx_op(
              lambda rng, lines: rng.integers(0, 256, 64, np.uint8).tobytes())),
          ("idx non-UTF-8 line", idx_op(insert(b"1\t\xff\xfe\n"))),
          ("flip 2 bits of train.idx", idx_op(flip_idx_bits))]
    for text in (b"\xff\xfe\x00garbage", b"", b"a,b,c", b"0,112,112", b"-3,112,112",
                 b"3,112", b"3,112,112,7", b"3,0,112", b"3,112,-1", b"1,112,112",
                 b"99999999999999999999999,112,112", b"3,112,112\n", b"\n3 , 112 , 112\n"):
        m.append((f"property {text!r}", prop(text)))
    m += [("property random bytes", prop_random), ("property removed", prop(None))]
    return m


def check_recordio_case(base: RecBase, root: str, number: int, name: str,
                        mutate: Callable) -> list[tuple[str, Callable[[str], None]]]:
    """Writes the mutated set; returns the two runs (skip_corrupt False, True) to check."""
    rng = np.random.default_rng([SEED, number])
    files = dict(base.files)
    touched = mutate(rng, files)
    path = os.path.join(root, f"rec{number:03d}")
    os.makedirs(path)
    for f, data in files.items():
        with open(os.path.join(path, f), "wb") as fh:
            fh.write(data)
    rec_path = os.path.join(path, "train.rec")
    idx_path, prop_path = os.path.join(path, "train.idx"), os.path.join(path, "property")
    try:
        index = parse_idx(files["train.idx"])
    except ValueError:
        index = None  # the reader must refuse it then
    # these make a set that is wrong as a whole (a record twice, an impossible header):
    # reading on would be silently wrong, so the reader must refuse them when opening
    must_refuse = name.startswith(("idx duplicate", "header record labels", "idx empty"))

    def intact(offset: int) -> bool:
        end = base.extent.get(offset)
        return end is not None and all(b <= offset or a >= end for a, b in touched)

    def names_record(msg: str) -> bool:
        if rec_path in msg:
            return re.search(r"key \d+|record index \d+", msg) is not None
        if idx_path in msg:
            return re.search(r"line \d+|entry \d+|key \d+|no records", msg) is not None
        return prop_path in msg and "got" in msg  # the property file and its content

    def run(desc: str, skip: bool) -> str:
        try:
            src = open_source("recordio", path, skip_corrupt=skip)
        except ValueError as e:  # CorruptRecordError is one
            expect(names_record(str(e)), desc, f"open error does not name file+record: {e}")
            return "refused at open"
        expect(index is not None, desc, "an idx that does not parse was accepted")
        expect(not must_refuse, desc, "opened; it must be refused")
        n = len(src)
        expect(0 <= n <= max(index) + 1, desc, f"len {n}, largest idx key {max(index)}")
        got: dict[int, object] = {}
        for i in range(n):
            key = src.key_of(i)
            offset = index.get(key, -1)
            try:
                ex = src[i]
            except CorruptRecordError as e:
                expect(not skip, desc, f"record {i} raised with skip_corrupt=True: {e}")
                expect(rec_path in str(e) and f"record index {i} (key {key}," in str(e),
                       desc, f"read error does not name file+record {i} (key {key}): {e}")
                expect(not (intact(offset) and offset in base.image_offsets), desc,
                       f"intact record {i} (key {key}) reported corrupt: {e}")
                got[i] = "error"
                continue
            if ex is None:
                expect(skip and i in src.corrupt_indices, desc,
                       f"record {i} is None but not a counted skip")
                expect(not (intact(offset) and offset in base.image_offsets), desc,
                       f"intact record {i} (key {key}) skipped")
                got[i] = None
                continue
            expect(well_formed(ex), desc, f"record {i} is not a well-formed example: {ex!r:.200}")
            if intact(offset):
                expect(offset in base.image_offsets, desc,
                       f"record {i} (key {key}) at offset {offset} is no image record, yet "
                       "it decoded")
                label, pixels = base.images[base.image_offsets[offset]]
                expect(int(ex["label"]) == label and np.array_equal(ex["image"], pixels),
                       desc, f"intact record {i} (key {key}) read back wrong "
                       f"(label {int(ex['label'])}, want {label})")
            got[i] = ex
        nones = {i for i, v in got.items() if v is None}
        expect(set(src.corrupt_indices) == nones and src.num_corrupt == len(nones), desc,
               f"corrupt_indices {src.corrupt_indices} != the skipped records {sorted(nones)}")
        try:
            labels = src.labels()
        except CorruptRecordError as e:
            expect(not skip and rec_path in str(e) and "record index" in str(e), desc,
                   f"labels() error: {e}")
            expect(any(v == "error" for v in got.values()), desc,
                   f"labels() failed but every record read: {e}")
            labels = None
        if labels is not None:
            expect(labels.shape == (n,) and labels.dtype == np.int64, desc, "labels() shape")
            for i, v in got.items():
                if isinstance(v, dict):
                    expect(labels[i] == int(v["label"]), desc,
                           f"labels()[{i}] = {labels[i]} but the record says {int(v['label'])}")
                elif labels[i] == -1:
                    expect(skip, desc, "label -1 without skip_corrupt")
            if skip:
                expect(all(got[i] is None for i in np.flatnonzero(labels == -1)), desc,
                       "a record with an unreadable label read as an example")
                expect(set(src.corrupt_indices) == nones, desc,
                       f"labels() counted records {src.corrupt_indices} as corrupt, the "
                       f"reads {sorted(nones)}")
        refused = []
        for nc in (base.num_classes, None):
            try:
                nc = src.num_classes if nc is None else nc
                expect(isinstance(nc, int) and nc >= 1, desc, f"num_classes {nc!r}")
                check_labels(src, nc)
            except ValueError as e:
                msg = str(e)
                expect(rec_path in msg and "record index" in msg, desc,
                       f"check_labels error does not name file+record: {e}")
                refused.append(nc)
                continue
            if labels is not None:
                ok = labels[labels != -1] if skip else labels
                expect(bool(((ok >= 0) & (ok < nc)).all()), desc,
                       f"check_labels({nc}) passed labels {labels.tolist()}")
        if src.has_header:
            try:
                ranges = src.identity_ranges()
                expect(ranges.shape == (src.num_identities, 2), desc, "identity_ranges shape")
            except CorruptRecordError as e:
                expect(rec_path in str(e) and "identity record" in str(e), desc,
                       f"identity_ranges error: {e}")
        bad = sum(not isinstance(v, dict) for v in got.values())
        outcome = f"{bad} records refused/skipped" if bad else "every record read"
        return outcome + (", check_labels refused" if refused else "")

    desc = f"recordio case {number} (seed [{SEED}, {number}], {base.name}: {name})"
    return [(f"{desc} skip_corrupt={skip}", lambda d, skip=skip: run(d, skip))
            for skip in (False, True)]


def test_fuzz_recordio(tmp_path):
    bases = [RecBase(str(tmp_path), "header", True, [0, 0, 1, 2, 2], split_key=3,
                     write_property=True),
             RecBase(str(tmp_path), "plain", False, [1, 0, 1, 0], split_key=2,
                     write_property=False)]
    # the unmutated sets read back exactly (the oracle's own check)
    for base in bases:
        src = open_source("recordio", str(tmp_path / base.name))
        assert len(src) == len(base.images) and src.num_classes == base.num_classes
        for i in range(len(src)):
            label, pixels = base.images[src.key_of(i)]
            assert int(src[i]["label"]) == label and np.array_equal(src[i]["image"], pixels)
    runs, number = [], 0
    for base in bases:
        for name, mutate in record_mutations(base):
            runs += check_recordio_case(base, str(tmp_path), number, name, mutate)
            number += 1
    run_cases("recordio", runs, number)


# ----------------------------------------------------------------------------- image folder


def test_fuzz_image_folder(tmp_path):
    good = {f"{c}/{j}.jpg": encode(smooth(3 * i + j)) for i, c in enumerate("abc")
            for j in range(2)}
    jpg = good["a/0.jpg"]
    png = encode(smooth(7), "PNG")
    bomb = bytearray(encode(smooth(8, 4, 4), "PNG"))
    bomb[16:24] = struct.pack(">II", 100_000, 100_000)  # IHDR width, height
    bomb[29:33] = struct.pack(">I", zlib.crc32(bytes(bomb[12:29])))  # and a valid CRC

    # each case: name, {path: bytes | callable(full path) | None (delete)}, bad records
    # (paths that must fail), expected open failure (None, or a regex on the message)
    rng = np.random.default_rng([SEED, 1])
    cases = [
        ("zero-byte file", {"a/0.jpg": b""}, {"a/0.jpg"}, None),
        ("zero-byte png", {"b/z.png": b""}, {"b/z.png"}, None),
        ("text file named .jpg", {"a/1.jpg": b"not an image\n"}, {"a/1.jpg"}, None),
        ("random bytes named .png", {"c/r.png": rng.integers(0, 256, 300, np.uint8).tobytes()},
         {"c/r.png"}, None),
        ("JPEG truncated to half", {"b/0.jpg": jpg[:len(jpg) // 2]}, {"b/0.jpg"}, None),
        ("JPEG truncated to 10 bytes", {"b/1.jpg": jpg[:10]}, {"b/1.jpg"}, None),
        ("JPEG truncated to its SOI", {"c/0.jpg": jpg[:2]}, {"c/0.jpg"}, None),
        ("JPEG missing its last 200 bytes", {"c/1.jpg": jpg[:-200]}, {"c/1.jpg"}, None),
        ("PNG truncated", {"a/p.png": png[:len(png) - 40]}, {"a/p.png"}, None),
        ("JPEG with a damaged SOI", {"a/0.jpg": b"\x00\x00" + jpg[2:]}, {"a/0.jpg"}, None),
        ("PNG declaring 100000x100000", {"b/bomb.png": bytes(bomb)}, {"b/bomb.png"}, None),
        ("dangling symlink", {"a/gone.jpg": lambda p: os.symlink(p + ".absent", p)},
         {"a/gone.jpg"}, None),
        ("symlink loop", {"b/loop.jpg": lambda p: os.symlink(p, p)}, {"b/loop.jpg"}, None),
        ("FIFO named .jpg (must not block)", {"c/fifo.jpg": os.mkfifo}, {"c/fifo.jpg"}, None),
        ("directory named .jpg next to images", {"a/dir.jpg": os.mkdir}, set(), None),
        ("symlink to a directory named .jpg",
         {"b/link.jpg": lambda p: os.symlink(os.path.dirname(p), p)}, set(), None),
        ("only a directory named .jpg in a class",
         {"c/0.jpg": None, "c/1.jpg": None, "c/d.jpg": os.mkdir}, set(),
         r"c' \(label 2\) has no image files"),
        ("empty class folder", {"d": os.mkdir}, set(), r"d' \(label 3\) has no image files"),
        ("class folder with only non-images",
         {"d/readme.txt": b"x", "d/.hidden.jpg": jpg}, set(),
         r"d' \(label 3\) has no image files"),
        ("every class removed", {f"{c}/{j}.jpg": None for c in "abc" for j in range(2)}
         | {"x.jpg": jpg}, set(), "no identity sub-folders"),
        ("hidden and non-image files ignored",
         {"a/.x.jpg": b"", "a/notes.txt": b"", "b/.DS_Store": b"\0"}, set(), None),
        ("GIF content named .jpg, PNG named .JPG, trailing junk after a JPEG",
         {"a/g.jpg": encode(smooth(9), "GIF"), "b/P.JPG": png, "c/j.jpeg": jpg + b"junk" * 9},
         set(), None),
        ("grey and 1x1 images", {"a/grey.png": encode(smooth(4)[:, :, 0], "PNG"),
                                 "b/one.png": encode(smooth(5, 1, 1), "PNG")}, set(), None),
        ("several broken at once", {"a/0.jpg": b"", "b/1.jpg": jpg[:100],
                                    "c/x.jpg": lambda p: os.symlink("/nonexistent/x", p)},
         {"a/0.jpg", "b/1.jpg", "c/x.jpg"}, None),
        ("every image of a class broken", {"b/0.jpg": b"", "b/1.jpg": b"GIF89a"},
         {"b/0.jpg", "b/1.jpg"}, None),
        ("file where a class folder should be", {"e.jpg": jpg, "f": b"x"}, set(), None),
        ("symlink loop and dangling symlink where class folders could be",
         {"loop": lambda p: os.symlink(p, p), "gone": lambda p: os.symlink(p + "-absent", p)},
         set(), None),
    ]

    def make(number: int, changes: dict) -> tuple[str, dict[str, object]]:
        root = os.path.join(str(tmp_path), f"folder{number:02d}")
        content: dict[str, object] = dict(good)
        for rel, what in changes.items():
            if what is None:
                content.pop(rel, None)
            else:
                content[rel] = what
        for rel, what in sorted(content.items(), key=lambda kv: callable(kv[1])):
            full = os.path.join(root, rel)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            if callable(what):
                what(full)
            else:
                with open(full, "wb") as fh:
                    fh.write(what)
        return root, content

    def check(root, content, bad, open_error, desc, skip) -> str:
        try:
            src = open_source("folder", root, skip_corrupt=skip)
        except ValueError as e:
            expect(open_error is not None and re.search(open_error, str(e)) is not None
                   and root in str(e), desc, f"unexpected open error: {e}")
            return "refused at open"
        expect(open_error is None, desc, f"opened, expected an error matching {open_error!r}")
        # the expected records: identity folders sorted, image names sorted, not dirs
        classes = sorted({rel.split("/")[0] for rel in content if "/" in rel})
        want = sorted((rel for rel in content if "/" in rel
                       and rel.split("/")[1].lower().endswith((".jpg", ".jpeg", ".png", ".bmp"))
                       and not rel.split("/")[1].startswith(".")
                       and not os.path.isdir(os.path.join(root, rel))),
                      key=lambda r: (classes.index(r.split("/")[0]), r.split("/")[1]))
        expect(src.files == want, desc, f"files {src.files} != {want}")
        expect(src.num_classes == len(classes), desc, f"num_classes {src.num_classes}")
        labels = src.labels()
        for i, rel in enumerate(src.files):
            expect(labels[i] == classes.index(rel.split("/")[0]), desc, f"label of {rel}")
            try:
                ex = src[i]
            except CorruptRecordError as e:
                expect(not skip and rel in bad, desc, f"{rel} raised: {e}")
                expect(f"{os.path.join(root, rel)} (record index {i})" in str(e), desc,
                       f"error does not name the file and record: {e}")
                continue
            if ex is None:
                expect(skip and rel in bad and i in src.corrupt_indices, desc,
                       f"{rel} skipped (bad: {rel in bad})")
                continue
            expect(rel not in bad, desc, f"broken {rel} read as an example")
            expect(well_formed(ex) and int(ex["label"]) == labels[i], desc, f"{rel} example")
            expect(np.array_equal(ex["image"], decoded(content[rel])), desc,
                   f"{rel} read back wrong")
        expect(bad <= set(src.files), desc, f"broken files {bad} not all listed")
        if skip:
            expect(src.corrupt_indices == sorted(src.files.index(r) for r in bad), desc,
                   f"corrupt_indices {src.corrupt_indices}, want those of {sorted(bad)}")
        check_labels(src, src.num_classes)
        return "bad records refused/skipped" if bad else "every record read"

    runs = []
    for number, (name, changes, bad, open_error) in enumerate(cases):
        root, content = make(number, changes)
        for skip in (False, True):
            desc = f"folder case {number} ({name}) skip_corrupt={skip}"
            runs.append((desc, lambda d, r=root, c=content, b=bad, o=open_error, s=skip:
                         check(r, c, b, o, d, s)))
    run_cases("folder", runs, len(cases))


# ----------------------------------------------------------------------------- .bin


def test_fuzz_verification_bin(tmp_path):
    images = np.stack([smooth(20 + i) for i in range(6)])
    issame = [True, False, True]
    good_path = tmp_path / "good.bin"
    ver.write_bin(good_path, images, issame, fmt="jpeg")
    raw = good_path.read_bytes()
    with open(good_path, "rb") as f:
        bins, _ = pickle.load(f)
    pixels = np.stack([decoded(b) for b in bins])

    def dump(obj, protocol=pickle.HIGHEST_PROTOCOL):
        return pickle.dumps(obj, protocol=protocol)

    rng = np.random.default_rng([SEED, 2])
    broken_jpeg = bins[2][:len(bins[2]) // 3]
    # name, file bytes, expected: "ok" | "any" (a flipped bit may go unnoticed) |
    # a regex the ValueError must match (after the path)
    cases = [
        ("empty file", b"", "not a readable pickle"),
        ("truncated to 1 byte", raw[:1], "not a readable pickle"),
        ("truncated to half", raw[:len(raw) // 2], "not a readable pickle"),
        ("truncated by 1 byte", raw[:-1], "not a readable pickle"),
        ("truncated by 10 bytes", raw[:-10], "not a readable pickle"),
        ("random bytes", rng.integers(0, 256, 500, np.uint8).tobytes(), "not a readable pickle"),
        ("a JPEG, not a pickle", bins[0], "not a readable pickle"),
        ("trailing garbage after the pickle", raw + b"\x00garbage", "ok"),
        ("protocol 0 pickle", dump((bins, issame), 0), "ok"),
        ("tuple of bins, numpy 0/1 issame", dump((tuple(bins), np.array([1, 0, 1]))), "ok"),
        ("5 images, 3 pairs", dump((bins[:5], issame)), "5 images but 3 issame"),
        ("5 images, 2 pairs", dump((bins[:5], issame[:2])), "5 images but 2 issame"),
        ("6 images, 2 pairs", dump((bins, issame[:2])), "6 images but 2 issame"),
        ("6 images, 4 pairs", dump((bins, issame + [False])), "6 images but 4 issame"),
        ("no pairs", dump(([], [])), "no pairs"),
        ("undecodable image 0", dump(([b"junk"] + bins[1:], issame)), "image 0 does not decode"),
        ("undecodable last image", dump((bins[:5] + [b"\xff\xd8\xff"], issame)),
         "image 5 does not decode"),
        ("zero-byte image", dump((bins[:3] + [b""] + bins[4:], issame)),
         "image 3 does not decode"),
        ("truncated JPEG image", dump((bins[:2] + [broken_jpeg] + bins[3:], issame)),
         "image 2 does not decode"),
        ("image is an int", dump((bins[:1] + [7] + bins[2:], issame)), "image 1 is a int"),
        ("image is None", dump((bins[:4] + [None] + bins[5:], issame)), "image 4 is a NoneType"),
        ("image is a float array", dump((bins[:3] + [np.zeros(9)] + bins[4:], issame)),
         "image 3 is a ndarray"),
        ("a dict, not a pair", dump({"bins": bins, "issame": issame}), "expected a pickled"),
        ("a triple", dump((bins, issame, None)), "expected a pickled"),
        ("an int", dump(42), "expected a pickled"),
        ("bins is an int", dump((6, issame)), "images must be a list"),
        ("bins is a str", dump(("abcdef", issame)), "images must be a list"),
        ("bins is None", dump((None, issame)), "images must be a list"),
        ("issame is None", dump((bins, None)), "issame"),
        ("issame is ragged", dump((bins, [[True], [False, True], True])), "issame"),
        ("issame 2-D", dump((bins, [[True, False, True]])), "issame must be 1-D"),
        ("issame strings", dump((bins, ["yes", "no", "yes"])), "issame must hold booleans"),
        ("issame 0.5", dump((bins, [0.5, 1.0, 0.0])), "issame must hold booleans"),
        ("issame dicts", dump((bins, [{}, {}, {}])), "issame must hold booleans"),
    ]
    for j in range(8):
        data = bytearray(raw)
        flip_bits(np.random.default_rng([SEED, 3, j]), data, 0, len(data), 1 + j % 3)
        cases.append((f"{1 + j % 3} random bit flips (seed [{SEED}, 3, {j}])", bytes(data), "any"))

    def check(path, expected, desc) -> str:
        try:
            vset = ver.load_bin(path)
        except ValueError as e:
            expect(expected != "ok", desc, f"a valid file raised: {e}")
            expect(str(e).startswith(f"{path}: "), desc, f"error does not name the file: {e}")
            if expected != "any":
                expect(re.search(expected, str(e)) is not None, desc,
                       f"error {str(e)!r} does not match {expected!r}")
            return "refused"
        expect(expected in ("ok", "any"), desc, f"loaded, expected an error {expected!r}")
        n = vset.num_pairs
        expect(n >= 1 and vset.images.shape == (2 * n, SIZE, SIZE, 3)
               and vset.images.dtype == np.uint8 and vset.issame.dtype == np.bool_
               and vset.issame.shape == (n,), desc, f"bad set {vset.images.shape}")
        if expected == "ok":
            expect(np.array_equal(vset.images, pixels), desc, "images read back wrong")
            expect(vset.issame.tolist() == issame, desc, "issame read back wrong")
        return "loaded"

    runs = []
    for number, (name, data, expected) in enumerate(cases):
        path = tmp_path / f"case{number:02d}.bin"
        path.write_bytes(data)
        runs.append((f"bin case {number} ({name})",
                     lambda d, p=str(path), e=expected: check(p, e, d)))
    run_cases("bin", runs, len(cases))
