"""The grain input pipeline: shard, shuffle, load, augment, batch; resumable and deterministic.

``make_loader(source, cfg, process_index=p, process_count=S)`` returns a
``Loader``; iterating it yields host-local batches

    {"image": uint8 [b, size, size, 3], "label": int32 [b],
     "valid": bool [b], "index": int32 [b]}        b = global_batch / S

and with ``views = 2`` (the contrastive pipeline) also ``"image2"``: a second,
independently augmented view of the same records.

``index`` is the record number in the source. Images stay uint8 on the host;
the trainer normalises on device with ``normalize`` (re-exported here).

Order. The global stream of draws is epoch after epoch of the records; each
epoch is a fresh permutation of all ``N`` records (grain's index shuffle, one
seed per epoch, O(1) memory) cut to ``N' = S * (N // S)`` records. Process
``p`` takes positions ``p, p + S, p + 2S, ...`` of each epoch, so within an
epoch the processes hold disjoint records whose union is the epoch, and every
epoch reshuffles globally. Global batch ``k`` is always the positions
``[k * B, (k + 1) * B)`` of the global stream (``B = global_batch``), whatever
``S`` is; batches run across epoch boundaries, so only a finite run's last
batch can be short (dropped when ``drop_remainder``).

Randomness. The augmentation of a draw uses ``np.random.default_rng([seed,
G])`` where ``G`` is the draw's position in the global stream: a fixed
function of the seed and the position, independent of workers, threads and
process count, and different in every epoch. The second view uses
``default_rng([seed, G, 1])``: the first view is what a one-view pipeline
yields, the second is independent of it.

Workers. The grain dataset is a ``MapDataset`` whose element ``k`` *is* host
batch ``k`` (one map loads, augments and stacks the whole batch, reading the
source with ``__getitems__``). ``mp_prefetch`` hands whole batches round robin
to ``worker_count`` processes (shared memory back), so the batch sequence is
identical for any number of workers, including none. The source and the
config are pickled into the workers, which start with ``spawn``: sources must
pickle and be importable.

Batches are plain numpy arrays owned by the caller (copied out of grain's
shared memory when workers made them).

Why not ``grain.DataLoader``: its workers batch their own strided share of
the records, so the batches change with ``worker_count``, and its state only
restores into a loader with the same worker count.

Corrupt records. A source returns ``None`` for a record it cannot decode.
Such a record keeps its slot in the batch, so every host stays in lockstep
and shapes stay static: its ``image`` is zeros, its ``label`` is ``-1``, its
``valid`` is False. The Partial FC head ignores labels outside ``[0, C)``
(zero loss, counted in its ``num_bad_labels`` metric); the running total is
``LoaderIterator.num_skipped`` and is carried in the iterator state.

State. ``it.get_state()`` is JSON bytes: the number of batches consumed, the
skipped count and a fingerprint of everything that defines the stream (record
count, epoch size, global batch, seed, shuffle, epochs, image size,
augmentation). ``set_state`` on any loader with the same fingerprint resumes
at exactly the next batch, with any worker count and any process count that
gives the same epoch size ``N'``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any

import grain
import numpy as np

from pfc_jax.data.augment import AugmentConfig, augment, normalize, resize
from pfc_jax.data.degrade import Degradation

__all__ = ["PipelineConfig", "Loader", "LoaderIterator", "make_loader", "measure_throughput",
           "normalize"]

_STATE_VERSION = 1


@dataclasses.dataclass
class PipelineConfig:
    """What the input stream is; see the module docstring.

    Attributes:
      global_batch: batch size summed over all processes.
      seed: seeds the shuffle and the augmentation (an integer in [0, 2**32)).
      shuffle: reshuffle the records every epoch (else read them in order).
      num_epochs: passes over the data; None repeats forever.
      worker_count: input processes per host (0: load in a thread of this process).
      worker_buffer_size: batches each worker (or the loading thread) prepares ahead.
      image_size: side of the square images produced; sources of another size are resized.
      augment: the per-image augmentations.
      drop_remainder: drop the final short batch of a finite run.
      views: augmented views per record: 1, or 2 (``"image2"`` added).
      degrade: a very-low-resolution degradation after the augmentation
        (``pfc_jax.data.degrade``; its generator ``default_rng([seed, G, 2])``,
        the second view's ``[seed, G, 3]``).
    """

    global_batch: int
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    worker_count: int = 0
    worker_buffer_size: int = 2
    image_size: int = 112
    augment: AugmentConfig = AugmentConfig()
    drop_remainder: bool = True
    views: int = 1
    degrade: Degradation = Degradation()

    def validate(self) -> None:
        """Raises ValueError naming the first field that is out of range."""
        def is_int(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)
        if not is_int(self.global_batch) or self.global_batch < 1:
            raise ValueError(f"PipelineConfig.global_batch must be an integer >= 1, "
                             f"got {self.global_batch!r}")
        if not is_int(self.seed) or not 0 <= self.seed < 2**32:
            raise ValueError(f"PipelineConfig.seed must be an integer in [0, 2**32), "
                             f"got {self.seed!r}")
        if self.num_epochs is not None and (not is_int(self.num_epochs) or self.num_epochs < 1):
            raise ValueError(f"PipelineConfig.num_epochs must be None or an integer >= 1, "
                             f"got {self.num_epochs!r}")
        if not is_int(self.worker_count) or self.worker_count < 0:
            raise ValueError(f"PipelineConfig.worker_count must be an integer >= 0, "
                             f"got {self.worker_count!r}")
        if not is_int(self.worker_buffer_size) or self.worker_buffer_size < 1:
            raise ValueError(f"PipelineConfig.worker_buffer_size must be an integer >= 1, "
                             f"got {self.worker_buffer_size!r}")
        if not is_int(self.image_size) or self.image_size < 1:
            raise ValueError(f"PipelineConfig.image_size must be an integer >= 1, "
                             f"got {self.image_size!r}")
        if self.views not in (1, 2) or isinstance(self.views, bool):
            raise ValueError(f"PipelineConfig.views must be 1 or 2, got {self.views!r}")
        if not isinstance(self.degrade, Degradation):
            raise ValueError(f"PipelineConfig.degrade must be a Degradation, "
                             f"got {type(self.degrade).__name__}")
        if not isinstance(self.augment, AugmentConfig):
            raise ValueError(f"PipelineConfig.augment must be an AugmentConfig, "
                             f"got {type(self.augment).__name__}")
        for name in ("shuffle", "drop_remainder"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"PipelineConfig.{name} must be a bool, "
                                 f"got {getattr(self, name)!r}")


def _shuffle_seed(seed: int) -> int:
    """A 32-bit shuffle seed that is far from those of neighbouring user seeds.

    grain seeds epoch ``e`` with ``seed + e``; hashing keeps epoch 1 of seed 0
    from being epoch 0 of seed 1.
    """
    return int(np.random.SeedSequence([seed, 0x5EED]).generate_state(1)[0])


def _absl_flags_ready() -> None:
    """Lets grain's worker start-up read its absl flags outside ``absl.app.run``.

    grain 0.2.18 reads an absl flag (worker profiling) when it starts worker
    processes and fails if the program never parsed absl flags. Here that
    happens only in programs that do not use absl (tests, notebooks), so the
    flags are marked parsed with their defaults; ``absl.app.run`` still parses
    the command line as usual later.
    """
    from absl import flags  # grain depends on absl
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class _LoadBatch:
    """Host batch ``k`` of one process: which draws, then load, augment and stack them.

    A plain picklable object: grain runs it in the worker processes.
    """

    def __init__(self, source: Any, cfg: PipelineConfig, process_index: int,
                 process_count: int, num_positions: int | None):
        self.source = source
        self.cfg = cfg
        self.p = process_index
        self.s = process_count
        self.n = len(source)
        self.n_local = self.n // process_count
        self.epoch_size = self.n_local * process_count
        self.b = cfg.global_batch // process_count
        self.num_positions = num_positions  # local positions in the run; None: unbounded
        self.num_classes = int(source.num_classes)
        self.keys = (grain.MapDataset.range(self.n).shuffle(seed=_shuffle_seed(cfg.seed))
                     if cfg.shuffle else None)
        self.getitems = getattr(source, "__getitems__", None)

    def draws(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Record keys and global stream positions of host batch ``k``."""
        t0 = k * self.b
        t1 = t0 + self.b if self.num_positions is None else min(t0 + self.b, self.num_positions)
        epoch, i = np.divmod(np.arange(t0, t1, dtype=np.int64), self.n_local)
        within = i * self.s + self.p
        if self.keys is None:
            keys = within
        else:
            keys = np.fromiter((self.keys[e * self.n + j] for e, j in zip(epoch, within)),
                               np.int64, len(within))
        return keys, epoch * self.epoch_size + within

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        keys, positions = self.draws(int(k))
        key_list = [int(x) for x in keys]
        records = (self.getitems(key_list) if self.getitems is not None
                   else [self.source[x] for x in key_list])
        if len(records) != len(key_list):
            raise ValueError(f"source.__getitems__ returned {len(records)} records for "
                             f"{len(key_list)} indices")
        size = self.cfg.image_size
        images = np.zeros((len(keys), size, size, 3), np.uint8)
        second = np.zeros_like(images) if self.cfg.views == 2 else None
        labels = np.full((len(keys),), -1, np.int32)
        valid = np.zeros((len(keys),), bool)
        for row, (key, pos, rec) in enumerate(zip(key_list, positions, records)):
            if rec is None:
                continue
            try:
                image = resize(rec["image"], size)
            except ValueError as e:
                raise ValueError(f"record {key}: {e}") from None
            label = int(rec["label"])
            if not 0 <= label < self.num_classes:
                raise ValueError(f"record {key}: label {label} outside [0, {self.num_classes})")
            if second is not None:
                second[row] = self._degrade(self._augment(image, [self.cfg.seed, int(pos), 1]),
                                            [self.cfg.seed, int(pos), 3])
            images[row] = self._degrade(self._augment(image, [self.cfg.seed, int(pos)]),
                                        [self.cfg.seed, int(pos), 2])
            labels[row] = label
            valid[row] = True
        out = {"image": images, "label": labels, "valid": valid,
               "index": keys.astype(np.int32)}
        if second is not None:
            out["image2"] = second
        return out

    def _degrade(self, image: np.ndarray, seed: list[int]) -> np.ndarray:
        if self.cfg.degrade.is_identity:
            return image
        return self.cfg.degrade(image, np.random.default_rng(seed))

    def _augment(self, image: np.ndarray, seed: list[int]) -> np.ndarray:
        if self.cfg.augment.is_identity:
            return image
        return augment(image, self.cfg.augment, np.random.default_rng(seed))


class Loader:
    """An iterable over host batches (see the module docstring); make it with ``make_loader``."""

    def __init__(self, source: Any, cfg: PipelineConfig, process_index: int,
                 process_count: int):
        self.source = source
        self.cfg = cfg
        self.process_index = process_index
        self.process_count = process_count
        self.local_batch = cfg.global_batch // process_count
        self.records_per_epoch = (len(source) // process_count) * process_count
        num_positions = (None if cfg.num_epochs is None
                         else cfg.num_epochs * self.records_per_epoch // process_count)
        self._load = _LoadBatch(source, cfg, process_index, process_count, num_positions)
        if num_positions is None:
            self.num_batches: int | None = None
        elif cfg.drop_remainder:
            self.num_batches = num_positions // self.local_batch
        else:
            self.num_batches = -(-num_positions // self.local_batch)

    @property
    def steps_per_epoch(self) -> float:
        """Global batches per epoch (fractional when the epoch is not a whole number)."""
        return self.records_per_epoch / self.cfg.global_batch

    def fingerprint(self) -> dict[str, Any]:
        """Everything that defines the global batch stream; checked by ``set_state``."""
        out = {"num_records": len(self.source), "records_per_epoch": self.records_per_epoch,
               "global_batch": self.cfg.global_batch, "seed": self.cfg.seed,
               "shuffle": bool(self.cfg.shuffle), "num_epochs": self.cfg.num_epochs,
               "image_size": self.cfg.image_size, "drop_remainder": bool(self.cfg.drop_remainder),
               "augment": self.cfg.augment.fingerprint()}
        if self.cfg.views != 1:  # a one-view state from before views existed still fits
            out["views"] = self.cfg.views
        if not self.cfg.degrade.is_identity:  # likewise
            out["degrade"] = json.loads(json.dumps(dataclasses.asdict(self.cfg.degrade)))
        return out

    def dataset(self, start: int = 0) -> grain.IterDataset:
        """The grain pipeline from host batch ``start`` on."""
        stop = sys.maxsize if self.num_batches is None else self.num_batches
        ds = grain.MapDataset.range(start, max(start, stop)).map(self._load)
        it = ds.to_iter_dataset(grain.ReadOptions(
            num_threads=1, prefetch_buffer_size=self.cfg.worker_buffer_size))
        if self.cfg.worker_count > 0:
            _absl_flags_ready()
            it = it.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self.cfg.worker_count,
                per_worker_buffer_size=self.cfg.worker_buffer_size))
        return it

    def batch(self, k: int) -> dict[str, np.ndarray]:
        """Host batch ``k``, computed here and now (for inspection and tests)."""
        if k < 0 or (self.num_batches is not None and k >= self.num_batches):
            raise IndexError(f"batch {k} out of range for {self.num_batches} batches")
        return self._load(k)

    def __iter__(self) -> LoaderIterator:
        return LoaderIterator(self)

    def __repr__(self) -> str:
        return (f"Loader({type(self.source).__name__}, records={len(self.source)}, "
                f"process={self.process_index}/{self.process_count}, {self.cfg})")


class LoaderIterator:
    """Iterator over host batches with ``get_state`` / ``set_state`` (JSON bytes).

    Call ``close()`` (or use it as a context manager) to stop worker processes.
    """

    def __init__(self, loader: Loader):
        self.loader = loader
        self.next_batch = 0
        self.num_skipped = 0
        self._it = None

    def __iter__(self) -> LoaderIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._it = iter(self.loader.dataset(self.next_batch))
        # Copy out of grain's shared memory: the caller owns plain arrays that
        # may outlive the iterator (a few ms per batch of 512 faces).
        batch = {k: np.array(v) for k, v in next(self._it).items()}
        self.next_batch += 1
        self.num_skipped += int(np.size(batch["valid"]) - np.count_nonzero(batch["valid"]))
        return batch

    def get_state(self) -> bytes:
        """JSON bytes: batches consumed, corrupt records seen, the stream's fingerprint."""
        return json.dumps({"version": _STATE_VERSION, "next_batch": self.next_batch,
                           "num_skipped": self.num_skipped,
                           "fingerprint": self.loader.fingerprint()}).encode()

    def set_state(self, state: bytes | str | dict) -> None:
        """Continues from a ``get_state`` result: the next batch is the one after it."""
        if isinstance(state, (bytes, bytearray)):
            state = state.decode()
        if isinstance(state, str):
            try:
                state = json.loads(state)
            except json.JSONDecodeError as e:
                raise ValueError(f"iterator state is not valid JSON: {e}") from None
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"iterator state must be a dict with version {_STATE_VERSION}, "
                             f"got {str(state)[:200]}")
        for key in ("next_batch", "num_skipped", "fingerprint"):
            if key not in state:
                raise ValueError(f"iterator state lacks the field {key!r}")
        mine, theirs = self.loader.fingerprint(), state["fingerprint"]
        for key in list(mine) + [k for k in theirs if k not in mine]:
            if theirs.get(key) != mine.get(key):
                raise ValueError(f"iterator state does not fit this loader: {key} is "
                                 f"{theirs.get(key)!r} in the state but {mine.get(key)!r} here")
        next_batch = state["next_batch"]
        if not isinstance(next_batch, int) or next_batch < 0:
            raise ValueError(f"iterator state: next_batch must be an integer >= 0, "
                             f"got {next_batch!r}")
        self.close()
        self.next_batch = next_batch
        self.num_skipped = int(state["num_skipped"])

    def close(self) -> None:
        """Stops the grain iterator (and its worker processes); the next ``next`` restarts."""
        if self._it is not None:
            close = getattr(self._it, "close", None)
            if close is not None:
                close()
            self._it = None

    def __enter__(self) -> LoaderIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_source(source: Any) -> None:
    for attr in ("__len__", "__getitem__", "num_classes"):
        if not hasattr(source, attr):
            raise ValueError(f"make_loader: source {type(source).__name__} has no {attr}")
    if len(source) < 1:
        raise ValueError(f"make_loader: source {type(source).__name__} is empty")
    if int(source.num_classes) < 1:
        raise ValueError(f"make_loader: source.num_classes must be >= 1, "
                         f"got {source.num_classes!r}")


def make_loader(source: Any, cfg: PipelineConfig, *, process_index: int = 0,
                process_count: int = 1) -> Loader:
    """The host-local loader of process ``process_index`` of ``process_count``."""
    if not isinstance(cfg, PipelineConfig):
        raise TypeError(f"make_loader: cfg must be a PipelineConfig, got {type(cfg).__name__}")
    cfg.validate()
    _check_source(source)
    if not isinstance(process_count, (int, np.integer)) or process_count < 1:
        raise ValueError(f"make_loader: process_count must be an integer >= 1, "
                         f"got {process_count!r}")
    if not isinstance(process_index, (int, np.integer)) or not 0 <= process_index < process_count:
        raise ValueError(f"make_loader: process_index must be in [0, {process_count}), "
                         f"got {process_index!r}")
    if cfg.global_batch % process_count:
        raise ValueError(f"PipelineConfig.global_batch {cfg.global_batch} is not divisible by "
                         f"process_count {process_count}")
    if len(source) >= 2**31:
        raise ValueError(f"make_loader: {len(source)} records do not fit the int32 'index' "
                         "field of the batches")
    if len(source) < process_count:
        raise ValueError(f"make_loader: {len(source)} records cannot be split over "
                         f"{process_count} processes")
    loader = Loader(source, cfg, int(process_index), int(process_count))
    if loader.num_batches == 0:
        raise ValueError(f"make_loader: {cfg.num_epochs} epoch(s) of "
                         f"{loader.records_per_epoch} records give no full batch of "
                         f"{cfg.global_batch} (set drop_remainder=False or more epochs)")
    return loader


def measure_throughput(source: Any, cfg: PipelineConfig, num_batches: int) -> float:
    """Images per second this host's loader delivers, after one warm-up batch.

    The warm-up absorbs worker start-up; the timed part covers ``num_batches``
    host batches.
    """
    if not isinstance(num_batches, (int, np.integer)) or num_batches < 1:
        raise ValueError(f"measure_throughput: num_batches must be an integer >= 1, "
                         f"got {num_batches!r}")
    loader = make_loader(source, cfg)
    if loader.num_batches is not None and loader.num_batches < num_batches + 1:
        raise ValueError(f"measure_throughput: the loader has {loader.num_batches} batches, "
                         f"{num_batches + 1} needed (warm-up included)")
    with iter(loader) as it:
        next(it)
        start = time.perf_counter()
        images = 0
        for _ in range(num_batches):
            images += len(next(it)["label"])
        elapsed = time.perf_counter() - start
    return images / elapsed
