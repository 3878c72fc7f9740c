#!/usr/bin/env python
"""Head-step benchmark on the emulated CPU mesh: time, memory, FLOP/s, side by side.

    .venv/bin/python bench/head.py            # the full table (about 10 minutes)
    .venv/bin/python bench/head.py --quick    # small class counts only

Each configuration runs in its own process (so peak RSS is its own) on
``--devices`` emulated CPU devices and prints one row; the summary prints the
ratios the goals are stated in:

* r = 0.1 vs r = 1 (full softmax) step time and per-device temporary memory;
* lazy vs dense head update;
* the step's achieved FLOP/s vs the same three matmuls alone (forward logits,
  embedding gradient, centre gradient) on the same mesh and shapes;
* ``select`` (bisection) vs ``topk`` sampling;
* bytes per sampled row: XLA's ``bytes accessed`` of the compiled step (one
  device's program) over the rows it samples, beside the floor (read each
  row and its momentum once, write both once, plus the matmul operands: the
  group's embeddings read by the three matmuls and their gradient written),
  and the step's achieved bandwidth against this machine's, measured in the
  same child by a streaming read+write over the mesh. XLA counts a loop's
  body once (``xla_cost``): a count marked ``*`` comes from a program with
  loops of several trips (the blocks, the sampler's bisection) and is low by
  up to their trip counts. The row with ``block = Ns`` (one block, at r = 1
  no sampler loop) is the exact count of the same step;
* the roofline time: the floor bytes at the measured bandwidth or the
  matmul FLOPs at the bare-matmul rate, whichever is longer, and the step's
  fraction of it (on this CPU the step is compute-bound from B of about 32
  at D = 512: 6 B D FLOPs per row against its 8 KiB floor);
* with ``--reference-dir`` pointing at an ``arcface_torch`` checkout and
  ``--vs-reference``, that project's own PartialFC_V2 + SGD at C = 1M,
  r = 0.1, B = 128 and 512, beside pfc_jax on the mesh and on one device;
* with PyTorch installed, a re-implementation of the reference's head in
  plain PyTorch (sampled logits, margin, CE, backward, dense SGD on the full
  table), timed in the same run on the same machine. It is not arcface_torch
  itself and runs slower than it (2.85 vs 2.43 s at 1M classes, B = 128, in
  one measurement), so ratios against it overstate the gain.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from xla_cost import cost as xla_cost
from xla_cost import median_seconds

HERE = os.path.dirname(os.path.abspath(__file__))
GIB = 2**30


def child(cfg: dict) -> dict:
    sys.path.insert(0, os.path.dirname(HERE))
    from pfc_jax import platform
    platform.use_cpu(cfg["devices"])  # before JAX starts
    import resource

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import PartitionSpec as P

    from pfc_jax import mesh as mesh_lib
    from pfc_jax import partial_fc as pf

    C, B, D, r = cfg["classes"], cfg["batch"], cfg["dim"], cfg["rate"]
    mesh = mesh_lib.make_mesh()
    budget = {"logits_budget_mib": cfg["budget_mib"]} if "budget_mib" in cfg else {}
    if cfg.get("one_block"):  # every sampled column in one block: no block loop
        budget["block_size"] = C  # the plan clamps it to Ns
    head_cfg = pf.HeadConfig(num_classes=C, embedding_dim=D, sample_rate=r,
                             row_update=cfg["update"], sampler=cfg["sampler"],
                             matmul_dtype=cfg.get("matmul", "float32"),
                             softmax=cfg.get("softmax", "auto"),
                             fused_update=cfg.get("fused", True), **budget)
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
    head = pf.PartialFC(head_cfg, mesh, tx)
    state = head.init(jax.random.key(0))
    jax.block_until_ready(state)
    rng = np.random.default_rng(0)
    x, y = head.shard_batch(rng.normal(size=(B, D)).astype(np.float32),
                            rng.integers(0, C, B).astype(np.int32))
    key = jax.random.key(1)

    t0 = time.perf_counter()
    compiled = head._step.lower(state, x, y, key).compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    rss_ready = _rss_gib()

    calls = [0]

    def one_step():
        nonlocal state
        calls[0] += 1
        state, g, stats = compiled(state, x, y, jax.random.fold_in(key, calls[0]))
        jax.block_until_ready((state, g))

    step_s = median_seconds(one_step, cfg["steps"])
    plan, block = head.softmax_plan(B)
    # Table and its optimizer rows, all devices together (what the head must hold).
    state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    del state
    rss_steps = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    extra = dict(softmax_plan=plan, block=block, fused=head.fuses_update(B),
                 state_gib=state_bytes / GIB, rss_steps_gib=rss_steps)
    if not cfg.get("bare", True):  # the big rows: no room for a second copy of the shapes
        return dict(cfg, **extra, ns=head.num_sampled(B), step_s=step_s, compile_s=compile_s,
                    arg_gib=ma.argument_size_in_bytes / GIB, temp_gib=ma.temp_size_in_bytes / GIB,
                    out_gib=ma.output_size_in_bytes / GIB, alias_gib=ma.alias_size_in_bytes / GIB,
                    rss_ready_gib=rss_ready, rss_peak_gib=rss_steps)

    # Bare matmuls with the step's shapes, split the same way over the mesh.
    ns = head.num_sampled(B)
    n_cols = ns * head_cfg.num_subcenters
    mm_dtype = jnp.dtype(head_cfg.matmul_dtype)

    def bare(xf, w, g):
        logits = jnp.dot(xf.astype(mm_dtype), w.astype(mm_dtype).T,
                         preferred_element_type=jnp.float32)
        dx = jnp.dot(g.astype(mm_dtype), w.astype(mm_dtype), preferred_element_type=jnp.float32)
        dw = jnp.dot(g.astype(mm_dtype).T, xf.astype(mm_dtype),
                     preferred_element_type=jnp.float32)
        return logits.sum() + jax.lax.psum(dx, mesh.axis_names).sum() + dw.sum()

    axes = mesh.axis_names
    bare_fn = jax.jit(jax.shard_map(bare, mesh=mesh, in_specs=(P(), P(axes), P(None, axes)),
                                    out_specs=P(), check_vma=False))
    n_dev = mesh.size
    xf = jnp.asarray(rng.normal(size=(B, D)).astype(np.float32))
    w = jax.device_put(rng.normal(size=(n_dev * n_cols, D)).astype(np.float32),
                       mesh_lib.table_sharding(mesh, axes))
    g = jax.device_put(rng.normal(size=(B, n_dev * n_cols)).astype(np.float32),
                       jax.sharding.NamedSharding(mesh, P(None, axes)))
    bare_s = median_seconds(lambda: jax.block_until_ready(bare_fn(xf, w, g)), cfg["steps"])
    flops = 6.0 * B * n_dev * n_cols * D

    table_bytes = 4 * head.padded_classes * head_cfg.num_subcenters * D // n_dev
    # Bytes: XLA's count for one device's program (loop bodies once); the floor
    # per sampled row.
    counted = xla_cost(compiled)
    bytes_dev = counted["bytes"] or 0.0
    group_batch = B * head.num_shards // n_dev
    row = 4 * head_cfg.num_subcenters * D
    floor_dev = 4 * row * ns + 4 * (3 + 1) * group_batch * D  # rows + momentum r/w; operands
    # This machine's streaming bandwidth over the same mesh (read + write).
    big = jax.device_put(np.ones((n_dev, 2**25 // n_dev), np.float32),
                         mesh_lib.table_sharding(mesh, axes))
    stream = jax.jit(lambda a: a * 1.0001)
    stream_s = median_seconds(lambda: jax.block_until_ready(stream(big)), 5)
    bw = 2 * big.nbytes / stream_s
    return dict(cfg, **extra, ns=ns, step_s=step_s, compile_s=compile_s, bare_s=bare_s,
                bytes_per_row=bytes_dev / ns, floor_per_row=floor_dev / ns,
                bytes_exact=counted["exact"], loops=counted["loops"],
                step_gbs=bytes_dev * n_dev / step_s / 1e9, machine_gbs=bw / 1e9,
                gflops_step=flops / step_s / 1e9, gflops_bare=flops / bare_s / 1e9,
                arg_gib=ma.argument_size_in_bytes / GIB, out_gib=ma.output_size_in_bytes / GIB,
                alias_gib=ma.alias_size_in_bytes / GIB, temp_gib=ma.temp_size_in_bytes / GIB,
                table_gib=table_bytes / GIB,
                rss_ready_gib=rss_ready,
                rss_peak_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def torch_child(cfg: dict) -> dict:
    """The reference's head in plain PyTorch: sampled logits, ArcFace, CE, dense SGD."""
    import math

    import torch

    torch.manual_seed(0)
    C, B, D, r = cfg["classes"], cfg["batch"], cfg["dim"], cfg["rate"]
    weight = torch.nn.Parameter(torch.normal(0, 0.01, (C, D)))
    opt = torch.optim.SGD([weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(B, D, requires_grad=True)
    y = torch.randint(0, C, (B,))
    n_sample = int(r * C)
    s, m2 = 64.0, 0.5

    def step():
        with torch.no_grad():
            keys = torch.rand(C)
            keys[y] = 2.0
            idx = torch.topk(keys, k=n_sample)[1].sort()[0]
            remap = torch.full((C,), -1, dtype=torch.long)
            remap[idx] = torch.arange(n_sample)
            target = remap[y]
        w = torch.nn.functional.normalize(weight[idx])  # dense grad into the full table
        logits = torch.nn.functional.normalize(x) @ w.t()
        logits = logits.clamp(-1, 1)
        with torch.no_grad():
            t = logits[torch.arange(B), target]
            phi = torch.cos(torch.arccos(t) + m2)
        logits = logits.clone()
        logits[torch.arange(B), target] = phi  # margin under no_grad (parity mode)
        loss = torch.nn.functional.cross_entropy(s * logits, target)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        return float(loss)

    del math
    return dict(cfg, step_s=median_seconds(step, cfg["steps"]),
                torch_threads=torch.get_num_threads())


def reference_child(cfg: dict) -> dict:
    """``arcface_torch``'s own PartialFC_V2 + CombinedMarginLoss + SGD, from a local checkout.

    The checkout is imported unmodified; it calls ``.cuda()`` on its tensors,
    which becomes the identity here (CPU), and it needs torch.distributed,
    started as a one-process gloo group.
    """
    import socket

    import torch
    from torch import distributed

    sys.path.insert(0, cfg["reference_dir"])
    torch.Tensor.cuda = lambda self, *a, **k: self  # CPU: the checkout's .cuda() calls
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                   rank=0, world_size=1)
    from losses import CombinedMarginLoss
    from partial_fc_v2 import PartialFC_V2

    torch.manual_seed(0)
    C, B, D, r = cfg["classes"], cfg["batch"], cfg["dim"], cfg["rate"]
    head = PartialFC_V2(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), D, C, r, False)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(B, D, requires_grad=True)
    y = torch.randint(0, C, (B,))

    def step():
        loss = head(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return float(loss)

    step_s = median_seconds(step, cfg["steps"])
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    distributed.destroy_process_group()
    return dict(cfg, step_s=step_s, rss_peak_gib=peak, torch_threads=torch.get_num_threads())


def run(cfg: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)],
                         capture_output=True, text=True)
    if out.returncode < 0:
        return dict(cfg, error=f"killed by signal {-out.returncode} (out of memory?)")
    if out.returncode:
        return dict(cfg, error=(out.stderr.strip().splitlines() or ["?"])[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _roof_s(res: dict) -> float:
    """The step's roofline time on this machine: its floor bytes at the measured
    streaming bandwidth or its matmul FLOPs at the bare-matmul rate, whichever
    is longer (the bare rate stands in for the machine's attainable FLOP/s)."""
    floor_bytes = res["floor_per_row"] * res["ns"] * res["devices"]
    flops = res["gflops_step"] * 1e9 * res["step_s"]
    return max(floor_bytes / (res["machine_gbs"] * 1e9), flops / (res["gflops_bare"] * 1e9))


def _plan(res: dict) -> str:
    plan = res.get("softmax_plan", "?")
    if plan == "blockwise":
        return f"blk{res['block']}" + ("+f" if res.get("fused") else "")
    return plan


def full_softmax_rows(base: dict) -> None:
    """r = 1 at C = 1M and 2M: peak memory against the table and its optimizer state."""
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"D={base['dim']}, B=128, r=1, SGD momentum + weight decay")
    print(f"{'classes':>9} {'devices':>7} {'softmax':>11} {'step s':>8} {'temp GiB/dev':>12} "
          f"{'table+state GiB':>15} {'RSS peak GiB':>12} {'peak / (table+state)':>20}")
    rows = []
    for C in (1_000_000, 2_000_000):
        for n in sorted({base["devices"], 1}, reverse=True):
            rows.append(dict(base, devices=n, classes=C, batch=128, rate=1.0, steps=2, bare=False))
            if C == 1_000_000:  # today's whole logits, for comparison (2M does not fit)
                rows.append(dict(rows[-1], softmax="full", fused=False))
    for cfg in rows:
        res = run(cfg)
        label = "whole" if cfg.get("softmax") == "full" else "auto"
        if "error" in res:
            print(f"{cfg['classes']:>9} {cfg['devices']:>7} {label:>11} failed: {res['error']}",
                  flush=True)
            continue
        print(f"{res['classes']:>9} {res['devices']:>7} {_plan(res):>11} {res['step_s']:>8.2f} "
              f"{res['temp_gib']:>12.3f} {res['state_gib']:>15.2f} {res['rss_peak_gib']:>12.2f} "
              f"{res['rss_peak_gib'] / res['state_gib']:>20.3f}", flush=True)


def reference_rows(base: dict, reference_dir: str) -> None:
    """The reference's own head against pfc_jax, one process each, in one run."""
    if not os.path.isfile(os.path.join(reference_dir, "partial_fc_v2.py")):
        sys.exit(f"--reference-dir {reference_dir}: no partial_fc_v2.py there")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"D={base['dim']}, C=1,000,000, r=0.1, SGD momentum 0.9 + weight decay 5e-4")
    print(f"{'B':>4} {'ref s':>7} {'ref RSS':>8} "
          + " ".join(f"{f'{n} dev s':>9} {'RSS':>5} {'speed':>6} {'mem':>5}"
                     for n in sorted({base['devices'], 1}, reverse=True)))
    for b in (128, 512):
        ref = run(dict(impl="reference", reference_dir=os.path.abspath(reference_dir),
                       classes=1_000_000, batch=b, rate=0.1, dim=base["dim"], steps=3))
        if "error" in ref:
            print(f"{b:>4} reference failed: {ref['error']}", flush=True)
            continue
        line = f"{b:>4} {ref['step_s']:>7.3f} {ref['rss_peak_gib']:>8.2f}"
        for n in sorted({base["devices"], 1}, reverse=True):
            res = run(dict(base, devices=n, classes=1_000_000, batch=b, rate=0.1, steps=4,
                           bare=False))
            if "error" in res:
                line += f" failed: {res['error']}"
                continue
            line += (f" {res['step_s']:>9.3f} {res['rss_peak_gib']:>5.2f} "
                     f"{ref['step_s'] / res['step_s']:>5.2f}x "
                     f"{res['rss_peak_gib'] / ref['rss_peak_gib']:>5.2f}")
        print(line, flush=True)
    print("speed: reference s / pfc_jax s (goal >= 5); mem: pfc_jax / reference peak RSS "
          "(goal <= 0.6)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="small class counts only")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--reference-dir", metavar="DIR",
                    help="a local arcface_torch checkout (the folder holding "
                         "partial_fc_v2.py): time its own PartialFC_V2 side by side")
    ap.add_argument("--vs-reference", action="store_true",
                    help="only the rows of the comparison with --reference-dir: C = 1M, "
                         "r = 0.1, B = 128 and 512, on --devices and on 1 device")
    ap.add_argument("--full-softmax", action="store_true",
                    help="only the full-softmax memory rows: C = 1M and 2M at r = 1 on "
                         "--devices and on 1 device, today's whole logits beside blockwise")
    args = ap.parse_args()
    if args.child:
        cfg = json.loads(args.child)
        fn = {"torch": torch_child, "reference": reference_child}.get(cfg.get("impl"), child)
        print(json.dumps(fn(cfg)))
        return

    base = dict(devices=args.devices, dim=args.dim, update="lazy", sampler="select")
    if args.full_softmax:
        return full_softmax_rows(base)
    if args.vs_reference:
        if not args.reference_dir:
            ap.error("--vs-reference needs --reference-dir")
        return reference_rows(base, args.reference_dir)
    big = [10_000, 100_000] if args.quick else [100_000, 1_000_000]
    rows = []
    for C in big:
        steps = 3 if C <= 100_000 else 2
        rows.append(dict(base, classes=C, batch=128, rate=1.0, steps=steps))
        rows.append(dict(base, classes=C, batch=128, rate=0.1, steps=steps + 2))
    C = big[-1]
    # Today's whole [B, Ns] logits and gathered rows at r = 1, beside the automatic plan.
    rows.append(dict(base, classes=C, batch=128, rate=1.0, softmax="full", fused=False, steps=2))
    # The fused step in one block: the same work with no loop, so XLA's count is exact.
    rows.append(dict(base, classes=C, batch=128, rate=1.0, one_block=True, steps=2))
    # Same Ns as the smaller class count at r = 0.1: temporaries must not grow with C.
    rows.append(dict(base, classes=C, batch=128, rate=0.1 * big[0] / C, steps=4))
    rows.append(dict(base, classes=C, batch=128, rate=0.1, update="dense", steps=3))
    rows.append(dict(base, classes=C, batch=128, rate=0.1, sampler="topk", steps=4))
    rows.append(dict(base, classes=C, batch=512, rate=0.1, steps=3))
    rows.append(dict(base, classes=C, batch=512, rate=0.1, update="dense", steps=3))
    torch_rows = []
    if not args.no_torch:
        try:
            import torch  # noqa: F401
            torch_rows = [dict(impl="torch", classes=C, batch=b, rate=0.1, dim=args.dim,
                               steps=3) for b in (128, 512)]
        except ImportError:
            print("(PyTorch not installed: no side-by-side reference column)")

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{args.devices} emulated CPU devices; D={args.dim}")
    hdr = (f"{'classes':>9} {'B':>4} {'r':>5} {'update':>6} {'sampler':>7} {'softmax':>9} "
           f"{'Ns/dev':>7} "
           f"{'step s':>8} {'GF/s':>7} {'bare GF/s':>9} {'eff':>5} {'temp GiB':>8} "
           f"{'args GiB':>8} {'table GiB':>9} {'RSS pk GiB':>10} {'B/row':>7} {'floor':>6} "
           f"{'x floor':>7} {'GB/s':>6} {'of bw':>6} {'roof s':>7} {'of roof':>7}")
    print(hdr)
    results = []
    for cfg in rows:
        res = run(cfg)
        results.append(res)
        if "error" in res:
            print(f"{cfg['classes']:>9} {cfg['batch']:>4} {cfg['rate']:>4} failed: {res['error']}")
            continue
        print(f"{res['classes']:>9} {res['batch']:>4} {res['rate']:>5.3g} {res['update']:>6} "
              f"{res['sampler']:>7} {_plan(res):>9} {res['ns']:>7} {res['step_s']:>8.3f} "
              f"{res['gflops_step']:>7.1f} {res['gflops_bare']:>9.1f} "
              f"{res['gflops_step'] / res['gflops_bare']:>5.2f} {res['temp_gib']:>8.3f} "
              f"{res['arg_gib']:>8.3f} {res['table_gib']:>9.3f} {res['rss_peak_gib']:>10.2f} "
              f"{res['bytes_per_row']:>6.0f}{' ' if res['bytes_exact'] else '*'} "
              f"{res['floor_per_row']:>6.0f} "
              f"{res['bytes_per_row'] / res['floor_per_row']:>7.2f} {res['step_gbs']:>6.1f} "
              f"{res['step_gbs'] / res['machine_gbs']:>6.0%} {_roof_s(res):>7.3f} "
              f"{_roof_s(res) / res['step_s']:>7.0%}",
              flush=True)
    for cfg in torch_rows:
        res = run(cfg)
        results.append(res)
        if "error" in res:
            print(f"torch B={cfg['batch']}: failed: {res['error']}")
        else:
            print(f"torch re-implementation of the reference head  C={res['classes']} B={res['batch']} r={res['rate']}: "
                  f"{res['step_s']:.3f} s/step ({res['torch_threads']} threads)", flush=True)

    def find(**kw):
        for res in results:
            if "error" not in res and all(res.get(k) == v for k, v in kw.items()):
                return res
        return None

    print("* bytes counted with loop bodies once (loops of several trips in the program): "
          "a lower bound, not the step's count")
    print("\nratios")
    C = big[-1]
    full = find(classes=C, batch=128, rate=1.0, softmax=None, one_block=None)
    one = find(classes=C, batch=128, rate=1.0, one_block=True)
    if one:
        print(f"  C={C} r=1, one block (exact count): {one['bytes_per_row'] / one['floor_per_row']:.2f}x "
              f"the floor per row (goal <= 2), step {one['step_s']:.3f} s"
              + (f" vs {full['step_s']:.3f} s in blocks of {full['block']}" if full else ""))
    part = find(classes=C, batch=128, rate=0.1, update="lazy", sampler="select")
    whole = find(classes=C, batch=128, rate=1.0, softmax="full")
    if full and whole:
        print(f"  C={C} r=1: blockwise+fused / whole-logits step time {full['step_s'] / whole['step_s']:6.2f}x, "
              f"temporaries {full['temp_gib'] / whole['temp_gib']:6.3f}x, "
              f"peak RSS {full['rss_peak_gib']:.2f} vs {whole['rss_peak_gib']:.2f} GiB "
              f"(table + state {full['state_gib']:.2f} GiB)")
    if full and part:
        print(f"  C={C}: r=0.1 vs r=1 speed-up            {full['step_s'] / part['step_s']:6.2f}x"
              "  (goal >= 4)")
        print(f"  C={C}: r=0.1 / r=1 temporary memory     "
              f"{part['temp_gib'] / full['temp_gib']:6.3f}   (goal <= 0.25)")
    small = find(classes=big[0], batch=128, rate=0.1)
    same_ns = find(classes=C, batch=128, rate=0.1 * big[0] / C)
    if small and same_ns:
        print(f"  same Ns, C={big[0]} -> C={C}: temporary memory "
              f"{same_ns['temp_gib'] / small['temp_gib']:6.2f}x  (O(C) only in table + state)")
    dense = find(classes=C, batch=128, rate=0.1, update="dense")
    if dense and part:
        print(f"  C={C}: dense / lazy update step time    {dense['step_s'] / part['step_s']:6.2f}x")
    if part:
        print(f"  C={C}: step FLOP/s / bare matmul FLOP/s {part['gflops_step'] / part['gflops_bare']:6.2f}"
              "   (goal >= 0.7)")
    topk = find(classes=C, batch=128, rate=0.1, sampler="topk")
    if topk and part:
        print(f"  C={C}: topk / select sampler step time  {topk['step_s'] / part['step_s']:6.2f}x")
    for b in (128, 512):
        ref = find(impl="torch", classes=C, batch=b)
        ours = find(classes=C, batch=b, rate=0.1, update="lazy", sampler="select", impl=None)
        ours_dense = find(classes=C, batch=b, rate=0.1, update="dense")
        if ref and ours:
            line = f"  C={C} B={b}: torch reference / pfc_jax lazy {ref['step_s'] / ours['step_s']:6.2f}x"
            if ours_dense:
                line += f", / pfc_jax dense {ref['step_s'] / ours_dense['step_s']:.2f}x"
            print(line + "  (goal >= 3)")


if __name__ == "__main__":
    main()
