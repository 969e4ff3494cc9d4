"""Train-step throughput on this machine, measured against the same process's matmul rate.

For each config and variant: compile time, median step time (warm-up excluded), tokens/s, model FLOP/s
(maxlm/model/flops.py formula) and that rate divided by the f32 2048^3 matmul rate measured in the same process
right before and after (the better of the two is the reference). Writes
benchmarks/results/step_throughput_<platform>.json, appends its rows to step_throughput_<platform>.md (the
history across hosts, each named: the ratio depends on the CPU as much as on the code), and prints a table.

  python benchmarks/step_throughput.py [--steps 20] [--configs tiny,cpu_10m]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import jax
import jax.numpy as jnp

from maxlm import config, provenance
from maxlm.model import flops
from maxlm.perf import bench as maxlm_bench
from maxlm.training import hostmem, loop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import step_times  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
  "scan": ["--config.model.scan_layers=true"],
  "unrolled": ["--config.model.scan_layers=false"],
  "unrolled_chunked_loss": ["--config.model.scan_layers=false", "--config.train.loss_chunk=64"],
}


def bench(name: str, variant: list[str], steps: int) -> dict:
  cfg = config.load(
    [
      f"--config={REPO}/configs/{name}.py",
      "--config.metrics.peak_tflops=1",
      "--config.checkpoint.every_steps=0",
      *variant,
    ]
  )
  cfg = config.validate(cfg, num_devices=1, platform=jax.devices()[0].platform)
  session = loop.setup(cfg, jax.devices()[:1])
  matmul_before = flops.measure_matmul_tflops(jnp.float32)
  _, times = step_times(session, session.program.init(), steps)
  matmul_after = flops.measure_matmul_tflops(jnp.float32)
  step_time = statistics.median(times)
  train_tflops = session.flops_per_step / step_time / 1e12
  matmul = max(matmul_before, matmul_after)
  return {
    "config": name,
    "variant": " ".join(variant) or "default",
    "params_m": flops.param_count(cfg.model) / 1e6,
    "tokens_per_step": session.tokens_per_step,
    "compile_s": session.compile_s,
    "step_time_s": step_time,
    "step_time_spread_s": [min(times), max(times)],
    "tokens_per_sec": session.tokens_per_step / step_time,
    "train_gflops": train_tflops * 1e3,
    "matmul_gflops": [matmul_before * 1e3, matmul_after * 1e3],
    "train_over_matmul": train_tflops / matmul,
  }


HISTORY_HEADER = (
  "| date | host | jax | malloc | config | variant | step ms | matmul GFLOP/s (before, after) | "
  "train ÷ matmul |\n| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: |\n"
)


def append_history(result: dict, path: str) -> None:
  maxlm_bench.append_table_rows(
    path,
    "# Train step ÷ same-process matmul, one row per config and run\n\nAppended by "
    "`benchmarks/step_throughput.py`; the host's CPU is named because the ratio depends on it.\n\n" + HISTORY_HEADER,
    [
      f"| {result['date']} | {result['host']} | {result['jax']} | {result['malloc']} | {r['config']} | "
      f"{r['variant']} | {1e3 * r['step_time_s']:.0f} | {r['matmul_gflops'][0]:.0f}, {r['matmul_gflops'][1]:.0f} | "
      f"{100 * r['train_over_matmul']:.1f}% |"
      for r in result["rows"]
    ],
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--configs", default="tiny,cpu_10m")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument(
    "--default-malloc",
    action="store_true",
    help="leave glibc malloc as it is, without maxlm.training.hostmem (the A/B of benchmarks/NOTES.md)",
  )
  args = parser.parse_args()
  malloc = "default" if args.default_malloc or not hostmem.keep_freed_memory() else "kept"
  rows = [bench(name, VARIANTS[v], args.steps) for name in args.configs.split(",") for v in args.variants.split(",")]
  device = jax.devices()[0]
  result = {
    "benchmark": "step_throughput",
    "date": datetime.date.today().isoformat(),
    "device": device.device_kind,
    "platform": device.platform,
    "host": provenance.host_description(),
    "malloc": malloc,
    "jax": jax.__version__,
    "python": sys.version.split()[0],
    "rows": rows,
  }
  os.makedirs(f"{REPO}/benchmarks/results", exist_ok=True)
  path = f"{REPO}/benchmarks/results/step_throughput_{device.platform}.json"
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  append_history(result, f"{REPO}/benchmarks/results/step_throughput_{device.platform}.md")
  print(f"{'config':10} {'variant':36} {'compile s':>9} {'step ms':>8} {'tok/s':>9} {'GFLOP/s':>8} {'/matmul':>7}")
  for r in rows:
    print(
      f"{r['config']:10} {r['variant']:36} {r['compile_s']:9.1f} {1e3 * r['step_time_s']:8.1f} "
      f"{r['tokens_per_sec']:9.0f} {r['train_gflops']:8.1f} {100 * r['train_over_matmul']:6.1f}%"
    )
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
