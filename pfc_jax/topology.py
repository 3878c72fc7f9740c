"""Target devices for the pod-fit check: topology names, memory per device, device lists.

``parse_topology`` turns ``v5p-512`` / ``v5e:16x16`` / ``h100:8x2`` into a
``Target``; ``tpu_devices``, ``gpu_devices`` and ``cpu_devices`` give the
abstract devices a mesh for it is built over.

* TPU: libtpu's compiler builds for a named slice on a host with no TPU.
* GPU: with the CUDA PJRT plugin installed (``pip install 'jax[cuda12]'``)
  XLA:GPU compiles deviceless for a *described* card (``GPU_TARGETS``: the
  device-description fields XLA:GPU reads, from the cards' public
  specifications) in a topology of ``hosts x cards``; JAX must start with
  ``JAX_PLATFORMS=cpu`` so the plugin does not look for a driver. Without the
  plugin, the same step is compiled for as many CPU devices instead: an
  estimate (see ``aot``'s docstring), and the report says so.
"""

from __future__ import annotations

import dataclasses
import math
import os

GIB = 1 << 30
MIB = 1 << 20

# Memory per device. TPU (v4/v5p chips run as one "megacore" device): the HBM
# per chip is 32 GiB (v4), 16 (v5e), 95 (v5p), 32 (v6e); what the XLA TPU
# compiler lets a program use is a little less, and that is the figure used
# (read from its out-of-memory message, libtpu 0.0.42). GPU: the card's
# total memory as nvidia-smi reports it, before JAX's preallocation fraction.
TPU_HBM_GIB = {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0}
TPU_USABLE_HBM_GIB = {"v4": 30.75, "v5e": 15.75, "v5p": 95.74, "v6e": 31.25}
GPU_MEMORY_MIB = {"h100": 81_559, "h200": 143_771, "a100-40g": 40_960, "a100-80g": 81_920}
GPU_LABELS = {"h100": "NVIDIA H100 80GB (SXM)", "h200": "NVIDIA H200 141GB",
              "a100-40g": "NVIDIA A100 40GB", "a100-80g": "NVIDIA A100 80GB"}
JAX_GPU_DEFAULT_FRACTION = 0.75  # JAX preallocates this share of a GPU by default

_TPU_ALIASES = {"v4": "v4", "v5e": "v5e", "v5litepod": "v5e", "v5lite": "v5e", "v5p": "v5p",
                "v5": "v5p", "v6e": "v6e"}
_TPU_DIMS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}
_TPU_LIBTPU_NAME = {"v4": "v4", "v5p": "v5p", "v5e": "v5e", "v6e": "v6e"}
# Cloud TPU "-N" names -> chip grid (N is chips for v5e/v6e, TensorCores for v4/v5p).
_TPU_2D_SHAPES = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8",
                  128: "8x16", 256: "16x16"}
_TPU_3D_SHAPES = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4",
                  128: "4x4x8", 256: "4x8x8", 512: "8x8x8", 1024: "8x8x16",
                  2048: "8x16x16", 4096: "16x16x16"}


# ------------------------------------------------------------------ targets
@dataclasses.dataclass(frozen=True)
class Target:
    """A parsed ``--topology``: what to compile for and how much memory a device has."""

    name: str               # as given
    platform: str           # "tpu" | "gpu"
    kind: str               # v4 | v5e | v5p | v6e | h100 | h200 | a100-40g | a100-80g
    num_devices: int
    num_hosts: int | None   # GPU: hosts given; TPU: from the topology (None until built)
    memory_bytes: int       # per device, before any fraction
    label: str
    libtpu_topology: str | None = None
    num_slices: int = 1

    @property
    def method(self) -> str:
        return "compiled" if self.platform == "tpu" else "estimated"


def parse_topology(name: str, num_slices: int = 1) -> Target:
    """``v5p:4x4x4`` / ``v5e-256`` / ``h100:8x2`` -> Target; ValueError naming the value."""
    text = name.strip().lower()
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    gen, sep, rest = text.partition(":")
    if not sep:
        gen, sep, rest = text.rpartition("-")
        if gen in GPU_MEMORY_MIB or not sep:  # "a100-40g" alone
            gen, rest = text, ""
        elif gen in _TPU_ALIASES:
            kind = _TPU_ALIASES[gen]
            if not rest.isdigit():
                raise ValueError(f"topology {name!r}: expected {gen}-N with N a number")
            n = int(rest)
            chips = n // 2 if _TPU_DIMS[kind] == 3 else n
            shapes = _TPU_3D_SHAPES if _TPU_DIMS[kind] == 3 else _TPU_2D_SHAPES
            if (_TPU_DIMS[kind] == 3 and n % 2) or chips not in shapes:
                raise ValueError(
                    f"topology {name!r}: no standard {kind} slice of that size; give the chip "
                    f"grid instead, e.g. {kind}:{next(iter(shapes.values()))}")
            rest = shapes[chips]
    if gen in _TPU_ALIASES:
        kind = _TPU_ALIASES[gen]
        dims = rest.split("x")
        if len(dims) != _TPU_DIMS[kind] or not all(d.isdigit() and int(d) > 0 for d in dims):
            want = "AxBxC" if _TPU_DIMS[kind] == 3 else "AxB"
            raise ValueError(f"topology {name!r}: a {kind} chip grid is {kind}:{want}")
        chips = math.prod(int(d) for d in dims)
        return Target(name, "tpu", kind, chips * num_slices, None,
                      int(TPU_USABLE_HBM_GIB[kind] * GIB),
                      f"TPU {kind}, {TPU_HBM_GIB[kind]:g} GiB HBM per chip",
                      f"{_TPU_LIBTPU_NAME[kind]}:{rest}", num_slices)
    if gen in GPU_MEMORY_MIB:
        per_host, _, hosts = rest.partition("x") if rest else ("8", "", "1")
        hosts = hosts or "1"
        if not (per_host.isdigit() and hosts.isdigit()) or int(per_host) < 1 or int(hosts) < 1:
            raise ValueError(f"topology {name!r}: a GPU target is {gen}:PER_HOSTxHOSTS, "
                             f"e.g. {gen}:8x2")
        if num_slices != 1:
            raise ValueError(f"topology {name!r}: num_slices is for TPU targets; give hosts "
                             "as PER_HOSTxHOSTS")
        n = int(per_host) * int(hosts)
        return Target(name, "gpu", gen, n, int(hosts), GPU_MEMORY_MIB[gen] * MIB,
                      GPU_LABELS[gen])
    known = sorted(set(_TPU_ALIASES) | set(GPU_MEMORY_MIB))
    raise ValueError(f"topology {name!r}: unknown device {gen!r}; known: {', '.join(known)}")


def tpu_devices(target: Target):
    """Abstract (compile-only) TPU devices for the target; needs libtpu."""
    # Compile-only use: no TPU to find, no lock on one to take.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            f"compiling for {target.name} needs libtpu, which is not installed: "
            "pip install 'jax[tpu]' (the version matching jax)") from e
    kwargs = {"num_slices": target.num_slices} if target.num_slices > 1 else {}
    if _TPU_DIMS[target.kind] == 3:  # v4/v5p: both TensorCores of a chip as one device
        kwargs["chip_config_name"] = "megacore"
    topo = topologies.get_topology_desc(topology_name=target.libtpu_topology, platform="tpu",
                                        **kwargs)
    return list(topo.devices)


def cpu_devices(n: int):
    import jax
    devices = jax.devices("cpu")
    if len(devices) < n:
        raise RuntimeError(
            f"the estimate compiles for {n} CPU devices, this process has {len(devices)}; "
            "run `python -m pfc_jax.aot` (it sets jax_num_cpu_devices) or set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX starts")
    return devices[:n]


# XLA:GPU's device description for deviceless compiles (GpuTargetConfigProto
# text). Public figures: SM count, shared memory, L2, bandwidth, clock, compute
# capability; device_memory_size is the card's memory as nvidia-smi shows it.
def _gpu_target(sm: tuple[int, int], cores: int, smem_core: int, smem_optin: int, l2: int,
                bandwidth: float, clock: float, fpus: int, memory_mib: int, name: str) -> str:
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {smem_core}
  threads_per_core_limit: 2048
  core_count: {cores}
  fpus_per_core: {fpus}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(bandwidth)}
  l2_cache_size: {l2}
  clock_rate_ghz: {clock}
  device_memory_size: {memory_mib * MIB}
  shared_memory_per_block_optin: {smem_optin}
  cuda_compute_capability {{ major: {sm[0]} minor: {sm[1]} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 patch: 0 }}
device_description_str: "{name}"
"""


GPU_TARGETS = {
    "h100": _gpu_target((9, 0), 132, 233472, 232448, 50 * MIB, 3.35e12, 1.98, 128,
                        GPU_MEMORY_MIB["h100"], "NVIDIA H100 80GB HBM3"),
    "h200": _gpu_target((9, 0), 132, 233472, 232448, 50 * MIB, 4.8e12, 1.98, 128,
                        GPU_MEMORY_MIB["h200"], "NVIDIA H200"),
    "a100-40g": _gpu_target((8, 0), 108, 167936, 166912, 40 * MIB, 1.555e12, 1.41, 64,
                            GPU_MEMORY_MIB["a100-40g"], "NVIDIA A100-SXM4-40GB"),
    "a100-80g": _gpu_target((8, 0), 108, 167936, 166912, 40 * MIB, 2.039e12, 1.41, 64,
                            GPU_MEMORY_MIB["a100-80g"], "NVIDIA A100-SXM4-80GB"),
}


def cuda_plugin_available() -> bool:
    try:
        import jax_plugins.xla_cuda12  # noqa: F401
    except ImportError:
        return False
    return True


def gpu_devices(target: Target):
    """Abstract CUDA devices of ``hosts x cards`` described cards (needs the CUDA plugin)."""
    from jax.experimental import topologies
    if not cuda_plugin_available():
        raise RuntimeError(
            f"compiling for {target.name} needs the CUDA PJRT plugin: pip install "
            "'jax[cuda12]' (the version matching jax); without it the check estimates")
    per_host = target.num_devices // target.num_hosts
    topo = topologies.get_topology_desc(platform="cuda", target_config=GPU_TARGETS[target.kind],
                                        topology=f"1x{target.num_hosts}x{per_host}")
    return list(topo.devices)


def devices_for(target: Target):
    """The devices a check compiles for: TPU or CUDA abstract devices, else CPU (estimate)."""
    if target.platform == "tpu":
        return tpu_devices(target)
    if cuda_plugin_available():
        return gpu_devices(target)
    return cpu_devices(target.num_devices)
