"""`maxlm compile`: compile the real train step ahead of time and check that it fits in device memory.

For `--topology=v5e:4x4` the devices come from `jax.experimental.topologies` (libtpu's compiler, no TPU
needed: this runs on a CPU-only host); without it, the local devices of any backend. The step is
`maxlm.training.step.build_step`, the same jitted function with the same shardings that `maxlm train` runs.

Per-device memory is XLA's buffer assignment (`compiled.memory_analysis()`):

  arguments + outputs − aliased + temporaries = live bytes of the step's buffers
                                                (aliased = donated state reused for the new state)
  peak = max(XLA's `peak_memory_in_bytes`, live + generated code): what the fit check uses. XLA's peak
         estimate is sometimes the larger (a small TPU program: it adds scratch the runtime reserves), often
         the smaller (gpt2_124m on v5e: 8.9 vs 10.5 GiB live; on CPU it leaves out the temporaries), so the
         check takes the larger of the two.

When the TPU compiler itself runs out of HBM (it plans against the chip's HBM less a runtime reserve, e.g.
15.75 of 16 GiB on v5e), the compile fails with RESOURCE_EXHAUSTED and that is the "does not fit" verdict.
The limit is the chip's HBM
(datasheet, per chip: v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB) divided among the devices that share a
chip (v4 topologies list both TensorCores as devices), or a local device's `bytes_limit`.
"""

from __future__ import annotations

import os
import re
import time

import ml_collections

from maxlm import config
from maxlm.errors import UserError
from maxlm.model import flops

GIB = 2**30
# Datasheet HBM per chip. Matched against `device.device_kind`, longest key first.
HBM_GIB_PER_CHIP = {
  "TPU v4": 32,
  "TPU v5 lite": 16,
  "TPU v5e": 16,
  "TPU v5p": 95,
  "TPU v5": 95,
  "TPU v6 lite": 32,
  "TPU v6e": 32,
}
MEMORY_FIELDS = ("argument", "output", "alias", "temp", "generated_code")
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Ran out of memory", "exceeds the memory")


GPU_TARGETS = os.path.join(os.path.dirname(__file__), "gpu_targets")  # <name>.txtpb: XLA GpuTargetConfigProto
GPU_TOPOLOGY = re.compile(r"(?P<gpu>[a-z0-9]+):(?:(?P<nodes>\d+)x)?(?P<per_node>\d+)")
DEFAULT_MEM_FRACTION = 0.75  # JAX's GPU allocator takes this share of the memory unless XLA_PYTHON_CLIENT_MEM_FRACTION


def gpu_targets() -> list[str]:
  return sorted(f.removesuffix(".txtpb") for f in os.listdir(GPU_TARGETS) if f.endswith(".txtpb"))


def is_gpu_topology(name: str) -> bool:
  match = GPU_TOPOLOGY.fullmatch(name)
  return bool(match) and match["gpu"] in gpu_targets()


def has_cuda_compiler() -> bool:
  """Whether the CUDA PJRT plugin (XLA's GPU compiler) is installed."""
  import importlib.util

  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:
    return False


def gpu_topology_devices(name: str) -> list:
  """The devices of `h100:8` (one node of 8 GPUs), `h200:2x8` (2 nodes of 8) …, for XLA's GPU compiler with no GPU:
  the compile-only CUDA plugin (`pip install -e '.[gpu-aot]'`) and a target config (maxlm/perf/gpu_targets/)."""
  match = GPU_TOPOLOGY.fullmatch(name)
  nodes, per_node = int(match["nodes"] or 1), int(match["per_node"])
  if not 1 <= per_node <= 8 or nodes < 1:
    raise UserError(f"--topology={name}: use 1 to 8 GPUs per node, e.g. {match['gpu']}:8 or {match['gpu']}:2x8")
  if not has_cuda_compiler():
    raise UserError(
      f"--topology={name} needs XLA's CUDA compiler (no GPU needed): pip install -e '.[gpu-aot]' "
      "(jax-cuda12-plugin and cuDNN, about 2.5 GB)"
    )
  from jax.experimental import topologies

  target = gpu_target(name)
  return list(
    topologies.get_topology_desc(platform="cuda", target_config=target, topology=f"1x{nodes}x{per_node}").devices
  )


def gpu_memory_bytes(name: str) -> int:
  """The device memory a target config declares (`device_memory_size`)."""
  return int(re.search(r"device_memory_size:\s*(\d+)", gpu_target(name))[1])


def gpu_target(name: str) -> str:
  """The XLA GpuTargetConfigProto text of a GPU topology's card (maxlm/perf/gpu_targets/<gpu>.txtpb)."""
  with open(os.path.join(GPU_TARGETS, GPU_TOPOLOGY.fullmatch(name)["gpu"] + ".txtpb")) as f:
    return f.read()


def topology_devices(name: str, num_slices: int = 1) -> list:
  """The devices of a TPU topology such as `v5e:2x2` or `v5p:2x2x2`, from libtpu, or of a GPU one such as
  `h100:8` or `h200:2x8` (`gpu_topology_devices`), on any host."""
  import importlib.util

  if is_gpu_topology(name):
    if num_slices > 1:
      raise UserError(f"--num_slices is for TPU slices: give GPU nodes in --topology, e.g. {name.split(':')[0]}:2x8")
    return gpu_topology_devices(name)

  if importlib.util.find_spec("libtpu") is None:
    raise UserError("--topology needs libtpu for the TPU compiler: pip install -e '.[tpu]' (works on a CPU host)")
  from jax.experimental import topologies

  try:
    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    return list(topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs).devices)
  except Exception as e:  # noqa: BLE001  libtpu's errors vary; the name is what the user can fix.
    if "lockfile" in str(e):
      raise UserError(
        f"--topology={name}: another process on this host is using libtpu (/tmp/libtpu_lockfile); "
        "wait for it to exit, or compile on another host (any CPU host with libtpu works)"
      ) from None
    raise UserError(
      f"--topology={name}: libtpu does not know it ({' '.join(str(e).split())[:200]}); use "
      "GENERATION:SHAPE, e.g. v5e:2x2, v5e:4x4, v4:2x2x1, v5p:2x2x2, v6e:2x2; or a GPU: "
      f"{', '.join(t + ':8' for t in gpu_targets())}, {gpu_targets()[0]}:2x8 (nodes x GPUs)"
    ) from None


def hbm_per_device(devices, topology: str | None = None) -> tuple[int | None, str]:
  """(bytes one device may use, where that figure comes from)."""
  d = devices[0]
  if topology and is_gpu_topology(topology):
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION") or DEFAULT_MEM_FRACTION)
    total = gpu_memory_bytes(topology)
    return int(fraction * total), (
      f"{fraction:g} of {total / GIB:.1f} GiB per {d.device_kind}: JAX's allocator share "
      "(XLA_PYTHON_CLIENT_MEM_FRACTION)"
    )
  if d.platform == "tpu":
    kind = next((k for k in sorted(HBM_GIB_PER_CHIP, key=len, reverse=True) if k in d.device_kind), None)
    if kind is not None:
      chips = len({(getattr(x, "slice_index", 0), tuple(x.coords)) for x in devices})
      per_chip = len(devices) // chips
      note = f", shared by {per_chip} devices per chip" if per_chip > 1 else ""
      source = f"{HBM_GIB_PER_CHIP[kind]} GiB HBM per {d.device_kind} chip{note}"
      return HBM_GIB_PER_CHIP[kind] * GIB // per_chip, source
  try:
    stats = d.memory_stats() or {}
  except Exception:  # noqa: BLE001  Topology devices and some backends have no allocator to ask.
    stats = {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"bytes_limit of {d.device_kind}"
  if d.platform == "cpu":
    local = sum(x.process_index == d.process_index for x in devices)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // local, f"host RAM shared by {local} CPU device(s)"
  return None, f"unknown for {d.device_kind}"


def compile_report(
  cfg: ml_collections.ConfigDict, topology: str | None = None, num_slices: int = 1, hlo: bool = False
) -> dict:
  """Compiles the train step of a loaded (not yet validated) config; returns the memory report (with `hlo`, the
  optimized HLO text too, under "hlo")."""
  import jax

  from maxlm.parallel import mesh as mesh_lib
  from maxlm.parallel import pipeline
  from maxlm.training import step as step_lib

  devices = topology_devices(topology, num_slices) if topology else jax.devices()
  cfg = config.validate(
    cfg,
    num_devices=len(devices),
    platform=devices[0].platform,
    num_slices=mesh_lib.num_granules(devices),
  )
  limit, limit_source = hbm_per_device(devices, topology)
  report = {
    "topology": topology or "local",
    "num_slices": num_slices,
    "device_kind": devices[0].device_kind,
    "num_devices": len(devices),
    "processes": len({d.process_index for d in devices}),
    "mesh": mesh_lib.axis_sizes(cfg.mesh),
    "params_m": flops.param_count(cfg.model) / 1e6,
    "global_batch": cfg.train.global_batch,
    "seq_len": cfg.data.seq_len,
    "microbatches": cfg.train.microbatches,
    "remat": cfg.model.remat,
    "attention": cfg.model.attention
    if cfg.mesh.context == 1
    else f"context {cfg.model.context_attention} over {cfg.mesh.context} shards"
    + (" (splash)" if cfg.model.attention == "splash" and cfg.model.context_attention == "all_gather" else ""),
    "compute_dtype": cfg.model.compute_dtype,
    "param_dtype": cfg.model.param_dtype,
    "pipeline": pipeline.describe(cfg),
    "hbm_bytes": limit,
    "hbm_source": limit_source,
    "jax": jax.__version__,
  }
  t0 = time.perf_counter()
  try:
    compiled = step_lib.build_step(cfg, devices).lower().compile()
  except Exception as e:  # noqa: BLE001  Only the compiler's out-of-memory verdict is a result; the rest are bugs.
    text = " ".join(str(e).split())
    if not any(m in text for m in OOM_MARKERS):
      raise
    return {**report, "compile_s": time.perf_counter() - t0, "fits": False, "compiler_error": text[:600]}
  report["compile_s"] = time.perf_counter() - t0
  if hlo:
    report["hlo"] = compiled.as_text()
  stats = compiled.memory_analysis()
  memory = {f: int(getattr(stats, f"{f}_size_in_bytes")) for f in MEMORY_FIELDS}
  memory["live"] = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
  memory["xla_peak"] = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
  memory["peak"] = max(memory["xla_peak"], memory["live"] + memory["generated_code"])
  report["memory_per_device"] = memory
  report["fits"] = limit is None or memory["peak"] <= limit
  return report


def format_report(r: dict) -> str:
  where = r["topology"] + (f" x {r['num_slices']} slices" if r["num_slices"] > 1 else "")
  lines = [
    f"{where}: {r['num_devices']} x {r['device_kind']} ({r['processes']} host process(es)), mesh {r['mesh']}",
    f"model {r['params_m']:.1f}M parameters, batch {r['global_batch']} x {r['seq_len']} "
    f"({r['microbatches']} microbatch(es)), remat {r['remat']}, compute {r['compute_dtype']}, "
    f"attention {r['attention']}; "
    f"compiled in {r['compile_s']:.1f} s",
  ]
  if r.get("pipeline"):
    lines.append(f"pipeline: {r['pipeline']}")
  if "memory_per_device" in r:
    m = r["memory_per_device"]
    lines.append("memory per device (GiB):")
    for label, key in (
      ("arguments", "argument"),
      ("outputs", "output"),
      ("aliased (donated)", "alias"),
      ("temporaries", "temp"),
      ("generated code", "generated_code"),
      ("live = args + outputs - aliased + temps", "live"),
      ("XLA peak estimate", "xla_peak"),
      ("peak = max(XLA peak, live + code)", "peak"),
    ):
      lines.append(f"  {label:40} {m[key] / GIB:9.3f}")
  else:
    lines.append(f"the compiler ran out of memory: {r['compiler_error']}")
  if r["hbm_bytes"] is not None and "memory_per_device" in r:
    lines.append(
      f"{'fits' if r['fits'] else 'DOES NOT FIT'}: {r['memory_per_device']['peak'] / GIB:.3f} GiB of "
      f"{r['hbm_bytes'] / GIB:.3f} GiB per device ({r['hbm_source']})"
    )
  elif r["hbm_bytes"] is not None:
    lines.append(f"DOES NOT FIT: {r['hbm_bytes'] / GIB:.3f} GiB per device ({r['hbm_source']})")
  return "\n".join(lines)


def does_not_fit_message(r: dict) -> str:
  limit = f"{r['hbm_bytes'] / GIB:.2f} GiB" if r["hbm_bytes"] is not None else "the device memory"
  if "memory_per_device" in r:
    need = f"{r['memory_per_device']['peak'] / GIB:.2f} GiB per device > {limit}"
  else:
    need = f"the compiler ran out of memory ({r['compiler_error'].split('RESOURCE_EXHAUSTED: ')[-1][:160]})"
  return (
    f"{need} on {r['topology']} ({r['device_kind']}): shard more "
    "(mesh.fsdp, mesh.tensor), use model.remat, more train.microbatches or a smaller train.global_batch"
  )
