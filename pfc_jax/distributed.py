"""Multi-process start-up: one call, before anything touches a device.

    from pfc_jax import distributed
    distributed.initialize()     # a no-op when this is the only process

The trainer calls it first thing (``python -m pfc_jax.train`` on every host;
``launch/`` has the launchers). Where the process layout comes from, first
match wins, field by field:

1. the arguments, which ``pfc_jax.train`` fills from its flags
   ``--coordinator_address``, ``--num_processes``, ``--process_id``,
   ``--local_device_ids`` and ``--distributed_timeout_s`` (``define_flags``);
2. environment variables: ``PFC_COORDINATOR`` (host:port of process 0),
   ``PFC_NUM_PROCESSES``, ``PFC_PROCESS_ID``, ``PFC_LOCAL_DEVICE_IDS``
   (comma-separated; ``launch/local_cluster.sh`` sets the first three), then
   JAX's own ``JAX_COORDINATOR_ADDRESS`` and ``JAX_LOCAL_DEVICE_IDS``;
3. the cluster detectors of ``jax.distributed.initialize()``: Cloud TPU VMs
   and GKE TPU slices (worker list from the metadata server or
   ``TPU_WORKER_HOSTNAMES``), SLURM job steps (``srun``: ``SLURM_JOB_ID``,
   ``SLURM_STEP_NODELIST``, ``SLURM_NTASKS``, ``SLURM_PROCID``,
   ``SLURM_LOCALID``; the coordinator is the first node of the step, port
   from the job id or ``JAX_COORDINATOR_PORT``) and Open MPI (``mpirun``:
   ``OMPI_MCA_orte_hnp_uri``, ``OMPI_COMM_WORLD_*``); not JAX's Kubernetes
   detector (set the variables of 2. there). Under SLURM and Open MPI JAX then shows
   each process only the GPU numbered by its local rank (one process per
   GPU); for one process per node, list the node's GPUs in
   ``PFC_LOCAL_DEVICE_IDS`` (``launch/slurm.sbatch`` does).

Nothing found, or a single process: nothing happens and JAX runs as usual.

On CPU the processes need cross-process collectives: ``gloo`` over TCP is
selected unless ``JAX_CPU_COLLECTIVES_IMPLEMENTATION`` names another one.

A peer that never arrives. JAX waits up to its initialisation timeout and
then, in this JAX version, aborts the process from C++ (``SIGABRT``, exit
134) with a message about "another task" that names neither the address nor
the process. Here a watchdog thread waits ``timeout_s`` (default: 300 s, or
``PFC_INIT_TIMEOUT_S``) and, if the processes have not all joined by then,
prints what was expected (coordinator address, process count, this process
id, the timeout) to stderr and exits with code ``EXIT_PEER_TIMEOUT`` (75)
before JAX's own deadline, which is set ``_JAX_GRACE_S`` later. Errors JAX
raises as Python exceptions are re-raised as ``DistributedInitError`` with
the same facts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence

import jax

EXIT_PEER_TIMEOUT = 75  # sysexits' EX_TEMPFAIL: a retry may succeed
DEFAULT_TIMEOUT_S = 300.0
_JAX_GRACE_S = 15  # JAX's own deadline comes this much after the watchdog's

ENV_COORDINATOR = "PFC_COORDINATOR"
ENV_NUM_PROCESSES = "PFC_NUM_PROCESSES"
ENV_PROCESS_ID = "PFC_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "PFC_LOCAL_DEVICE_IDS"
ENV_TIMEOUT = "PFC_INIT_TIMEOUT_S"
# JAX's detectors used here (jax._src.clusters, by name). Kubernetes ("k8s") is
# left out: a single-process run inside any pod would query the cluster's API.
AUTO_DETECTED = ("ompi", "slurm", "gketpu", "gcetpu")


class DistributedInitError(RuntimeError):
    """The processes could not be joined; the message names the layout that was tried."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where this process sits: what ``jax.distributed.initialize`` is given."""

    coordinator_address: str
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None
    source: str  # which of arguments / environment / cluster detection said so

    def describe(self) -> str:
        return (f"process {self.process_id} of {self.num_processes}, coordinator "
                f"{self.coordinator_address} (from {self.source})")


# --------------------------------------------------------------------- resolving
def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def _parse_ids(raw, what: str) -> tuple[int, ...] | None:
    if raw is None:
        return None
    if isinstance(raw, int):
        return (raw,)
    if isinstance(raw, str):
        raw = [p for p in raw.replace(" ", "").split(",") if p]
        if not raw:
            return None
    try:
        ids = tuple(int(x) for x in raw)
    except (TypeError, ValueError):
        raise ValueError(f"{what}={raw!r} must be a comma-separated list of device "
                         "numbers, e.g. 0,1,2,3") from None
    if any(i < 0 for i in ids):
        raise ValueError(f"{what}={raw!r}: device numbers must be >= 0")
    return ids


def _detect_cluster(coordinator_address, num_processes, process_id, local_device_ids,
                    timeout_s):
    """Fills what is still unset from JAX's cluster detectors (``AUTO_DETECTED``).

    The same function ``jax.distributed.initialize()`` calls, called here so
    the layout is known (and printed in errors) before connecting.
    """
    try:  # no public API says what the detectors found before connecting
        from jax._src import clusters
        detect = clusters.ClusterEnv.auto_detect_unset_distributed_params
        present = next((c.name for c in clusters.ClusterEnv._cluster_types
                        if c.name in AUTO_DETECTED and c.is_env_present()), None)
        if present is None:
            return coordinator_address, num_processes, process_id, local_device_ids, None
        c, n, p, ids = detect(coordinator_address, num_processes, process_id,
                              None if local_device_ids is None else list(local_device_ids),
                              present, int(math.ceil(timeout_s)))
    except (ImportError, AttributeError, TypeError) as e:  # a JAX whose internals moved
        raise DistributedInitError(
            f"cannot reach JAX's cluster detection in jax {jax.__version__} ({e}); set "
            f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} instead") from e
    return c, n, p, (None if ids is None else tuple(int(i) for i in ids)), present


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, local_device_ids=None, *,
            timeout_s: float = DEFAULT_TIMEOUT_S) -> Layout | None:
    """This process's layout, or None when nothing says there is more than one process.

    Raises ValueError, naming the variable and its value, for a layout that is
    incomplete or inconsistent.
    """
    sources = []
    given = (coordinator_address, num_processes, process_id, local_device_ids)
    if any(v is not None for v in given):
        sources.append("arguments")
    env = {ENV_COORDINATOR: os.environ.get(ENV_COORDINATOR) or None,
           ENV_NUM_PROCESSES: _env_int(ENV_NUM_PROCESSES),
           ENV_PROCESS_ID: _env_int(ENV_PROCESS_ID)}
    filled = False
    if coordinator_address is None and env[ENV_COORDINATOR] is not None:
        coordinator_address, filled = env[ENV_COORDINATOR], True
    if num_processes is None and env[ENV_NUM_PROCESSES] is not None:
        num_processes, filled = env[ENV_NUM_PROCESSES], True
    if process_id is None and env[ENV_PROCESS_ID] is not None:
        process_id, filled = env[ENV_PROCESS_ID], True
    if filled:
        sources.append("PFC_* environment variables")
    if coordinator_address is None and os.environ.get("JAX_COORDINATOR_ADDRESS"):
        coordinator_address = os.environ["JAX_COORDINATOR_ADDRESS"]
        sources.append("JAX_COORDINATOR_ADDRESS")
    local_device_ids = _parse_ids(local_device_ids, "local_device_ids")
    if local_device_ids is None:
        for name in (ENV_LOCAL_DEVICE_IDS, "JAX_LOCAL_DEVICE_IDS"):
            if os.environ.get(name):
                local_device_ids = _parse_ids(os.environ[name], name)
                break

    if None in (coordinator_address, num_processes, process_id):
        coordinator_address, num_processes, process_id, local_device_ids, cluster = \
            _detect_cluster(coordinator_address, num_processes, process_id,
                            local_device_ids, timeout_s)
        if cluster is not None:
            sources.append(f"{cluster} cluster detection")

    if (coordinator_address, num_processes, process_id) == (None, None, None):
        return None  # nothing says otherwise: one process
    if num_processes is not None and num_processes == 1 and process_id in (None, 0):
        return None
    missing = [name for name, v in (("coordinator address", coordinator_address),
                                    ("number of processes", num_processes),
                                    ("process id", process_id)) if v is None]
    if missing:
        raise ValueError(
            f"multi-process layout incomplete: {', '.join(missing)} not set (have "
            f"coordinator={coordinator_address!r}, num_processes={num_processes!r}, "
            f"process_id={process_id!r} from {', '.join(sources) or 'nowhere'}). Set "
            f"{ENV_COORDINATOR}=host:port, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} (or the "
            "--coordinator_address/--num_processes/--process_id flags), or run under "
            "srun, mpirun or on a TPU pod")
    host, _, port = str(coordinator_address).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator address {coordinator_address!r} must be host:port "
                         "with a port in 1..65535, e.g. 10.0.0.1:1234")
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"number of processes must be an integer >= 1, got {num_processes!r}")
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id!r} must be in [0, {num_processes}) "
                         f"for {num_processes} processes")
    return Layout(str(coordinator_address), num_processes, process_id, local_device_ids,
                  " + ".join(sources))


# -------------------------------------------------------------------- connecting
def _timeout_from_env() -> float:
    raw = os.environ.get(ENV_TIMEOUT)
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"environment variable {ENV_TIMEOUT}={raw!r} is not a number "
                         "of seconds") from None
    return value


def peer_timeout_message(layout: Layout, timeout_s: float) -> str:
    """What the watchdog prints when not every process joined within ``timeout_s``."""
    if layout.process_id == 0:
        hint = ("this process runs the coordinator, so the other processes never connected: "
                "were they started, with the same coordinator address and process count, "
                "and did they reach distributed.initialize?")
    else:
        hint = (f"is process 0 running, and is {layout.coordinator_address} reachable from "
                "this host (host name, port, firewall)? Or another process never started.")
    return (f"pfc_jax.distributed: timed out after {timeout_s:g} s waiting for all "
            f"{layout.num_processes} processes to join: this is process {layout.process_id} "
            f"of {layout.num_processes}, coordinator {layout.coordinator_address} (layout from "
            f"{layout.source}); {hint} The wait is --distributed_timeout_s / {ENV_TIMEOUT}. "
            f"Exiting with code {EXIT_PEER_TIMEOUT}.")


def _check_port(layout: Layout) -> None:
    """On process 0: the coordinator's port must be free (JAX binds ``[::]:port``).

    JAX reports a busy port as "Failed to start RPC server" and, now and
    then, crashes (SIGSEGV) while cleaning up; ask first.
    """
    if layout.process_id != 0 or os.environ.get("JAX_COORDINATOR_BIND_ADDRESS"):
        return
    port = int(layout.coordinator_address.rpartition(":")[2])
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            probe = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 here: try IPv4
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            try:
                probe.bind((host, port))
                return
            except OSError as e:
                raise DistributedInitError(
                    f"cannot start the coordinator for {layout.describe()}: process 0 could "
                    f"not listen on port {port}: is it already in use on this host, by "
                    f"another run? ({e})") from e


def _connect(layout: Layout, timeout_s: float) -> None:
    _check_port(layout)
    done = threading.Event()

    def watchdog():
        # JAX blocks in C++ (with the GIL released) and would abort the process
        # with SIGABRT at its own deadline; speak first, and exit with a code
        # a launcher can tell apart.
        if not done.wait(timeout_s):
            sys.stderr.write(peer_timeout_message(layout, timeout_s) + "\n")
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(EXIT_PEER_TIMEOUT)

    threading.Thread(target=watchdog, name="pfc-distributed-watchdog", daemon=True).start()
    try:
        jax.distributed.initialize(
            layout.coordinator_address, layout.num_processes, layout.process_id,
            local_device_ids=(None if layout.local_device_ids is None
                              else list(layout.local_device_ids)),
            cluster_detection_method="deactivate",  # resolved above, with the same detectors
            initialization_timeout=int(math.ceil(timeout_s)) + _JAX_GRACE_S)
    except Exception as e:
        if "must be called before any JAX calls" in str(e):  # JAX's own check, a RuntimeError
            raise DistributedInitError(
                f"distributed.initialize must run before anything touches a device "
                f"(jax.devices(), an array, a jit call), but the JAX backend is already up; "
                f"cannot join as {layout.describe()}") from e
        hint = ""
        if "Failed to start RPC server" in str(e):
            port = layout.coordinator_address.rpartition(":")[2]
            hint = (f" (process 0 could not listen on port {port}: is it already in use on "
                    "this host, by another run?)")
        raise DistributedInitError(
            f"jax.distributed.initialize failed for {layout.describe()}, timeout "
            f"{timeout_s:g} s: {type(e).__name__}: {e}{hint}") from e
    finally:
        done.set()


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: float | None = None,
               local_device_ids: int | Sequence[int] | str | None = None) -> None:
    """Joins this process to the others (see the module docstring); a no-op on one process.

    Args:
      coordinator_address: ``host:port`` of process 0, which runs the coordinator.
      num_processes: how many processes take part.
      process_id: this process, in ``[0, num_processes)``.
      timeout_s: how long to wait for every process to join; default
        ``PFC_INIT_TIMEOUT_S`` or 300 s. When it passes, the process prints the
        layout it waited for and exits with ``EXIT_PEER_TIMEOUT``.
      local_device_ids: the accelerators this process drives (GPU numbers).

    Raises:
      ValueError: an incomplete or inconsistent layout, naming the values.
      DistributedInitError: JAX refused (for instance, devices were used
        before this call), naming the layout.
    """
    if timeout_s is None:
        timeout_s = _timeout_from_env()
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
    if jax.distributed.is_initialized():
        return
    layout = resolve(coordinator_address, num_processes, process_id, local_device_ids,
                     timeout_s=timeout_s)
    if layout is None:
        return
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        # Cross-process collectives on CPU (ignored by GPU and TPU backends).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    start = time.monotonic()
    _connect(layout, float(timeout_s))
    print(f"pfc_jax.distributed: joined as {layout.describe()} in "
          f"{time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------- flags
def define_flags(flag_values=None) -> None:
    """Defines the trainer's distributed flags (once; later calls do nothing)."""
    from absl import flags
    fv = flags.FLAGS if flag_values is None else flag_values
    if "coordinator_address" in fv:
        return
    flags.DEFINE_string(
        "coordinator_address", None,
        f"host:port of process 0's coordinator (default: ${ENV_COORDINATOR}, or what "
        "SLURM / Open MPI / a TPU pod says)", flag_values=fv)
    flags.DEFINE_integer("num_processes", None,
                         f"number of processes (default: ${ENV_NUM_PROCESSES} or detected)",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("process_id", None,
                         f"this process, 0-based (default: ${ENV_PROCESS_ID} or detected)",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_list("local_device_ids", None,
                      f"GPUs this process drives, e.g. 0,1,2,3 (default: "
                      f"${ENV_LOCAL_DEVICE_IDS}, else JAX's choice)", flag_values=fv)
    flags.DEFINE_float("distributed_timeout_s", None,
                       f"seconds to wait for every process to join (default: "
                       f"${ENV_TIMEOUT} or {DEFAULT_TIMEOUT_S:g})", flag_values=fv)


def initialize_from_flags(flag_values=None) -> None:
    """``initialize`` with the values of ``define_flags``'s flags (unset: the defaults)."""
    from absl import flags
    fv = flags.FLAGS if flag_values is None else flag_values
    initialize(fv.coordinator_address, fv.num_processes, fv.process_id,
               timeout_s=fv.distributed_timeout_s, local_device_ids=fv.local_device_ids)
