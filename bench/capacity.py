#!/usr/bin/env python
"""Capacity table: per-device peak memory of the real train step, and the largest class count.

    .venv/bin/python bench/capacity.py                      # the grid below; resumes
    .venv/bin/python bench/capacity.py --only r50 --print   # markdown from what is done

For every (backbone, topology, class count) it runs the pod-fit check
(``pfc_jax.aot.check``): the ms1mv3 recipe's backbone with D = 512,
r = 0.1, 128 images per device, compiled for the TPU topology by the XLA
TPU compiler on this host (needs libtpu), for GPUs by the XLA GPU compiler
for described cards when the CUDA plugin is installed (run with
``JAX_PLATFORMS=cpu``), else estimated from the same step compiled for as
many CPU devices. Then ``pfc_jax.aot.largest_classes``
finds the largest class count that fits each (backbone, topology), seeded
with the grid's compiles. Each result is appended to ``--out`` (JSON lines)
as soon as it is known, so an interrupted run resumes where it stopped; the
markdown table is printed from that file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GIB = 2**30
BACKBONES = ("r50", "r100")
TOPOLOGIES = ("v5e-256", "v5p-128", "v5p-512", "h100:8x1", "h100:8x4", "h100:8x16")
CLASSES = (2_000_000, 10_000_000, 29_000_000, 100_000_000, 1_000_000_000)
PER_DEVICE_BATCH = 128
SAMPLE_RATE = 0.1
GPU_FRACTION = 0.9


def recipe(backbone: str):
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import ms1mv3
    c = ms1mv3.get_config(backbone)
    c.model.embedding_dim = 512
    c.head.sample_rate = SAMPLE_RATE
    return c


def load(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run(args) -> None:
    from pfc_jax import aot
    most = max(aot.parse_topology(t).num_devices for t in args.topologies
               if aot.parse_topology(t).platform == "gpu") if any(
        aot.parse_topology(t).platform == "gpu" for t in args.topologies) else 1
    from pfc_jax import platform
    platform.use_cpu(most)
    done = load(args.out)
    have = {(d["backbone"], d["topology"], d.get("num_classes"), d["kind"]) for d in done}
    for backbone in args.backbones:
        config = recipe(backbone)
        for topo in args.topologies:
            target = aot.parse_topology(topo)
            devices = aot.devices_for(target)  # CUDA devices when the plugin is installed
            kw = dict(devices=devices, per_device_batch=PER_DEVICE_BATCH,
                      gpu_memory_fraction=GPU_FRACTION)
            reports = []
            for n in args.classes:
                key = (backbone, topo, n, "grid")
                if key in have:
                    prev = next(d for d in done if (d["backbone"], d["topology"],
                                                    d.get("num_classes"), d["kind"]) == key)
                    reports.append(report_of(prev))
                    continue
                t0 = time.time()
                r = aot.check(config, target, num_classes=n, **kw)
                reports.append(r)
                row = dict(aot.to_json(r), backbone_bytes=r.backbone, backbone=backbone,
                           kind="grid", wall_seconds=time.time() - t0)
                _append(args.out, row)
                print(f"{backbone} {topo} {n:>11,}: peak "
                      f"{(r.peak or 0) / GIB:7.2f} GiB of {r.device_memory / GIB:.2f} "
                      f"{'fits' if r.fits else 'NO'} ({row['wall_seconds']:.0f} s)", flush=True)
            key = (backbone, topo, None, "capacity")
            if args.no_search or (key in have and not args.redo_search):
                continue
            earlier = [tuple(p) for d in done if d["kind"] == "capacity" and
                       (d["backbone"], d["topology"]) == (backbone, topo) for p in d["points"]]
            t0 = time.time()
            cap = aot.largest_classes(
                lambda n: aot.check(config, target, num_classes=n, **kw), reports[0],
                known=reports[1:] + earlier, max_compiles=args.search_compiles)
            _append(args.out, dict(backbone=backbone, topology=topo, num_classes=None,
                                   kind="capacity", max_classes=cap.max_classes,
                                   predicted=cap.predicted, points=cap.points, note=cap.note,
                                   method=reports[0].method, wall_seconds=time.time() - t0))
            print(f"{backbone} {topo}: largest fitting {cap.max_classes} "
                  f"(line: {cap.predicted}) ({time.time() - t0:.0f} s)", flush=True)


def report_of(row: dict):
    """The aot.Report of a grid row (its ``backbone`` is the model name there)."""
    from pfc_jax import aot
    fields = {k: row[k] for k in row if k in aot.Report.__dataclass_fields__}
    fields["backbone"] = row.get("backbone_bytes", 0)
    return aot.Report(**fields)


def _append(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _line_limit(points: list, memory: float) -> float | None:
    """Largest C on the piecewise-linear peak(C) through ``points`` with peak <= memory."""
    pts = sorted((c, p) for c, p in points if p is not None)
    best = None
    for (c0, p0), (c1, p1) in zip(pts, pts[1:]):
        if p0 <= memory < p1:
            return c0 + (memory - p0) * (c1 - c0) / (p1 - p0)
        if p1 <= memory:
            best = c1
    return best


def derived(rows: list[dict], reference: str = "r50") -> dict:
    """Peaks of a backbone at class counts compiled only for ``reference``.

    The class-dependent memory (table, optimizer rows, sampled rows, logits)
    does not depend on the backbone, and the backbone's (weights, optimizer,
    activations) does not depend on the class count, so
    ``peak_bb(C) = peak_ref(C) + [peak_bb(C0) - peak_ref(C0)]`` from one
    compile of ``bb`` at a C0 that ``reference`` also has.
    Returns {(bb, topology, C): peak} and {(bb, topology): largest C}.
    """
    grid = {(d["backbone"], d["topology"], d["num_classes"]): d for d in rows
            if d["kind"] == "grid" and d["peak"] is not None}
    ref_points = {}
    for d in rows:
        if d["backbone"] == reference:
            pts = ref_points.setdefault(d["topology"], {})
            if d["kind"] == "grid" and d["peak"] is not None:
                pts[d["num_classes"]] = d["peak"]
            elif d["kind"] == "capacity":
                pts.update({c: p for c, p, _ in d["points"] if p is not None})
    peaks, largest = {}, {}
    for (bb, topo, c0), d in grid.items():
        if bb == reference or c0 not in ref_points.get(topo, {}):
            continue
        delta = d["peak"] - ref_points[topo][c0]
        for c, p in ref_points[topo].items():
            peaks.setdefault((bb, topo, c), p + delta)
        limit = _line_limit(list(ref_points[topo].items()), d["device_memory"] - delta)
        if limit:
            largest[(bb, topo)] = int(limit)
    return {"peaks": peaks, "largest": largest}


def markdown(rows: list[dict], classes=CLASSES) -> str:
    grid = {(d["backbone"], d["topology"], d["num_classes"]): d for d in rows
            if d["kind"] == "grid"}
    caps = {(d["backbone"], d["topology"]): d for d in rows if d["kind"] == "capacity"}
    der = derived(rows)
    combos = sorted({(d["backbone"], d["topology"]) for d in rows},
                    key=lambda k: (BACKBONES.index(k[0]) if k[0] in BACKBONES else 9,
                                   TOPOLOGIES.index(k[1]) if k[1] in TOPOLOGIES else 9))
    head = ["backbone", "topology", "devices (hosts)", "method"] + [
        f"{n / 1e6:g}M" for n in classes] + ["largest that fits", "device memory"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for bb, topo in combos:
        cells, any_row = [], None
        for n in classes:
            d = grid.get((bb, topo, n))
            if d is None:
                p = der["peaks"].get((bb, topo, n))
                cells.append("not run" if p is None else f"{p / GIB:.1f} GiB (derived)")
                continue
            any_row = d
            peak = d["peak"] / GIB if d["peak"] is not None else float("nan")
            cells.append(f"{peak:.1f} GiB {'fits' if d['fits'] else '**no**'}")
        if any_row is None:
            continue
        mem = any_row["device_memory"]
        for i, n in enumerate(classes):
            p = der["peaks"].get((bb, topo, n))
            if cells[i].endswith("(derived)"):
                cells[i] = f"{p / GIB:.1f} GiB {'fits' if p <= mem else '**no**'} (derived)"
        cap = caps.get((bb, topo))
        if cap is not None:
            largest = f"{cap['max_classes'] / 1e6:.1f}M" if cap["max_classes"] else "none"
        elif (bb, topo) in der["largest"]:
            largest = f"~{der['largest'][(bb, topo)] / 1e6:.0f}M (derived)"
            checks = [d for (b, t, n), d in grid.items()
                      if (b, t) == (bb, topo) and n not in classes and d["peak"] is not None]
            for d in checks:  # compiles made to check the derived limit
                largest += (f"; compiled at {d['num_classes'] / 1e6:g}M: "
                            f"{d['peak'] / GIB:.1f} GiB {'fits' if d['fits'] else 'no'}")
        else:
            largest = "not run"
        method = any_row["method"] + (" + derived" if any("(derived)" in c for c in cells)
                                      else "")
        out.append("| " + " | ".join(
            [bb, topo, f"{any_row['num_devices']} ({any_row['num_hosts']})",
             method] + cells + [largest, f"{mem / GIB:.2f} GiB"]) + " |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(HERE, "capacity.jsonl"))
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    p.add_argument("--topologies", nargs="+", default=list(TOPOLOGIES))
    p.add_argument("--classes", nargs="+", type=int, default=list(CLASSES))
    p.add_argument("--search_compiles", type=int, default=3)
    p.add_argument("--no_search", action="store_true")
    p.add_argument("--redo_search", action="store_true",
                   help="search again, seeded with the earlier search's compiles")
    p.add_argument("--print", action="store_true", help="only print the table from --out")
    args = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if not args.print:
        run(args)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}; per-device batch {PER_DEVICE_BATCH}, "
          f"D = 512, r = {SAMPLE_RATE}, GPU usable memory {GPU_FRACTION:g} x card\n")
    print(markdown(load(args.out), args.classes))


if __name__ == "__main__":
    main()
