"""Which JAX platforms a pfc_jax process starts; called before JAX's backends start.

With the ``tpu`` extra installed (libtpu, for the pod-fit check's TPU
compiles), JAX tries the TPU backend in every process, and on a host with no
TPU libtpu prints initialisation errors before the first line of the run's
own output. ``choose()`` (every pfc_jax command calls it first) starts only
the platforms this host has hardware for when the user named none: the CPU,
plus CUDA or ROCm where such a card and JAX's plugin for it are present. A
TPU host, or a user who set ``JAX_PLATFORMS`` / ``jax_platforms``, is left
as it is. The pod-fit check loads libtpu for its compiles by itself
(``topology.tpu_devices``), whatever this chose.

``use_cpu(n)`` is the set-up of the demo, the benches and the tests: ``n``
emulated CPU devices and no other platform.
"""

from __future__ import annotations

import glob
import importlib.util
import os

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips (and only those, on a TPU VM)


def tpu_attached() -> bool:
    """Whether a TPU chip is on this host's PCI bus (as JAX's own check looks)."""
    for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(path) as f:
                if f.read().strip().lower() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return bool(glob.glob("/dev/accel[0-9]*"))


def _has_module(*names: str) -> bool:
    for name in names:
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except (ImportError, ValueError):
            continue
    return False


def present_platforms() -> list[str]:
    """The platforms this host has hardware and a JAX plugin for, CPU last."""
    out = []
    if glob.glob("/dev/nvidia[0-9]*") and _has_module(
            "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12",
            "jax_plugins.xla_cuda13"):
        out.append("cuda")
    if os.path.exists("/dev/kfd") and _has_module(
            "jax_rocm60_plugin", "jax_rocm7_plugin", "jax_plugins.xla_rocm60",
            "jax_plugins.xla_rocm7"):
        out.append("rocm")
    return [*out, "cpu"]


def _user_chose(jax) -> bool:
    return bool(os.environ.get("JAX_PLATFORMS")) or bool(jax.config.jax_platforms)


def choose() -> str | None:
    """Restricts JAX to the platforms present when no TPU is attached and the user
    chose none; returns the platforms set, or None when it left JAX's default."""
    import jax
    if _user_chose(jax) or tpu_attached():
        return None
    platforms = ",".join(present_platforms())
    jax.config.update("jax_platforms", platforms)
    return platforms


def entry_point(main, module_name: str):
    """The console entry point of a command: ``choose()``, then ``main(sys.argv[1:])``.

    Called last in the command's module with its ``__name__``, it also runs
    the command when the module is executed (``python -m``).
    """

    def run() -> None:
        import sys
        choose()
        main(sys.argv[1:])

    run.__doc__ = f"Console entry point: {main.__module__}.main after platform.choose()."
    if module_name == "__main__":
        run()
    return run


def use_cpu(num_devices: int) -> None:
    """``num_devices`` emulated CPU devices, and only the CPU unless the user chose."""
    import jax
    if not _user_chose(jax):
        jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", int(num_devices))
