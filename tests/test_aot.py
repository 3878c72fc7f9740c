"""The pod-fit check (pfc_jax.aot): TPU compiles, the CPU estimate for GPUs, the CLI, the search.

The TPU tests compile the real train step for a 2x2 v5e slice on this host
and need libtpu (skipped without it); the others use the emulated CPU
devices and run everywhere.
"""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

from pfc_jax import aot, topology
from pfc_jax.config import load_recipe

# conftest turns the persistent compilation cache on; JAX writes a TPU
# compile-only executable to it but cannot read one back (it warns and
# compiles again), which is no concern of these tests.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Error reading persistent compilation cache entry:UserWarning")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30


def tiny(**overrides):
    """configs/tiny_cpu.py:test (K = 1, D = 128, SGD with momentum), with overrides."""
    return load_recipe(os.path.join(ROOT, "configs", "tiny_cpu.py"), "test", overrides)


def hand_table_bytes(padded_rows, k, d, shards, row_leaves):
    """rows x K x D x 4 bytes, split over the shards: (table, head optimizer state)."""
    per = padded_rows * k * d * 4 // shards
    return per, per * row_leaves


def needs_libtpu():
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed: the TPU compile needs it "
                    "(pip install 'jax[tpu]' matching the installed jax)")


# ------------------------------------------------------------------ parsing
def test_topologies_parse_to_devices_hosts_and_memory():
    t = aot.parse_topology("v5p-128")
    assert (t.platform, t.kind, t.num_devices, t.libtpu_topology) == ("tpu", "v5p", 64,
                                                                      "v5p:4x4x4")
    assert t.memory_bytes == int(95.74 * GIB)  # what the TPU compiler lets a program use
    t = aot.parse_topology("v5e-256")
    assert (t.num_devices, t.libtpu_topology) == (256, "v5e:16x16")
    assert t.memory_bytes == int(15.75 * GIB)
    assert aot.parse_topology("v4:2x2x1").num_devices == 4
    assert aot.parse_topology("v5e:2x2", num_slices=2).num_devices == 8
    t = aot.parse_topology("h100:8x2")
    assert (t.platform, t.num_devices, t.num_hosts, t.memory_bytes) == (
        "gpu", 16, 2, 81_559 * 2**20)
    assert (aot.parse_topology("h200:8").num_devices, aot.parse_topology("h200:8").num_hosts) \
        == (8, 1)
    assert aot.parse_topology("a100-40g:4x1").memory_bytes == 40_960 * 2**20


@pytest.mark.parametrize("name, words", [
    ("v5e:4x4x4", "v5e:AxB"), ("tpu9:2x2", "unknown device 'tpu9'"),
    ("v5e-12", "no standard v5e slice"), ("h100:8xq", "h100:PER_HOSTxHOSTS")])
def test_bad_topologies_name_the_value(name, words):
    with pytest.raises(ValueError) as e:
        aot.parse_topology(name)
    assert repr(name) in str(e.value) and words in str(e.value)


def test_compiler_oom_message_is_read_in_gib():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
           "temporaries (16.54G) exceeds available HBM (15.75G).")
    assert aot.parse_oom(msg) == (int(16.54 * GIB), int(15.75 * GIB))


# ------------------------------------------------------------------ CPU estimate (no libtpu)
@pytest.mark.parametrize("optimizer, k, classes, padded, row_leaves", [
    ("sgd", 1, 1000, 1000, 1),     # momentum: one trace shaped like the table
    ("adamw", 3, 1001, 1004, 2),   # mu and nu; 1001 classes pad to 4 x 251 rows
])
def test_estimate_reports_the_table_share_and_the_peak(optimizer, k, classes, padded,
                                                       row_leaves):
    config = tiny(**{"optimizer.name": optimizer, "head.num_subcenters": k})
    r = aot.check(config, "h100:4", devices=jax.devices()[:4], num_classes=classes)
    table, opt = hand_table_bytes(padded, k, 128, 4, row_leaves)
    assert (r.table, r.head_optimizer) == (table, opt)
    assert r.padded_classes == padded and r.method == "estimated" and r.num_hosts == 1
    assert r.peak == r.arguments + r.outputs + r.temporaries - r.aliased
    assert r.arguments >= r.table + r.head_optimizer + r.backbone
    # Usable GPU memory: JAX's default 75 % of the card unless told otherwise.
    assert r.device_memory == int(0.75 * 81_559 * 2**20) and r.fits


def test_search_returns_a_compiled_fit_just_below_the_boundary():
    config = tiny()
    devices = jax.devices()[:4]
    first = aot.check(config, "h100:4", devices=devices)
    memory = first.peak + 4 * 2**20  # room for a few thousand more classes
    first = dataclasses.replace(first, device_memory=memory, fits=True)

    def measure(n):
        return aot.check(config, "h100:4", devices=devices, num_classes=n,
                         device_memory_bytes=memory)

    cap = aot.largest_classes(measure, first, max_compiles=5)
    assert cap.max_classes is not None and cap.max_classes > 1000
    (best_peak,) = [p for c, p, ok in cap.points if c == cap.max_classes and ok]
    assert best_peak <= memory
    assert all(p > memory for c, p, ok in cap.points if c > cap.max_classes)
    above = measure(int(cap.max_classes * 1.05))  # a point the search did not compile
    assert not above.fits and above.over_by == above.peak - memory > 0


def test_search_stops_at_the_int32_label_limit():
    """A device that holds billions of classes: the search never asks for more
    than int32 labels can name, and says so."""
    per_class = 16  # bytes per class per device, 1 TiB of memory: ~68B classes fit
    memory = 2**40

    def report(n):
        return aot.Report(topology="fake", platform="tpu", device="fake", method="compiled",
                          num_devices=1, num_hosts=1, global_batch=8, per_device_batch=8,
                          num_classes=n, padded_classes=n, table_shape=(n, 1, 4),
                          head_shards=1, num_sampled=8, device_memory=memory,
                          table=per_class * n // 2, head_optimizer=per_class * n // 2,
                          backbone=0, peak=per_class * n + 2**20, fits=True)

    asked = []

    def measure(n):
        asked.append(n)
        return report(n)

    cap = aot.largest_classes(measure, report(1_000_000_000), max_compiles=4)
    assert asked and max(asked) <= 2**31 - 1
    assert cap.max_classes == 2_140_000_000 and "int32" in cap.note


def test_cli_does_not_fit_exits_1_and_says_by_how_much(tmp_path):
    out = tmp_path / "fit.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pfc_jax.aot", "--config", "configs/tiny_cpu.py:test",
         "--topology", "h100:4", "--device-memory-gib", "0.01", "--nosearch",
         "--config.head.num_classes=4000", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    d = json.loads(out.read_text())
    memory = int(0.01 * GIB)
    assert d["device_memory"] == memory and d["fits"] is False
    assert d["over_by"] == d["peak"] - memory > 0
    assert d["num_classes"] == 4000 and d["method"] == "estimated"
    assert "ESTIMATED" in proc.stdout
    assert f"over by {d['over_by'] / GIB:.3f} GiB ({d['over_by']:,} bytes)" in proc.stdout


def test_estimate_needs_as_many_cpu_devices_as_gpus(monkeypatch):
    monkeypatch.setattr(topology, "cuda_plugin_available", lambda: False)
    with pytest.raises(RuntimeError, match="16 CPU devices, this process has 8"):
        aot.check(tiny(), "h100:8x2")


def test_every_gpu_kind_has_a_device_description_with_its_memory():
    for kind, mib in aot.GPU_MEMORY_MIB.items():
        text = aot.GPU_TARGETS[kind]
        assert f"device_memory_size: {mib * 2**20}\n" in text, kind
        assert 'platform_name: "CUDA"' in text and "cuda_compute_capability" in text


def test_without_the_cuda_plugin_a_gpu_target_is_estimated(monkeypatch):
    monkeypatch.setattr(topology, "cuda_plugin_available", lambda: False)
    target = aot.parse_topology("h100:4x2")
    devices = aot.devices_for(target)
    assert [d.platform for d in devices] == ["cpu"] * 8
    with pytest.raises(RuntimeError, match="CUDA PJRT plugin"):
        aot.gpu_devices(target)


def test_gpu_compile_without_a_gpu_is_compiled_not_estimated():
    """XLA:GPU builds the step for described cards; needs the CUDA plugin
    (pip install 'jax[cuda12]') and JAX_PLATFORMS=cpu, skipped without it."""
    if not aot.cuda_plugin_available():
        pytest.skip("the CUDA PJRT plugin is not installed (pip install 'jax[cuda12]')")
    r = aot.check(tiny(**{"model.name": "convnet_tiny"}), "h100:4x2", num_classes=1000)
    assert r.method == "compiled" and r.platform == "gpu" and r.num_hosts == 2
    table, opt = hand_table_bytes(r.padded_classes, 1, 128, 8, 1)
    assert (r.table, r.head_optimizer) == (table, opt)
    assert r.arguments >= table + opt and r.aliased >= table + opt  # updated in place
    assert 0 < r.peak < r.device_memory


# ------------------------------------------------------------------ TPU (libtpu)
@pytest.fixture(scope="module")
def v5e_report():
    needs_libtpu()
    return aot.check(tiny(**{"model.name": "convnet_tiny"}), "v5e:2x2", num_classes=1000)


def test_tpu_compile_reports_memory_and_the_table_share(v5e_report):
    r = v5e_report
    assert r.method == "compiled" and r.platform == "tpu" and r.num_devices == 4
    table, opt = hand_table_bytes(1000, 1, 128, 4, 1)
    assert (r.table, r.head_optimizer) == (table, opt)
    assert r.peak == r.arguments + r.outputs + r.temporaries - r.aliased
    assert r.arguments >= r.table + r.head_optimizer + r.backbone
    assert r.generated_code > 0 and r.device_memory == int(15.75 * GIB) and r.fits


def test_tpu_compiler_refuses_a_table_too_large_and_says_by_how_much():
    needs_libtpu()
    # 150M classes x 128 x 4 B over 4 chips is 17.9 GiB of table per chip alone.
    r = aot.check(tiny(**{"model.name": "convnet_tiny"}), "v5e:2x2", num_classes=150_000_000)
    assert r.fits is False and "RESOURCE_EXHAUSTED" in r.compiler_refused
    table, _ = hand_table_bytes(150_000_000, 1, 128, 4, 1)
    assert r.peak > table > r.device_memory  # required, as the compiler counts it
    assert r.device_memory == int(15.75 * GIB)  # the compiler's usable HBM of a v5e
    text = aot.format_report(r)
    assert f"over by {(r.peak - r.device_memory) / GIB:.3f} GiB" in text


def test_tpu_full_softmax_head_updates_the_table_in_place():
    """r = 1 compiled by the TPU compiler: the fused blockwise step needs a small
    fraction of the table beyond it, today's whole-logits step several tables."""
    needs_libtpu()
    import jax.numpy as jnp
    import optax
    from pfc_jax import mesh as mesh_lib
    from pfc_jax import partial_fc as pf
    devices = aot.tpu_devices(aot.parse_topology("v5e:2x2"))
    mesh = mesh_lib.make_mesh({"data": 4}, devices)
    sh = mesh_lib.batch_sharding(mesh)
    x = jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=sh)
    y = jax.ShapeDtypeStruct((64,), jnp.int32, sharding=sh)
    temps = {}
    for softmax in ("blockwise", "full"):
        head = pf.PartialFC(pf.HeadConfig(num_classes=1 << 18, embedding_dim=128,
                                          softmax=softmax, logits_budget_mib=1.0,
                                          cosine_stash_mib=0.0),
                            mesh, optax.sgd(0.1, momentum=0.9))
        assert head._slices_rows(head.num_sampled(64))  # every class sampled, on TPU
        state = jax.eval_shape(head.init, jax.random.key(0))
        m = head._step.lower(state, x, y, jax.random.key(1)).compile().memory_analysis()
        temps[softmax] = m.temp_size_in_bytes
    table = (1 << 18) * 128 * 4 // 4  # per device
    assert temps["blockwise"] <= 0.1 * table, temps
    assert temps["full"] >= table, temps
