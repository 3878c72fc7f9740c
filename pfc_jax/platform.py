"""Which JAX platforms a pfc_jax process starts; called before JAX's backends start.

With the ``tpu`` extra installed (libtpu, for the pod-fit check's TPU
compiles), JAX tries the TPU backend in every process, and on a host with no
TPU libtpu prints initialisation errors before the first line of the run's
own output. ``choose()`` (every pfc_jax command calls it first) starts
JAX on the CPU alone on a host with no TPU and no GPU when libtpu is
installed and the user named no platform. A TPU or GPU host, or a user who
set ``JAX_PLATFORMS`` / ``jax_platforms``, is left to JAX's default. The pod-fit check loads libtpu for its compiles by itself
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


def gpu_attached() -> bool:
    """Whether an NVIDIA or AMD GPU's device files are present."""
    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/kfd")


def cpu_only_host() -> bool:
    return not tpu_attached() and not gpu_attached()


def _user_chose(jax) -> bool:
    return bool(os.environ.get("JAX_PLATFORMS")) or bool(jax.config.jax_platforms)


def choose() -> str | None:
    """On a CPU-only host with libtpu installed and no platform chosen by the
    user, starts JAX on the CPU alone; returns what it set, or None when it left
    JAX's default (a TPU or GPU host, no libtpu, or the user's choice)."""
    import jax
    if _user_chose(jax) or not cpu_only_host():
        return None
    try:
        if importlib.util.find_spec("libtpu") is None:
            return None  # nothing would probe for a TPU
    except (ImportError, ValueError):
        return None
    jax.config.update("jax_platforms", "cpu")
    return "cpu"


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
