"""Per-device memory of the shipped configs' train steps on TPU topologies and NVIDIA GPUs, compiled ahead of time on
this host.

Each row is `maxlm compile --config=configs/<config>.py --topology=<topology> <overrides>` (maxlm/perf/aot.py), run in
this process. TPU rows need libtpu (`pip install -e '.[tpu]'`) and write benchmarks/results/aot_memory.{json,md};
GPU rows (`--gpu`) need the CUDA compiler plugin (`pip install -e '.[gpu-aot]'`, e.g. the venv `make test-gpu-aot`
makes) and write benchmarks/results/gpu_aot_memory.{json,md}. No TPU or GPU is used. The README's tables. Slow on a
small CPU: run it once, not in tests. No autotuning happens without a device: kernel choices (and so some
temporaries) may differ on a real one; `benchmarks/gpu_session.sh` checks the h100:1/h200:1 rows against one.

  JAX_PLATFORMS=cpu python benchmarks/aot_memory.py [--gpu] [--only gpt2_124m]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu's compiler only; never a TPU backend.

import jax  # noqa: E402

from maxlm import config  # noqa: E402
from maxlm.perf import aot

from gpu_memory_check import DEVICE_CHECK  # noqa: E402  (benchmarks/, the script's directory)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (config, topology, num_slices, overrides): the config as shipped, then what makes it fit where it does not.
ROWS = [
  ("gpt2_124m", "v5e:2x2", 1, []),
  ("gpt2_124m", "v5e:2x2", 1, ["--config.train.microbatches=32"]),
  ("llama_1b", "v5e:2x2", 1, []),
  ("llama_1b", "v5e:2x2", 1, ["--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.train.microbatches=32"]),
  ("llama_1b", "v5e:4x4", 1, ["--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.train.microbatches=8"]),
  (
    "llama_1b",
    "v5e:2x2",
    2,
    ["--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.mesh.dcn_data=2", "--config.train.microbatches=16"],
  ),
  # DiLoCo: a replica per slice (mesh.dcn_diloco=2), FSDP inside each; the state adds the outer model and momentum.
  (
    "llama_1b",
    "v5e:2x2",
    2,
    [
      "--config.mesh.data=1",
      "--config.mesh.fsdp=-1",
      "--config.train.diloco.replicas=2",
      "--config.train.diloco.comm_dtype=int8",
      "--config.train.microbatches=16",
    ],
  ),
  ("llama3_8b", "v5p:2x2x2", 1, []),
  ("llama3_8b", "v5p:2x2x2", 1, ["--config.train.microbatches=64"]),
  # MoE: experts over mesh.expert (8), everything else FSDP; the batch split over fsdp x expert.
  ("mixtral_8x7b", "v5p:4x4x4", 1, ["--config.train.microbatches=4"]),
  ("mixtral_8x7b", "v5p:4x4x4", 1, ["--config.train.microbatches=4", "--config.model.moe.capacity_factor=1.25"]),
  ("deepseek_moe_16b", "v5p:4x4x2", 1, ["--config.train.microbatches=8"]),
  ("deepseek_moe_16b", "v5p:4x4x2", 1, ["--config.train.microbatches=8", "--config.model.moe.capacity_factor=1.25"]),
  # Pipeline: 4 stages x FSDP 8, GPipe and circular (2 repeats), 8 pipeline microbatches of 64 rows.
  (
    "llama3_8b",
    "v5p:4x4x2",
    1,
    ["--config.mesh.stage=4", "--config.train.microbatches=8", "--config.train.pipeline_microbatches=8"],
  ),
  (
    "llama3_8b",
    "v5p:4x4x2",
    1,
    [
      "--config.mesh.stage=4",
      "--config.train.microbatches=8",
      "--config.train.pipeline_microbatches=8",
      "--config.model.pipeline_repeats=2",
    ],
  ),
  # Low precision (maxlm/model/quant.py): int8 projections, the TPU's integer matmul units.
  (
    "llama_1b",
    "v5e:4x4",
    1,
    [
      "--config.mesh.data=1",
      "--config.mesh.fsdp=-1",
      "--config.train.microbatches=8",
      "--config.model.quantization=int8",
    ],
  ),  # fmt: skip
  # Long context: the sequence split over mesh.context (maxlm/parallel/context.py), 32K and 128K positions.
  ("llama_1b_32k", "v5p:2x2x2", 1, []),
  ("llama_1b_32k", "v5p:2x2x2", 1, ["--config.model.context_attention=ring"]),
  (
    "llama_1b_32k",
    "v5p:4x4x2",
    1,
    ["--config.data.seq_len=131072", "--config.mesh.fsdp=2", "--config.train.microbatches=8"],
  ),
]


# One node of 8 GPUs, H100 and H200 (and two nodes); then the single-GPU rows gpu_session.sh checks on a real device.
_GPU_CASES = [
  ("gpt2_124m", []),
  ("llama_1b", []),
  ("llama_1b", ["--config.train.microbatches=4"]),
  ("llama3_8b", []),
  ("llama3_8b", ["--config.train.microbatches=64"]),
  ("llama_1b_32k", []),
  ("gpt2_124m", ["--config.model.quantization=fp8"]),
  ("llama_1b", ["--config.train.microbatches=4", "--config.model.quantization=fp8"]),
]
GPU_ROWS = [(name, gpu, 1, overrides) for name, overrides in _GPU_CASES for gpu in ("h100:8", "h200:8")]
GPU_ROWS += [
  ("llama3_8b", "h100:2x8", 1, ["--config.mesh.fsdp=16", "--config.train.microbatches=32"]),
]
# What benchmarks/gpu_session.sh measures on the one lent GPU, predicted here for either card.
GPU_ROWS += [(name, gpu, 1, overrides) for name, overrides in DEVICE_CHECK.values() for gpu in ("h100:1", "h200:1")]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default="", help="comma-separated config names (the other rows are kept)")
  parser.add_argument("--gpu", action="store_true", help="the GPU rows (needs the gpu-aot extra)")
  parser.add_argument("--missing", action="store_true", help="only the rows the results file lacks")
  args = parser.parse_args()
  plan, results = (GPU_ROWS, "gpu_aot_memory") if args.gpu else (ROWS, "aot_memory")
  rows = _previous_rows(results)
  for name, topology, slices, overrides in plan:
    if args.only and name not in args.only.split(","):
      continue
    if args.missing and (name, topology, slices, _overrides(overrides)) in rows:
      continue
    cfg = config.load([f"--config={REPO}/configs/{name}.py", *overrides])
    r = aot.compile_report(cfg, topology, slices)
    r.update(
      config=name,
      overrides=_overrides(overrides),
      date=datetime.date.today().isoformat(),
    )
    print(aot.format_report(r), flush=True)
    rows[_key(r)] = r
    write(rows, plan, results)  # After every row: a big config's compile takes minutes on a small CPU.
  print(table(write(rows, plan, results)))


def _overrides(flags: list[str]) -> str:
  return " ".join(o.replace("--config.", "") for o in flags)


def _key(r: dict) -> tuple:
  return r["config"], r["topology"], r["num_slices"], r["overrides"]


def _previous_rows(results: str) -> dict[tuple, dict]:
  """The rows of the last results file, by (config, topology, slices, overrides)."""
  path = os.path.join(REPO, "benchmarks", "results", f"{results}.json")
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    previous = json.load(f)
  return {_key(r): {"date": previous["date"], **r} for r in previous["rows"]}


def write(rows: dict[tuple, dict], plan: list, results: str) -> dict:
  """Writes the rows of `plan` (in its order) to benchmarks/results/<results>.{json,md}."""
  order = [(n, t, s, _overrides(ov)) for n, t, s, ov in plan]
  rows = [rows[k] for k in order if k in rows]
  result = {
    "benchmark": results,
    "date": datetime.date.today().isoformat(),
    "jax": jax.__version__,
    "host": f"{platform.machine()}, {os.cpu_count()} cores, CPU only",
    "python": sys.version.split()[0],
    "rows": rows,
  }
  out = os.path.join(REPO, "benchmarks", "results")
  with open(os.path.join(out, f"{results}.json"), "w") as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(out, f"{results}.md"), "w") as f:
    f.write(table(result))
  return result


def table(result: dict) -> str:
  gib, gpu = aot.GIB, result["benchmark"].startswith("gpu")
  lines = [
    "| config | topology | overrides | mesh | args | temps | XLA peak | peak (checked) | HBM/device | fits "
    "| compile s |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for r in result["rows"]:
    where = r["topology"] + (f" ×{r['num_slices']} slices" if r["num_slices"] > 1 else "")
    mesh = " × ".join(f"{a} {n}" for a, n in r["mesh"].items() if n > 1) or "one device"
    if "memory_per_device" in r:
      m = r["memory_per_device"]
      figures = " | ".join(f"{m[k] / gib:.2f}" for k in ("argument", "temp", "xla_peak", "peak"))
    else:  # "... HLO temporaries (27.29G) exceeds available HBM (15.75G)."
      need, have = (part.split("(")[-1].split(")")[0] for part in r["compiler_error"].split(" exceeds ")[:2])
      figures = f"— | {need} | — | compiler: > {have} available"
    lines.append(
      f"| {r['config']} | {where} | {r['overrides'] or 'as shipped'} | {mesh} | {figures} | "
      f"{r['hbm_bytes'] / gib:.{1 if gpu else 0}f} | {'yes' if r['fits'] else '**no**'} | "
      f"{r['compile_s']:.0f} |"
    )
  return "\n".join(lines) + (
    f"\n\nGiB per device; compiled {', '.join(sorted({r['date'] for r in result['rows']}))}, jax {result['jax']}, "
    f"on {result['host']} with "
    + (
      "the CUDA compiler plugin (no GPU). HBM/device: JAX's allocator share, 0.75 of the card's memory "
      "(XLA_PYTHON_CLIENT_MEM_FRACTION).\n"
      if gpu
      else "libtpu.\n"
    )
  )


if __name__ == "__main__":
  main()
