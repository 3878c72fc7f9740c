"""An image folder: one sub-folder per identity, image files inside.

    root/
      alice/ 0001.jpg 0002.png ...
      bob/   a.JPEG ...

Identity folders sorted by name get labels ``0 .. N-1``; inside each, the
image files (``.jpg .jpeg .png .bmp``, any case; hidden files ignored; no
recursion) are sorted by name. Every non-directory entry with an image name
is a record, so a dangling symlink or a FIFO named ``x.jpg`` is a corrupt
record (named when read) rather than silently missing; only regular files
are read (a FIFO is never opened for blocking reads). The order is deterministic: records are
grouped by label, in that order. Images are returned as decoded, not resized.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from typing import Any

import numpy as np

from pfc_jax.data import sources
from pfc_jax.data.sources import CorruptRecordError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _is_dir(entry: os.DirEntry) -> bool:
    """``entry.is_dir()``, False where it cannot tell (a symlink loop raises ELOOP)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


class ImageFolderDataset(sources.CorruptCounter):
    """Random-access source over an identity-per-folder tree (see the module docstring).

    Args:
      root: the folder holding one sub-folder per identity.
      skip_corrupt: return None for (and count) unreadable images instead of
        raising :class:`CorruptRecordError`.

    Raises:
      FileNotFoundError: ``root`` is not a folder.
      ValueError: ``root`` has no identity folders, or an identity folder has
        no image files (named).
    """

    def __init__(self, root: str | os.PathLike, skip_corrupt: bool = False):
        self.root = os.fspath(root)
        self.skip_corrupt = bool(skip_corrupt)
        self._corrupt: set[int] = set()
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"image folder root {self.root!r} is not a directory")
        with os.scandir(self.root) as it:
            names = sorted(e.name for e in it if _is_dir(e) and not e.name.startswith("."))
        if not names:
            raise ValueError(
                f"image folder root {self.root!r} has no identity sub-folders "
                "(expected root/<identity>/<image files>)")
        self.class_names: list[str] = names
        files: list[str] = []
        labels: list[int] = []
        for label, name in enumerate(names):
            folder = os.path.join(self.root, name)
            with os.scandir(folder) as it:
                images = sorted(e.name for e in it if _is_image(e.name) and not _is_dir(e))
            if not images:
                raise ValueError(
                    f"identity folder {folder!r} (label {label}) has no image files "
                    f"({', '.join(IMAGE_EXTENSIONS)}, any case)")
            files.extend(os.path.join(name, f) for f in images)
            labels.extend([label] * len(images))
        self.files: list[str] = files  # relative to root
        self._labels = np.array(labels, np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"ImageFolderDataset({self.root!r}, skip_corrupt={self.skip_corrupt})"

    @property
    def num_classes(self) -> int:
        """Number of identity folders."""
        return len(self.class_names)

    def labels(self) -> np.ndarray:
        """Every record's label (int64), from the folder structure alone."""
        return self._labels.copy()

    def path_of(self, index: int) -> str:
        """The full path of record ``index``'s file."""
        return os.path.join(self.root, self.files[index])

    def record_name(self, index: int) -> str:
        """``"<file> (record index i)"`` for messages."""
        return f"{self.path_of(index)} (record index {index})"

    def read_raw(self, index: int) -> tuple[bytes, int]:
        """``(file bytes, label)`` of record ``index`` without decoding."""
        i = sources.check_index(index, len(self), repr(self))
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer
            fd = os.open(self.path_of(i), os.O_RDONLY | os.O_NONBLOCK)
            with open(fd, "rb") as f:
                mode = os.fstat(fd).st_mode
                if not stat.S_ISREG(mode):
                    raise CorruptRecordError(
                        f"{self.record_name(i)}: not a regular file "
                        f"(mode {stat.filemode(mode)})")
                data = f.read()
        except OSError as e:
            raise CorruptRecordError(f"{self.record_name(i)}: cannot read: {e}") from e
        return data, int(self._labels[i])

    def __getitem__(self, index: Any) -> sources.Example | None:
        i = sources.check_index(index, len(self), repr(self))

        def read():
            data, label = self.read_raw(i)
            return sources.decode_record_image(data, self.record_name(i)), label

        return self._example_or_skip(i, read)

    def __getitems__(self, indices: Sequence[int]) -> list[sources.Example | None]:
        return [self[i] for i in indices]

    _getitems = __getitems__  # grain's batched-read hook
