"""Dataset sources: RecordIO, image folder, ArrayRecord, TFDS; errors; pickling.

Fixtures are real files built in ``tmp_path``: RecordIO files both from the
writer and byte by byte with ``struct`` (the independent expectation of the
format), image folders, ArrayRecord conversions and a tiny TFDS dataset.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import signal
import struct
import time

import numpy as np
import pytest
from PIL import Image

from pfc_jax.data import arrayrecord, folder, recordio, recordio_writer, sources, tfds_source
from pfc_jax.data.sources import CorruptRecordError

MAGIC = 0xCED7230A


# ----------------------------------------------------------------------------- helpers


def smooth(seed: int, h: int = 16, w: int = 16) -> np.ndarray:
    """A gradient image with a per-seed colour: JPEG keeps it within a few levels."""
    y, x = np.mgrid[0:h, 0:w]
    c = np.array([(seed * 37) % 200, (seed * 71) % 200, (seed * 13) % 200])
    return (c[None, None, :] + 3 * x[..., None] + 2 * y[..., None]).clip(0, 255).astype(np.uint8)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(arr: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def close_to(a: np.ndarray, b: np.ndarray, tol: int = 8) -> bool:
    return a.shape == b.shape and int(np.abs(a.astype(int) - b.astype(int)).max()) <= tol


def hand_frame(payload: bytes) -> bytes:
    """A whole record (flag 0), framed by hand from the format description."""
    assert len(payload) < 1 << 29
    return struct.pack("<II", MAGIC, len(payload)) + payload + b"\0" * (-len(payload) % 4)


def hand_payload(label, image: bytes = b"", rid: int = 0) -> bytes:
    if np.ndim(label) == 0:
        return struct.pack("<IfQQ", 0, float(label), rid, 0) + image
    labels = [float(x) for x in label]
    return (struct.pack("<IfQQ", len(labels), 0.0, rid, 0)
            + struct.pack(f"<{len(labels)}f", *labels) + image)


def write_hand_rec(folder_path, records, idx_order=None) -> list[int]:
    """Writes framed records (key = position) and an idx; returns the offsets."""
    os.makedirs(folder_path, exist_ok=True)
    offsets, blob = [], b""
    for frame in records:
        offsets.append(len(blob))
        blob += frame
    with open(os.path.join(folder_path, "train.rec"), "wb") as f:
        f.write(blob)
    order = idx_order if idx_order is not None else range(len(records))
    with open(os.path.join(folder_path, "train.idx"), "w") as f:
        for k in order:
            f.write(f"{k}\t{offsets[k]}\n")
    return offsets


def build_rec(tmp_path, name="rec", n_per_class=(2, 1, 3), fmt="png", **kw):
    """A RecordIO dataset written with RecordIOWriter; returns (path, images, labels)."""
    path = tmp_path / name
    images, labels = [], []
    with recordio_writer.RecordIOWriter(path, image_format=fmt, **kw) as w:
        for c, n in enumerate(n_per_class):
            for _ in range(n):
                img = smooth(len(images))
                w.add_image(img, c)
                images.append(img)
                labels.append(c)
    return path, images, labels


# ----------------------------------------------------------------------------- RecordIO


def test_recordio_reads_hand_built_file(tmp_path):
    """Header record, multi-label headers, identity records, a split record, no property."""
    imgs = [smooth(i, 8 + i, 12) for i in range(4)]
    frames = [hand_frame(hand_payload([5, 8]))]  # key 0: images 1..4, identities 5..7
    frames.append(hand_frame(hand_payload(0, png(imgs[0]), rid=1)))
    frames.append(hand_frame(hand_payload([0, 0.25, 9.0], png(imgs[1]), rid=2)))  # flag 3
    # key 3: its id field is the magic, at an aligned offset: written as 2 parts
    payload = hand_payload(1, png(imgs[2]), rid=MAGIC)
    cut = 8  # the id field starts at byte 8 of the payload
    assert payload[cut:cut + 4] == struct.pack("<I", MAGIC)
    rest = payload[cut + 4:]
    frames.append(struct.pack("<II", MAGIC, (1 << 29) | cut) + payload[:cut]
                  + struct.pack("<II", MAGIC, (3 << 29) | len(rest)) + rest
                  + b"\0" * (-len(rest) % 4))
    frames.append(hand_frame(hand_payload([2.0], png(imgs[3]), rid=4)))  # flag 1
    for start, end in [(1, 3), (3, 4), (4, 5)]:
        frames.append(hand_frame(hand_payload([start, end])))
    write_hand_rec(tmp_path / "hand", frames)

    src = recordio.RecordIODataset(tmp_path / "hand")
    assert src.has_header and len(src) == 4
    assert src.num_identities == 3 and src.num_classes == 3  # no property file
    np.testing.assert_array_equal(src.labels(), [0, 0, 1, 2])
    np.testing.assert_array_equal(src.identity_ranges(), [[1, 3], [3, 4], [4, 5]])
    for i in range(4):
        ex = src[i]
        assert ex["image"].dtype == np.uint8 and ex["image"].flags.writeable
        np.testing.assert_array_equal(ex["image"], imgs[i])
        assert ex["label"].dtype == np.int32 and int(ex["label"]) == [0, 0, 1, 2][i]
    assert src.key_of(3) == 4
    # the .rec file itself works as the path too
    assert len(recordio.RecordIODataset(tmp_path / "hand" / "train.rec")) == 4


def test_recordio_writer_bytes_match_the_format(tmp_path):
    image_bytes = b"\xff\xd8\xff not really a jpeg"  # verbatim, 26 bytes: padding needed
    with recordio_writer.RecordIOWriter(tmp_path / "w") as w:
        w.add_image(image_bytes, 7)
        w.add_image(b"\x01\x02\x03\x04", 7, extra_labels=[0.5, 2.0])
        w.add_image(b"\x05", 8, id=MAGIC)
    rec = (tmp_path / "w" / "train.rec").read_bytes()
    idx = [tuple(map(int, line.split("\t")))
           for line in (tmp_path / "w" / "train.idx").read_text().splitlines()]
    assert [k for k, _ in idx] == list(range(3 + 1 + 9))  # header, 3 images, 9 identities
    off = dict(idx)
    assert rec[off[1]:off[2]] == hand_frame(hand_payload(7, image_bytes, rid=1))
    assert rec[off[2]:off[3]] == hand_frame(hand_payload([7, 0.5, 2.0], b"\x01\x02\x03\x04", 2))
    part = rec[off[3]:off[4]]  # split at the magic in the id field
    lrec1, = struct.unpack_from("<I", part, 4)
    assert lrec1 >> 29 == 1 and lrec1 & ((1 << 29) - 1) == 8
    lrec2, = struct.unpack_from("<I", part, 8 + 8 + 4)
    assert lrec2 >> 29 == 3
    # header record: [first identity record, end]; identity 7 = keys [1, 3), 8 = [3, 4)
    assert rec[0:off[1]] == hand_frame(hand_payload([4.0, 13.0]))
    assert rec[off[4 + 7]:off[4 + 8]] == hand_frame(hand_payload([1, 3], rid=7))
    assert rec[off[4 + 0]:off[4 + 1]] == hand_frame(hand_payload([0, 0], rid=0))  # no images
    assert (tmp_path / "w" / "property").read_text() == "9,112,112"
    src = recordio.RecordIODataset(tmp_path / "w")
    np.testing.assert_array_equal(src.labels(), [7, 7, 8])
    assert src.read_raw(2) == (b"\x05", 8)


def test_recordio_multi_part_records_round_trip(tmp_path):
    m = struct.pack("<I", MAGIC)
    images = [m * 3 + b"tail",  # three aligned magics: parts 1, 2 (empty), 2 (empty), 3
              b"ab" + m + b"cd",  # unaligned magic: one whole record
              b"abcd" + m,  # a magic in the last aligned word
              b"abcd" + m + b"xyz" + m]  # one aligned, one not
    with recordio_writer.RecordIOWriter(tmp_path / "mp", header=False) as w:
        for lab, im in enumerate(images):
            w.add_image(im, lab)
    rec = (tmp_path / "mp" / "train.rec").read_bytes()
    keys, offs = recordio.read_index(str(tmp_path / "mp" / "train.idx"))
    flags = []
    pos = int(offs[0])
    while pos < int(offs[1]):  # the parts of record 0, read by hand
        magic, lrec = struct.unpack_from("<II", rec, pos)
        assert magic == MAGIC
        flags.append(lrec >> 29)
        pos += 8 + ((lrec & ((1 << 29) - 1)) + 3) // 4 * 4
    assert flags == [1, 2, 2, 3]
    src = recordio.RecordIODataset(tmp_path / "mp")
    np.testing.assert_array_equal(src.labels(), [0, 1, 2, 3])
    for i, im in enumerate(images):
        assert src.read_raw(i) == (im, i)


def test_recordio_writer_round_trip_png_and_jpeg(tmp_path):
    path, images, labels = build_rec(tmp_path, fmt="png")
    src = recordio.RecordIODataset(path)
    assert len(src) == 6 and src.num_classes == 3 and src.image_size == (16, 16)
    np.testing.assert_array_equal(src.labels(), labels)
    np.testing.assert_array_equal(src.identity_ranges(), [[1, 3], [3, 4], [4, 7]])
    for i, ex in enumerate(src.__getitems__([5, 0, 3])):
        np.testing.assert_array_equal(ex["image"], images[[5, 0, 3][i]])
    path, images, _ = build_rec(tmp_path, name="jpg", fmt="jpeg")
    src = recordio.RecordIODataset(path)
    assert all(close_to(src[i]["image"], images[i]) for i in range(len(src)))


def test_recordio_headerless_uses_index_order(tmp_path):
    imgs = [smooth(i) for i in range(3)]
    frames = [hand_frame(hand_payload(lab, png(im))) for lab, im in zip([4, 0, 2], imgs)]
    write_hand_rec(tmp_path / "nohead", frames, idx_order=[2, 0, 1])
    src = recordio.RecordIODataset(tmp_path / "nohead")
    assert not src.has_header and len(src) == 3
    np.testing.assert_array_equal(src.labels(), [2, 4, 0])
    assert src.num_classes == 5  # max label + 1: no property, no identity records
    np.testing.assert_array_equal(src[0]["image"], imgs[2])
    np.testing.assert_array_equal(src[1]["image"], imgs[0])

    with recordio_writer.RecordIOWriter(tmp_path / "w", header=False, write_property=False) as w:
        for i, im in enumerate(imgs):
            w.add_image(im, 2 - i)
    src = recordio.RecordIODataset(tmp_path / "w")
    assert not src.has_header and [src.key_of(i) for i in range(3)] == [0, 1, 2]
    np.testing.assert_array_equal(src.labels(), [2, 1, 0])


def test_recordio_truncated_file_names_key_and_offset(tmp_path, caplog):
    path, _, _ = build_rec(tmp_path)
    keys, offs = recordio.read_index(str(path / "train.idx"))
    offsets = {int(k): int(o) for k, o in zip(keys, offs)}
    rec = path / "train.rec"
    cut = offsets[6] + 40  # inside the last image record (key 6)
    rec.write_bytes(rec.read_bytes()[:cut])
    src = recordio.RecordIODataset(path)
    with pytest.raises(CorruptRecordError, match=rf"key 6, offset {offsets[6]}.*truncated"):
        src[5]
    with pytest.raises(CorruptRecordError, match="key 6"):
        src.labels()  # the pre-training pass over the headers sees it too
    assert int(src[4]["label"]) == 2  # the other records still read

    skipping = recordio.RecordIODataset(path, skip_corrupt=True)
    with caplog.at_level(logging.WARNING, logger="pfc_jax.data"):
        assert skipping[5] is None
        assert skipping[5] is None
    assert skipping.num_corrupt == 1 and skipping.corrupt_indices == [5]
    assert any("key 6" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(skipping.labels(), [0, 0, 1, 2, 2, sources.UNREADABLE_LABEL])
    sources.check_labels(skipping, 3)  # the unreadable record is dropped, not out of range


def test_recordio_bad_magic_and_bad_flag(tmp_path):
    frames = [hand_frame(hand_payload(0, png(smooth(0)))),
              hand_frame(hand_payload(1, png(smooth(1))))]
    offs = write_hand_rec(tmp_path / "m", frames)
    with open(tmp_path / "m" / "train.idx", "w") as f:
        f.write(f"0\t{offs[0]}\n1\t{offs[1] + 4}\n")  # key 1 points 4 bytes too far
    src = recordio.RecordIODataset(tmp_path / "m")
    at = offs[1] + 4
    with pytest.raises(CorruptRecordError, match=rf"bad magic 0x[0-9a-f]{{8}} at offset {at}"):
        src[1]
    # a continuation flag outside 0..3 where a record starts
    payload = hand_payload(0, png(smooth(0)))
    bad = (struct.pack("<II", MAGIC, (5 << 29) | len(payload)) + payload
           + b"\0" * (-len(payload) % 4))
    write_hand_rec(tmp_path / "f", [bad])
    with pytest.raises(CorruptRecordError, match="continuation flag 5 at offset 0"):
        recordio.RecordIODataset(tmp_path / "f")[0]


def test_recordio_missing_files_and_bad_index(tmp_path):
    (tmp_path / "only_rec").mkdir()
    (tmp_path / "only_rec" / "train.rec").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="train.idx"):
        recordio.RecordIODataset(tmp_path / "only_rec")
    with pytest.raises(FileNotFoundError, match="train.rec"):
        recordio.RecordIODataset(tmp_path / "nothing")
    path, _, _ = build_rec(tmp_path)
    (path / "train.idx").write_text("0\t0\n1\tforty\n")
    with pytest.raises(ValueError, match="line 2"):
        recordio.RecordIODataset(path)
    (path / "train.idx").write_text("0\t0\n1\t40\n1\t80\n")
    with pytest.raises(ValueError, match="key 1 appears more than once"):
        recordio.RecordIODataset(path)


def test_recordio_corrupt_image(tmp_path):
    good = smooth(0)
    with recordio_writer.RecordIOWriter(tmp_path / "c", image_format="png") as w:
        w.add_image(good, 0)
        w.add_image(jpeg(smooth(1))[:60], 1)  # a JPEG cut short
        w.add_image(b"certainly not an image", 1)
    src = recordio.RecordIODataset(tmp_path / "c")
    np.testing.assert_array_equal(src.labels(), [0, 1, 1])  # headers are fine
    with pytest.raises(CorruptRecordError, match=r"train.rec: record index 1 \(key 2, offset"):
        src[1]
    with pytest.raises(CorruptRecordError, match=r"record index 2 \(key 3.*cannot decode"):
        src.__getitems__([0, 2])
    skip = recordio.RecordIODataset(tmp_path / "c", skip_corrupt=True)
    out = skip.__getitems__([0, 1, 1])
    np.testing.assert_array_equal(out[0]["image"], good)
    assert out[1] is None and out[2] is None and skip.num_corrupt == 1
    assert skip[2] is None and skip.num_corrupt == 2


def test_check_labels_names_the_record(tmp_path):
    path, _, _ = build_rec(tmp_path, n_per_class=(1, 2, 2))
    (path / "property").write_text("2,16,16")  # claims 2 classes; labels go to 2
    src = recordio.RecordIODataset(path)
    assert src.num_classes == 2
    with pytest.raises(ValueError, match=r"2 of 5 records .* outside \[0, 2\).*record index 3 "
                                         r"\(key 4, offset \d+\) with label 2"):
        sources.check_labels(src, src.num_classes)
    sources.check_labels(src, 3)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        sources.check_labels(src, 0)


# The forked child runs no JAX code (pread + Pillow) and leaves through os._exit.
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_recordio_pickles_and_reads_after_fork(tmp_path):
    path, images, labels = build_rec(tmp_path)
    src = recordio.RecordIODataset(path)
    np.testing.assert_array_equal(src[0]["image"], images[0])  # descriptor now open
    clone = pickle.loads(pickle.dumps(src))
    assert clone._fd is None  # pylint: disable=protected-access
    np.testing.assert_array_equal(clone[4]["image"], images[4])
    np.testing.assert_array_equal(clone.identity_ranges(), src.identity_ranges())
    assert repr(clone) == repr(src)

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: inherited object, reopens its own descriptor
        try:
            ex = src[5]
            ok = np.array_equal(ex["image"], images[5]) and int(ex["label"]) == labels[5]
            os.write(w, b"ok" if ok else b"bad")
        finally:
            os._exit(0)  # pylint: disable=protected-access
    os.close(w)
    deadline = time.monotonic() + 30
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("forked reader did not finish in 30 s")
        time.sleep(0.01)
    assert os.read(r, 10) == b"ok"
    os.close(r)


# ----------------------------------------------------------------------------- folder


def build_folder(tmp_path, name="faces"):
    root = tmp_path / name
    layout = {"zoe": ["b.png", "a.PNG"], "adam": ["2.png", "10.png", "x.JPG"],
              "mia": ["only.bmp"]}
    images = {}
    for k, (ident, files) in enumerate(layout.items()):
        (root / ident).mkdir(parents=True)
        for j, f in enumerate(files):
            img = smooth(10 * k + j)
            ext = f.rsplit(".", 1)[1].lower()
            Image.fromarray(img).save(root / ident / f, format="JPEG" if ext == "jpg" else
                                      "BMP" if ext == "bmp" else "PNG")
            images[f"{ident}/{f}"] = img
    (root / "adam" / "notes.txt").write_text("not an image")
    (root / "adam" / ".hidden.png").write_bytes(b"junk")
    (root / "stray.png").write_bytes(png(smooth(99)))  # not in an identity folder
    return root, images


def test_folder_labels_order_and_images(tmp_path):
    root, images = build_folder(tmp_path)
    src = folder.ImageFolderDataset(root)
    assert src.class_names == ["adam", "mia", "zoe"] and src.num_classes == 3
    assert src.files == ["adam/10.png", "adam/2.png", "adam/x.JPG", "mia/only.bmp",
                         "zoe/a.PNG", "zoe/b.png"]
    np.testing.assert_array_equal(src.labels(), [0, 0, 0, 1, 2, 2])
    for i, ex in enumerate(src.__getitems__(range(len(src)))):
        want = images[src.files[i]]
        if src.files[i].endswith(".JPG"):
            assert close_to(ex["image"], want)
        else:
            np.testing.assert_array_equal(ex["image"], want)
        assert int(ex["label"]) == src.labels()[i]
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone[5]["image"], images["zoe/b.png"])


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no identity sub-folders"):
        folder.ImageFolderDataset(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        folder.ImageFolderDataset(tmp_path / "absent")
    root, _ = build_folder(tmp_path)
    (root / "nobody").mkdir()
    (root / "nobody" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"nobody' \(label 2\) has no image files"):
        folder.ImageFolderDataset(root)
    (root / "nobody" / "broken.jpg").write_bytes(jpeg(smooth(1))[:50])
    src = folder.ImageFolderDataset(root)
    i = src.files.index("nobody/broken.jpg")
    with pytest.raises(CorruptRecordError, match=rf"nobody/broken.jpg \(record index {i}\)"):
        src[i]
    skip = folder.ImageFolderDataset(root, skip_corrupt=True)
    assert skip[i] is None and skip.num_corrupt == 1 and skip[0] is not None


# ----------------------------------------------------------------------------- ArrayRecord


def test_arrayrecord_round_trip_from_recordio(tmp_path, capsys):
    path, images, labels = build_rec(tmp_path, fmt="jpeg", n_per_class=(2, 2, 1, 2))
    src = recordio.RecordIODataset(path)
    out = str(tmp_path / "ar" / "faces.array_record")
    meta = arrayrecord.convert_to_arrayrecord(src, out, num_shards=3, progress=True)
    assert "converting to faces.array_record: 7/7" in capsys.readouterr().err
    assert meta["num_records"] == 7 and meta["num_classes"] == 4 and meta["num_skipped"] == 0
    names = sorted(os.listdir(tmp_path / "ar"))
    assert names == ["faces-00000-of-00003.array_record", "faces-00001-of-00003.array_record",
                     "faces-00002-of-00003.array_record", "faces.labels.npy", "faces.meta.json"]
    for how in (out, str(tmp_path / "ar" / "faces-*.array_record"),
                str(tmp_path / "ar" / "faces.meta.json")):
        ar = arrayrecord.ArrayRecordDataset(how)
        assert len(ar) == 7 and ar.num_classes == 4
        np.testing.assert_array_equal(ar.labels(), labels)
    # JPEG bytes were copied: decoded images are identical to the source's
    batch = ar.__getitems__([6, 0, 3, 2])  # across all three shards, out of order
    for j, i in enumerate([6, 0, 3, 2]):
        np.testing.assert_array_equal(batch[j]["image"], src[i]["image"])
        assert int(batch[j]["label"]) == labels[i]
        assert close_to(batch[j]["image"], images[i])
    assert ar.record_name(3).endswith("faces-00001-of-00003.array_record: record 1 "
                                      "(record index 3)")
    clone = pickle.loads(pickle.dumps(ar))
    np.testing.assert_array_equal(clone[5]["image"], src[5]["image"])
    # one shard alone, with its slice of the sidecar labels
    one = arrayrecord.ArrayRecordDataset(str(tmp_path / "ar" / "faces-00002-of-00003.array_record"))
    np.testing.assert_array_equal(one.labels(), labels[4:])


def test_arrayrecord_round_trip_from_folder_reencodes(tmp_path):
    root, images = build_folder(tmp_path)
    src = folder.ImageFolderDataset(root)
    out = tmp_path / "f.array_record"
    arrayrecord.convert_to_arrayrecord(src, out, quality=95)
    ar = arrayrecord.ArrayRecordDataset(out)
    assert len(ar) == len(src) and ar.num_classes == 3
    np.testing.assert_array_equal(ar.labels(), src.labels())
    for i in range(len(src)):
        data, label = ar.read_raw(i)
        assert data[:3] == b"\xff\xd8\xff" and label == src.labels()[i]  # all JPEG now
        assert close_to(ar[i]["image"], images[src.files[i]])


def test_arrayrecord_conversion_skips_corrupt_only_when_asked(tmp_path):
    with recordio_writer.RecordIOWriter(tmp_path / "c", image_format="jpeg") as w:
        w.add_image(smooth(0), 0)
        w.add_image(b"\xff\xd8\xff\xe0 broken jpeg", 1)
        w.add_image(smooth(2), 1)
    with pytest.raises(CorruptRecordError, match=r"record index 1 \(key 2"):
        arrayrecord.convert_to_arrayrecord(recordio.RecordIODataset(tmp_path / "c"),
                                           tmp_path / "a.array_record")
    src = recordio.RecordIODataset(tmp_path / "c", skip_corrupt=True)
    meta = arrayrecord.convert_to_arrayrecord(src, tmp_path / "b.array_record")
    assert meta["num_skipped"] == 1 and meta["skipped_source_indices"] == [1]
    saved = json.loads((tmp_path / "b.meta.json").read_text())
    assert saved["num_records"] == 2 and saved["num_classes"] == 2
    ar = arrayrecord.ArrayRecordDataset(tmp_path / "b.array_record")
    np.testing.assert_array_equal(ar.labels(), [0, 1])
    assert close_to(ar[1]["image"], smooth(2))


def test_arrayrecord_corrupt_record_and_no_sidecar(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter
    path = str(tmp_path / "raw.array_record")
    w = ArrayRecordWriter(path, "group_size:1")
    w.write(arrayrecord.pack_record(3, png(smooth(3))))
    w.write(b"XXXX not a pfc record")
    w.write(arrayrecord.pack_record(1, b"bad image bytes"))
    w.close()
    with pytest.raises(CorruptRecordError, match=r"raw.array_record: record 1 .*expected b'PFCR'"):
        arrayrecord.ArrayRecordDataset(path).labels()  # no sidecar: reads the headers
    src = arrayrecord.ArrayRecordDataset(path, skip_corrupt=True)
    np.testing.assert_array_equal(src.labels(), [3, sources.UNREADABLE_LABEL, 1])
    assert src.num_classes == 4
    out = src.__getitems__([0, 1, 2])
    np.testing.assert_array_equal(out[0]["image"], smooth(3))
    assert out[1] is None and out[2] is None and src.num_corrupt == 2
    strict = arrayrecord.ArrayRecordDataset(path)
    with pytest.raises(CorruptRecordError, match=r"record 2 \(record index 2\): cannot decode"):
        strict[2]
    with pytest.raises(FileNotFoundError, match="no ArrayRecord files match"):
        arrayrecord.ArrayRecordDataset(str(tmp_path / "nope-*.array_record"))


def test_arrayrecord_cli_and_open_source(tmp_path, capsys):
    path, _, labels = build_rec(tmp_path, fmt="jpeg")
    out = str(tmp_path / "cli.array_record")
    assert arrayrecord.main(["--src-kind", "recordio", "--src", str(path), "--out", out,
                             "--num-shards", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_records"] == 6 and summary["num_classes"] == 3
    assert summary["files"] == ["cli-00000-of-00002.array_record",
                                "cli-00001-of-00002.array_record"]
    ar = sources.open_source("arrayrecord", out)
    np.testing.assert_array_equal(ar.labels(), labels)
    assert isinstance(sources.open_source("recordio", str(path), skip_corrupt=True),
                      recordio.RecordIODataset)
    with pytest.raises(ValueError, match="recordio, folder, arrayrecord, tfds"):
        sources.open_source("lmdb", str(path))


def test_sources_fit_grain(tmp_path):
    import grain
    from grain._src.python.dataset import base

    path, images, _ = build_rec(tmp_path, fmt="png")
    src = recordio.RecordIODataset(path)
    assert isinstance(src, base.SupportsBatchedReadRandomAccessDataSource)
    ds = grain.MapDataset.source(src).map(lambda ex: int(ex["label"]))
    assert list(ds) == [0, 0, 1, 2, 2, 2]


# ----------------------------------------------------------------------------- TFDS


def test_tfds_source_from_a_tiny_local_dataset(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    imgs = [smooth(i, 8, 8) for i in range(5)]
    labels = [2, 0, 1, 2, 0]

    class PfcTinyFaces(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Five 8x8 PNG faces in three classes (images passed encoded: no TF needed)."""
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 3)),
                "label": tfds.features.ClassLabel(num_classes=3)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, (im, lab) in enumerate(zip(imgs, labels)):
                yield i, {"image": io.BytesIO(png(im)), "label": lab}

    data_dir = str(tmp_path / "tfds")
    PfcTinyFaces(data_dir=data_dir, file_format="array_record").download_and_prepare()
    src = tfds_source.TFDSDataset("pfc_tiny_faces", data_dir=data_dir)
    assert len(src) == 5 and src.num_classes == 3
    got = src.__getitems__(range(5))
    order = [int(np.argmin([np.abs(g["image"].astype(int) - im).sum() for im in imgs]))
             for g in got]
    assert sorted(order) == list(range(5))  # TFDS may shuffle; every image comes back
    for g, j in zip(got, order):
        np.testing.assert_array_equal(g["image"], imgs[j])
        assert int(g["label"]) == labels[j]
    np.testing.assert_array_equal(src.labels(), [labels[j] for j in order])
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone[2]["image"], got[2]["image"])
    with pytest.raises(ValueError, match="no feature 'img'"):
        tfds_source.TFDSDataset("pfc_tiny_faces", data_dir=data_dir, image_key="img")
