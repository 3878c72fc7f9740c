"""Test set-up: an emulated 8-device CPU mesh, fixed before JAX starts."""

import os

import jax

from pfc_jax import platform  # noqa: E402

platform.use_cpu(8)
jax.config.update("jax_platforms", "cpu")  # also where JAX_PLATFORMS named another
assert jax.device_count() == 8, (
    f"tests need 8 CPU devices, got {jax.device_count()}: was JAX imported before conftest?")

# Identical programs (the trainer tests build the same step several times)
# compile once per machine.
import tempfile  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  os.path.join(tempfile.gettempdir(), "pfc_jax_xla_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


# libtpu (loaded by the TPU compile tests) can hang in its exit-time teardown and
# then kill the process with SIGTRAP after every test has passed, which turns a
# green run into a failed `make test`. Once pytest has printed its report, leave
# without the interpreter's teardown, with pytest's own exit status.
def pytest_sessionfinish(session, exitstatus):
    session.config._pfc_exitstatus = int(exitstatus)


def pytest_unconfigure(config):
    import sys
    status = getattr(config, "_pfc_exitstatus", None)
    if status is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
