"""Starting this process's JAX runtime: `jax.distributed` when a run spans processes, before any other JAX call.

How the processes are found, in order (docs/multihost.md):
  1. explicit: `--coordinator=HOST:PORT --num_processes=N --process_id=I` (all three, same HOST:PORT everywhere);
  2. a cluster environment, whose variables JAX reads itself: SLURM (`srun`), Open MPI (`mpirun`), or a Cloud
     TPU VM (this host has TPU chips and libtpu; the workers come from the VM's metadata);
  3. otherwise one process, and `jax.distributed` is not started.

Failure is bounded. A process that stops sending heartbeats for `heartbeat_timeout_s` is declared dead by the
coordination service, which then terminates every other process (JAX logs "Terminating process because the JAX
distributed service detected fatal errors ... another task died", exit status 134); if the coordinator's
process (0) dies, the others go at once. `shutdown_timeout_s` bounds how long a finishing process waits for the
rest at exit, so a process that fails alone cannot hold the job for JAX's default 5 minutes.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import logging
import os
import sys

from maxlm.errors import UserError

log = logging.getLogger("maxlm")

# Variables whose presence means a launcher started several processes (the ones JAX's detectors read).
CLUSTERS = {
  "SLURM": ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"),
  "Open MPI": ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"),
}
CLUSTER_SIZE = {"SLURM": "SLURM_NTASKS", "Open MPI": "OMPI_COMM_WORLD_SIZE"}
GOOGLE_PCI_VENDOR = "0x1ae0"  # Cloud TPU chips are PCI devices of this vendor.


def tpu_chips_present() -> bool:
  """Whether this host has TPU chips (a Cloud TPU VM), read from PCI vendor ids without starting a backend."""
  for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(path) as f:
        if f.read().strip() == GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def skip_unusable_tpu(environ=os.environ) -> bool:
  """Sets JAX_PLATFORMS=cpu when libtpu is installed on a host with no TPU and no other accelerator plugin.

  JAX would otherwise try libtpu's TPU client first, which fails after printing several alarming lines
  ("could not determine TPU accelerator type", ...) and costs ~0.1 s; CPU is the only backend it can end up
  with. libtpu stays usable for AOT compiles (`jax.experimental.topologies` loads it whatever the platform).
  Returns whether it changed anything.
  """
  if "JAX_PLATFORMS" in environ or importlib.util.find_spec("libtpu") is None or tpu_chips_present():
    return False
  if accelerator_plugin_installed():
    return False  # A GPU (or other) plugin: leave the choice to JAX.
  use_platforms("cpu", environ)
  return True


def accelerator_possible(environ=os.environ) -> bool:
  """Whether JAX may start a backend other than CPU here: JAX_PLATFORMS names one, or (unset) this host has
  TPU chips and libtpu, or an accelerator plugin is installed. Reads no backend."""
  if environ.get("JAX_PLATFORMS"):
    return any(p.strip() not in ("", "cpu") for p in environ["JAX_PLATFORMS"].split(","))
  return (importlib.util.find_spec("libtpu") is not None and tpu_chips_present()) or accelerator_plugin_installed()


def accelerator_plugin_installed() -> bool:
  """Whether a JAX backend plugin (CUDA, ROCm, ...) is installed, found without loading it."""
  return importlib.util.find_spec("jax_plugins") is not None or any(
    importlib.metadata.entry_points(group="jax_plugins")
  )


def use_platforms(platforms: str, environ=os.environ) -> None:
  """JAX_PLATFORMS for this process, also when jax is already imported (it reads the variable at import)."""
  environ["JAX_PLATFORMS"] = platforms
  if "jax" in sys.modules:
    sys.modules["jax"].config.update("jax_platforms", platforms)


def detect(
  coordinator: str | None, num_processes: int | None, process_id: int | None, environ=os.environ
) -> str | None:
  """How this run's processes find each other ("explicit", "SLURM", "Open MPI", "Cloud TPU"), or None for one
  process. Raises UserError for an incomplete or inconsistent set of flags."""
  given = {"--coordinator": coordinator, "--num_processes": num_processes, "--process_id": process_id}
  if any(v is not None for v in given.values()):
    missing = [k for k, v in given.items() if v is None]
    if missing:
      raise UserError(
        f"{', '.join(missing)} missing: pass --coordinator=HOST:PORT, --num_processes=N and "
        "--process_id=I together (the same HOST:PORT and N on every process)"
      )
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
      raise UserError(f"--coordinator={coordinator!r}: use HOST:PORT, e.g. --coordinator=10.0.0.2:8476")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise UserError(
        f"--process_id={process_id} --num_processes={num_processes}: need 0 <= process_id < num_processes"
      )
    return "explicit" if num_processes > 1 else None
  for name, variables in CLUSTERS.items():
    if all(v in environ for v in variables):
      return name if int(environ[CLUSTER_SIZE[name]]) > 1 else None
  if importlib.util.find_spec("libtpu") is not None and tpu_chips_present():
    return "Cloud TPU"  # JAX reads the worker list from the VM metadata; a single-host VM gets one process.
  return None


def initialize(
  coordinator: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  heartbeat_timeout_s: int = 60,
  init_timeout_s: int = 300,
  shutdown_timeout_s: int | None = None,
  environ=os.environ,
) -> str | None:
  """Starts `jax.distributed` if this run spans processes (see `detect`); returns how, or None.

  `init_timeout_s` bounds the wait for every process to connect; `shutdown_timeout_s` (default: the heartbeat
  timeout) the wait for the others at exit.
  """
  method = detect(coordinator, num_processes, process_id, environ)
  if method is None:
    return None
  import jax

  timeouts = dict(
    initialization_timeout=init_timeout_s,
    heartbeat_timeout_seconds=heartbeat_timeout_s,
    shutdown_timeout_seconds=shutdown_timeout_s or heartbeat_timeout_s,
  )
  if method == "explicit":
    # local_device_ids left to JAX: all of this process's devices (set CUDA_VISIBLE_DEVICES to split a host).
    jax.distributed.initialize(
      coordinator, num_processes, process_id, cluster_detection_method="deactivate", **timeouts
    )
  else:
    jax.distributed.initialize(**timeouts)
  log.info(
    "jax.distributed (%s): process %d of %d; a process silent for %d s ends the run",
    method,
    jax.process_index(),
    jax.process_count(),
    heartbeat_timeout_s,
  )
  return method
