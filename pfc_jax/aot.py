"""Pod-fit check: compile the real train step for a TPU or GPU topology, here.

    python -m pfc_jax.aot --config configs/webface.py:42m_r100 --topology v5p:4x4x4
    python -m pfc_jax.aot --config configs/ms1mv3.py:r50 --topology v5e-256 \
        --per_device_batch=128 --config.head.num_classes=29000000 --json fit.json
    python -m pfc_jax.aot --config configs/ms1mv3.py:r50 --topology h100:8x2

builds ``train.Trainer`` for the target's devices without allocating an
array, lowers and compiles ``trainer.train_step`` against the abstract state
and an abstract batch, and prints the per-device memory: arguments, outputs,
temporaries, generated code, the peak (arguments + outputs + temporaries -
aliased), and the share of the arguments that is the class table and the
head's optimizer state. It compares the peak with the device's memory, exits
with status 1 and says by how much when it does not fit, and (``--search``,
on by default) finds the largest class count that fits.

Targets (``--topology``):

- TPU, compiled: ``v4:2x2x1``, ``v5e:16x16``, ``v5p:4x4x4``, ``v6e:8x8`` (chip
  grid) or ``v5e-256``, ``v5p-128``, ``v4-128``, ``v6e-64`` (Cloud TPU names:
  chips for v5e/v6e, TensorCores = 2 x chips for v4/v5p). Needs ``libtpu``
  (``pip install 'jax[tpu]'``); the XLA TPU compiler runs on this host for
  abstract devices (``jax.experimental.topologies``) and refuses a program
  that does not fit the chip's HBM, whose message gives the sizes.
  ``--num_slices`` compiles for several slices joined over the data-centre
  network.
- GPU: ``h100:8x2`` (8 cards per host x 2 hosts), ``h200:8``,
  ``a100-40g:8x4``, ``a100-80g:8``. With the CUDA PJRT plugin installed
  (``pip install 'jax[cuda12]'``, several GB) the XLA GPU compiler builds the
  step deviceless for described cards (``pfc_jax.topology.GPU_TARGETS``), as
  for TPUs: ``compiled``. Without it, the step is compiled for as many CPU
  devices as the target has: arguments, outputs and aliasing are those of the
  real step (same shapes, same shardings); the temporaries are XLA:CPU's
  schedule of the same program, a stand-in for activations and the head's
  buffers (XLA:GPU fuses differently). The output says ``estimated``. The
  card's usable memory is its size times ``--gpu_memory_fraction`` (default:
  the ``XLA_PYTHON_CLIENT_MEM_FRACTION`` in the environment, else JAX's 0.75).

``--device_memory_gib`` replaces the device's memory (what-if, and tests).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import sys
import time

# Re-exported: the topology names and device lists live in pfc_jax.topology.
from pfc_jax.topology import (  # noqa: F401
    GIB, GPU_LABELS, GPU_MEMORY_MIB, GPU_TARGETS, JAX_GPU_DEFAULT_FRACTION, MIB,
    TPU_HBM_GIB, TPU_USABLE_HBM_GIB, Target, cpu_devices, cuda_plugin_available,
    devices_for, gpu_devices, parse_topology, tpu_devices)


# ------------------------------------------------------------------ reports
@dataclasses.dataclass
class Report:
    """Per-device numbers of one compile (bytes), and what they were compared with."""

    topology: str
    platform: str
    device: str
    method: str                 # "compiled" | "estimated"
    num_devices: int
    num_hosts: int
    global_batch: int
    per_device_batch: int
    num_classes: int
    padded_classes: int
    table_shape: tuple
    head_shards: int
    num_sampled: int            # classes per shard per step
    device_memory: int          # what the peak is compared with
    arguments: int | None = None
    outputs: int | None = None
    temporaries: int | None = None
    aliased: int | None = None
    generated_code: int | None = None
    peak: int | None = None     # arguments + outputs + temporaries - aliased
    xla_peak: int | None = None  # the compiler's own peak figure, where it gives one
    table: int = 0              # class table, per device
    head_optimizer: int = 0     # table-shaped head optimizer leaves, per device
    backbone: int = 0           # backbone params + BN statistics + optimizer state
    fits: bool | None = None
    compiler_refused: str | None = None   # the compiler's out-of-memory message
    compile_seconds: float = 0.0
    notes: list = dataclasses.field(default_factory=list)

    @property
    def over_by(self) -> int:
        return max(0, (self.peak or 0) - self.device_memory)


def _sum_shard_bytes(tree) -> int:
    import jax
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def head_shares(trainer) -> tuple[int, int]:
    """(table, table-shaped head optimizer leaves) bytes per device, from the abstract state."""
    import jax
    head = trainer.abstract_state.head
    table_shape = tuple(trainer.head.table_shape)
    opt = [leaf for leaf in jax.tree.leaves(head.opt_state) if tuple(leaf.shape) == table_shape]
    return _sum_shard_bytes(head.centers), _sum_shard_bytes(opt)


_OOM = re.compile(r"RESOURCE_EXHAUSTED", re.I)
_SIZE = r"([0-9.]+)\s*([KMGT]?)i?B?"
_REQ = re.compile(r"(?:required[^(]*|used\s*)\(?\s*" + _SIZE, re.I)
_AVAIL = re.compile(r"available HBM\s*\(\s*" + _SIZE + r"\s*\)|of\s+" + _SIZE + r"\s+hbm", re.I)
_UNIT = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_oom(message: str) -> tuple[int | None, int | None]:
    """(required, available) bytes from an XLA out-of-memory message (GiB-based units)."""
    def size(m, i=0):
        return int(float(m.group(1 + i)) * _UNIT[m.group(2 + i).upper()]) if m else None
    req = _REQ.search(message)
    avail = _AVAIL.search(message)
    a = None
    if avail:
        a = size(avail) if avail.group(1) else size(avail, 2)
    return size(req), a


# ------------------------------------------------------------------ the check
def _prepared_config(config, num_devices: int, per_device_batch: int | None,
                     num_classes: int | None):
    from pfc_jax import config as config_lib
    c = copy.deepcopy(config)
    with c.unlocked():
        if per_device_batch is not None:
            if per_device_batch < 1:
                raise ValueError(f"per_device_batch must be >= 1, got {per_device_batch}")
            c.batch_size = per_device_batch * num_devices
        if num_classes is not None:
            c.head.num_classes = int(num_classes)
        check = copy.deepcopy(c)
        if not check.data.path:  # no data is read: the check needs shapes only
            check.data.path = "(aot: not read)"
        config_lib.validate(check, num_devices)
    return c


def _abstract_batch(trainer):
    import jax
    import jax.numpy as jnp
    from pfc_jax import mesh as mesh_lib
    from pfc_jax.models import INPUT_SHAPE
    b = trainer.config.batch_size
    sh = mesh_lib.batch_sharding(trainer.mesh)
    return {"image": jax.ShapeDtypeStruct((b, *INPUT_SHAPE), jnp.uint8, sharding=sh),
            "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sh),
            "valid": jax.ShapeDtypeStruct((b,), jnp.bool_, sharding=sh)}


def _method(target: Target, devices) -> str:
    """``compiled`` for TPU and CUDA devices; ``estimated`` for a GPU target on CPU devices."""
    if target.platform == "gpu" and devices[0].platform == "cpu":
        return "estimated"
    return "compiled"


def check(config, target: Target | str, *, devices=None, device_memory_bytes: int | None = None,
          gpu_memory_fraction: float | None = None, per_device_batch: int | None = None,
          num_classes: int | None = None) -> Report:
    """Compiles the train step of ``config`` for ``target``; returns its per-device Report.

    ``devices`` (default: the target's abstract TPU devices, or as many CPU
    devices for a GPU estimate) is the device list the mesh is built over.
    A TPU program the compiler refuses for lack of HBM gives a Report with
    ``fits=False`` and the compiler's required and available sizes.
    """
    import jax
    from pfc_jax import mesh as mesh_lib
    from pfc_jax import train

    if isinstance(target, str):
        target = parse_topology(target)
    if devices is None:
        devices = devices_for(target)
    if len(devices) != target.num_devices:
        raise ValueError(f"{target.name} has {target.num_devices} devices, got {len(devices)}")
    notes = []
    if device_memory_bytes is not None:
        if device_memory_bytes <= 0:
            raise ValueError(f"device memory must be > 0 bytes, got {device_memory_bytes}")
        memory = int(device_memory_bytes)
        notes.append("device memory overridden")
    elif target.platform == "gpu":
        fraction = gpu_memory_fraction
        if fraction is None:
            fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION",
                                            JAX_GPU_DEFAULT_FRACTION))
        if not 0 < fraction <= 1:
            raise ValueError(f"gpu memory fraction must be in (0, 1], got {fraction}")
        memory = int(target.memory_bytes * fraction)
        notes.append(f"usable GPU memory = {fraction:g} x {target.memory_bytes / GIB:.1f} GiB "
                     "(XLA_PYTHON_CLIENT_MEM_FRACTION)")
    else:
        memory = target.memory_bytes

    config = _prepared_config(config, target.num_devices, per_device_batch, num_classes)
    mesh = mesh_lib.make_mesh(dict(config.mesh), devices)
    trainer = train.Trainer(config, mesh)
    hosts = target.num_hosts or len({d.process_index for d in devices})
    table, head_opt = head_shares(trainer)
    s = trainer.abstract_state
    backbone = _sum_shard_bytes((s.params, s.batch_stats, s.opt_state))
    report = Report(
        topology=target.name, platform=target.platform, device=target.label,
        method=_method(target, devices), num_devices=target.num_devices, num_hosts=hosts,
        global_batch=config.batch_size, per_device_batch=config.batch_size // target.num_devices,
        num_classes=int(config.head.num_classes), padded_classes=trainer.head.padded_classes,
        table_shape=tuple(trainer.head.table_shape), head_shards=trainer.head.num_shards,
        num_sampled=trainer.head.num_sampled(config.batch_size), device_memory=memory,
        table=table, head_optimizer=head_opt, backbone=backbone, notes=notes)

    t0 = time.time()
    lowered = trainer.train_step.lower(trainer.abstract_state, _abstract_batch(trainer))
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if not _OOM.search(str(e)):
            raise
        report.compile_seconds = time.time() - t0
        required, available = parse_oom(str(e))
        report.compiler_refused = str(e).strip().splitlines()[0]
        report.fits = False
        report.peak = required
        if available and device_memory_bytes is None:
            report.device_memory = available
        return report
    report.compile_seconds = time.time() - t0
    m = compiled.memory_analysis()
    report.arguments = int(m.argument_size_in_bytes)
    report.outputs = int(m.output_size_in_bytes)
    report.temporaries = int(m.temp_size_in_bytes)
    report.aliased = int(m.alias_size_in_bytes)
    report.generated_code = int(m.generated_code_size_in_bytes)
    report.peak = report.arguments + report.outputs + report.temporaries - report.aliased
    xla_peak = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
    if target.platform == "tpu" and xla_peak:
        report.xla_peak = xla_peak
    report.fits = report.peak <= report.device_memory
    return report


# ------------------------------------------------------------------ largest class count
@dataclasses.dataclass
class Capacity:
    max_classes: int | None      # largest class count compiled and found to fit
    predicted: int | None        # where the last two points' line crosses the memory
    points: list                 # [(num_classes, peak bytes, fits)] in compile order
    note: str = ""


def _floor_sig(x: float, digits: int = 3) -> int:
    if x < 1:
        return 0
    p = 10 ** max(0, int(math.floor(math.log10(x))) - digits + 1)
    return int(x // p * p)


def _crossing(points, memory: int) -> int | None:
    """Where peak(C) is expected to reach ``memory``, from the compiled points.

    The line through the two largest fitting points when there are two (the
    local slope: a refused TPU compile reports what the compiler needed
    before giving up, which sits above the line the fitting points are on),
    else the line through the nearest fitting and failing points, else
    through the two newest points.
    """
    known = sorted((c, p, ok) for c, p, ok in points if p is not None)
    fit = [q for q in known if q[2]]
    fail = [q for q in known if not q[2]]
    if len(fit) >= 2:
        pair = fit[-2:]
    elif fit and fail and fit[-1][0] < fail[0][0]:
        pair = [fit[-1], fail[0]]
    else:
        pair = known[-2:]
    if len(pair) < 2 or pair[1][1] == pair[0][1] or pair[1][0] == pair[0][0]:
        return None
    (c0, p0, _), (c1, p1, _) = pair
    if p1 < p0:  # noise: no usable slope
        return None
    return int(c0 + (memory - p0) * (c1 - c0) / (p1 - p0))


def largest_classes(measure, first: Report, *, max_compiles: int = 4,
                    tolerance: float = 0.01, known: list | None = None) -> Capacity:
    """Largest ``num_classes`` whose step fits, by compiling along a line of peak(C).

    ``measure(C) -> Report`` compiles at C. The per-device peak grows
    piecewise linearly with C (table and optimizer rows, the sampled rows and
    the logits ``[B, Ns]``, ``Ns = clamp(r * C / P, min(B, C / P), C / P)``).
    From a single point the first step uses the slope of the table share
    alone, a lower bound, so it brackets the boundary; after that (and from
    several known points) the line of ``_crossing``. Candidates are rounded
    down to three significant digits, every one is compiled, and only a compiled fit is
    reported; it stops when the line's crossing rounds down to the best fit
    found, when fit and failure are within ``tolerance``, or after
    ``max_compiles`` compiles. ``known``: Reports (or ``(C, peak, fits)``)
    already compiled for the same config and device memory.
    """
    from pfc_jax.partial_fc import MAX_CLASSES  # int32 labels and row ids
    memory = first.device_memory
    points = [(first.num_classes, first.peak, bool(first.fits))]
    points += [tuple(r) if isinstance(r, (tuple, list)) else (r.num_classes, r.peak,
                                                             bool(r.fits)) for r in known or ()]
    points = list({c: (c, p, ok) for c, p, ok in reversed(points)}.values())[::-1]
    per_class = (first.table + first.head_optimizer) / max(1, first.padded_classes)
    fits = [ok for *_, ok in points]
    if (any(fits) and not all(fits)) or sum(fits) >= 2:
        target = _crossing(points, memory)
    else:  # start from the point nearest the boundary
        c0, p0, ok = (max if points[0][2] else min)(points, key=lambda q: q[0])
        target = c0 + (memory - (p0 or 0)) / max(per_class, 1e-9)
    note = ""
    for _ in range(max_compiles):
        best = max((c for c, _, ok in points if ok), default=None)
        worst = min((c for c, _, ok in points if not ok), default=None)
        if best is not None and worst is not None and worst <= best * (1 + tolerance):
            break
        c = _floor_sig(target) if target is not None else 0
        if best is not None and c <= best:
            break  # the crossing lies within rounding of the best fit
        if worst is not None and c >= worst:
            c = _floor_sig((best + worst) / 2 if best is not None else worst / 2)
        if best is not None and c <= best:
            break
        if c < 1:
            note = "even one class does not fit: the backbone and the batch alone exceed it"
            break
        if c > MAX_CLASSES:
            if best is not None and best >= _floor_sig(MAX_CLASSES):
                note = f"fits up to the int32 label limit ({MAX_CLASSES:,} classes)"
                break
            c = _floor_sig(MAX_CLASSES)
            note = f"capped at the int32 label limit ({MAX_CLASSES:,} classes)"
        r = measure(c)
        points.append((c, r.peak, bool(r.fits)))
        target = _crossing(points, memory)
    return Capacity(max((c for c, _, ok in points if ok), default=None),
                    _crossing(points, memory), points, note)


# ------------------------------------------------------------------ output
def _gib(x: int | None) -> str:
    if x is None:
        return "-"
    return f"{x / GIB:9.3f} GiB" if abs(x) >= GIB / 8 else f"{x / MIB:9.2f} MiB"


def format_report(r: Report, capacity: Capacity | None = None, config_name: str = "") -> str:
    lines = [f"pod-fit check: {config_name or 'config'} on {r.topology} "
             f"({r.device}, {r.num_devices} devices, {r.num_hosts} hosts)"]
    if r.method == "compiled":
        compiler = "XLA TPU compiler" if r.platform == "tpu" else (
            "XLA GPU compiler (CUDA plugin, described cards, no GPU attached)")
        lines.append(f"method: compiled for the target by the {compiler} on this host "
                     f"({r.compile_seconds:.0f} s)")
    else:
        lines.append(
            "method: ESTIMATED - the same step compiled for "
            f"{r.num_devices} CPU devices ({r.compile_seconds:.0f} s): arguments, outputs and "
            "aliasing as on the GPUs, temporaries as XLA:CPU schedules them")
    lines.append(f"batch: {r.global_batch} global, {r.per_device_batch} per device; "
                 f"classes {r.num_classes:,} (padded {r.padded_classes:,}), table "
                 f"{list(r.table_shape)} over {r.head_shards} shards, {r.num_sampled:,} "
                 "sampled per shard per step")
    lines.append("per-device memory:")
    if r.compiler_refused:
        lines.append(f"  the compiler refused the program: {r.compiler_refused}")
        lines.append(f"  required        {_gib(r.peak)}")
    else:
        lines += [f"  arguments       {_gib(r.arguments)}",
                  f"  outputs         {_gib(r.outputs)}",
                  f"  temporaries     {_gib(r.temporaries)}",
                  f"  aliased         {_gib(r.aliased)}  (outputs written over donated inputs)",
                  f"  generated code  {_gib(r.generated_code)}",
                  f"  peak            {_gib(r.peak)}  (arguments + outputs + temporaries - "
                  "aliased)"]
        if r.xla_peak:
            lines.append(f"  compiler's peak {_gib(r.xla_peak)}  (its own live-range figure)")
    lines.append(f"  of the arguments: class table {_gib(r.table).strip()}, head optimizer "
                 f"state {_gib(r.head_optimizer).strip()}, backbone + its optimizer "
                 f"{_gib(r.backbone).strip()}")
    lines.append(f"device memory: {_gib(r.device_memory).strip()}"
                 + (f" ({'; '.join(r.notes)})" if r.notes else ""))
    if r.fits:
        lines.append(f"FITS: {(r.device_memory - r.peak) / GIB:.3f} GiB to spare per device")
    elif r.peak is None:
        lines.append("DOES NOT FIT: the compiler refused the program (its message is above)")
    else:
        lines.append(f"DOES NOT FIT: needs {r.peak / GIB:.3f} GiB per device, "
                     f"{r.device_memory / GIB:.3f} GiB available: over by "
                     f"{r.over_by / GIB:.3f} GiB ({r.over_by:,} bytes)")
    if capacity is not None:
        pts = ", ".join(f"{c:,}: {'-' if p is None else f'{p / GIB:.2f}'} GiB "
                        f"{'fits' if ok else 'no'}" for c, p, ok in capacity.points)
        if capacity.max_classes:
            lines.append(f"largest class count that fits: {capacity.max_classes:,} (compiled; "
                         f"the line through the last two points crosses at "
                         f"{capacity.predicted or 0:,})")
        else:
            lines.append("largest class count that fits: none found"
                         + (f" ({capacity.note})" if capacity.note else ""))
        lines.append(f"  compiles ({r.method}): {pts}")
    return "\n".join(lines)


def to_json(r: Report, capacity: Capacity | None = None, config_name: str = "") -> dict:
    d = dataclasses.asdict(r)
    d["table_shape"] = list(r.table_shape)
    d["config"] = config_name
    d["over_by"] = r.over_by
    if capacity is not None:
        d["max_classes"] = capacity.max_classes
        d["max_classes_predicted"] = capacity.predicted
        d["search_points"] = [list(p) for p in capacity.points]
        d["search_note"] = capacity.note
    return d


# ------------------------------------------------------------------ CLI
def _define_flags():
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "a configs/*.py recipe (file[:arg])",
                                    lock_config=True)
    flags.DEFINE_string("topology", None, "v5p:4x4x4, v5e-256, h100:8x2, ... (see module doc)")
    flags.DEFINE_integer("num_slices", 1, "TPU slices joined over the data-centre network")
    flags.DEFINE_integer("per_device_batch", None,
                         "sets batch_size = this x devices (default: the config's batch_size)")
    flags.DEFINE_float("device_memory_gib", None, "replace the device's memory (GiB)")
    flags.DEFINE_float("gpu_memory_fraction", None,
                       "usable share of a GPU's memory (default: XLA_PYTHON_CLIENT_MEM_FRACTION "
                       "or 0.75)")
    flags.DEFINE_bool("search", True, "find the largest class count that fits")
    flags.DEFINE_integer("search_compiles", 4, "at most this many extra compiles for --search")
    flags.DEFINE_string("json", None, "write the numbers to this JSON file")
    for name in ("num_slices", "per_device_batch", "device_memory_gib", "gpu_memory_fraction",
                 "search_compiles"):
        flags.DEFINE_alias(name.replace("_", "-"), name)
    flags.mark_flags_as_required(["config", "topology"])


def _config_name(argv) -> str:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return ""


def main(argv):
    del argv
    from absl import flags
    f = flags.FLAGS
    try:
        target = parse_topology(f.topology, f.num_slices)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pfc_jax import platform
    if target.platform == "gpu":  # before the CPU backend starts
        platform.use_cpu(max(target.num_devices, 1))
    memory = None if f.device_memory_gib is None else int(f.device_memory_gib * GIB)
    name = _config_name(sys.argv)
    kw = dict(device_memory_bytes=memory, gpu_memory_fraction=f.gpu_memory_fraction,
              per_device_batch=f.per_device_batch)
    try:
        devices = devices_for(target)
        report = check(f.config, target, devices=devices, **kw)
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    capacity = None
    if f.search:
        capacity = largest_classes(
            lambda c: check(f.config, target, devices=devices, num_classes=c, **kw),
            report, max_compiles=f.search_compiles)
    print(format_report(report, capacity, name))
    if f.json:
        with open(f.json, "w") as fh:
            json.dump(to_json(report, capacity, name), fh, indent=2)
    return 0 if report.fits else 1


def run():
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # targets are abstract; compile on this host
    from absl import app
    _define_flags()
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run()
