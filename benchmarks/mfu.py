"""MFU sweep: `maxlm bench` over several configs and variants, one process each (clean device memory).

Each run writes benchmarks/results/bench_<device>_<config>.json (the last run of a config wins) and appends
a row to benchmarks/results/mfu.md; this script also writes all of this sweep's records to
benchmarks/results/mfu_sweep_<preset>.json and prints a table.

  python benchmarks/mfu.py --preset gpu            # one H100/H200: gpt2_124m and llama_1b variants
  python benchmarks/mfu.py --preset cpu --steps 5  # tiny and cpu_10m
  python benchmarks/mfu.py --only gpt2_124m/cudnn  # one variant of a preset (names as printed)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MOE_ONE_DEVICE = [
  "--config.mesh.data=-1",
  "--config.mesh.fsdp=1",
  "--config.mesh.expert=1",
  "--config.train.global_batch=4",
  "--config.train.microbatches=1",
]
# (name, config, overrides). Batches are per step with no accumulation: the step is what is timed.
PRESETS = {
  "cpu": [
    ("tiny", "tiny", []),
    ("cpu_10m", "cpu_10m", []),
    ("cpu_10m/chunked_loss", "cpu_10m", ["--config.train.loss_chunk=64"]),
    ("moe_tiny", "moe_tiny", []),
  ],
  "gpu": [
    (
      "gpt2_124m/xla",
      "gpt2_124m",
      ["--config.train.global_batch=16", "--config.train.microbatches=1", "--config.model.attention=xla"],
    ),
    (
      "gpt2_124m/cudnn",
      "gpt2_124m",
      ["--config.train.global_batch=16", "--config.train.microbatches=1", "--config.model.attention=cudnn"],
    ),
    (
      "gpt2_124m/cudnn_unrolled",
      "gpt2_124m",
      [
        "--config.train.global_batch=16",
        "--config.train.microbatches=1",
        "--config.model.attention=cudnn",
        "--config.model.scan_layers=false",
      ],
    ),
    (
      "gpt2_124m/cudnn_fp8",
      "gpt2_124m",
      [
        "--config.train.global_batch=16",
        "--config.train.microbatches=1",
        "--config.model.attention=cudnn",
        "--config.model.quantization=fp8",
      ],
    ),
    ("llama_1b/dots_no_batch", "llama_1b", ["--config.train.global_batch=8", "--config.model.remat=dots_no_batch"]),
    (
      "llama_1b/dots_no_batch_fp8",
      "llama_1b",
      ["--config.train.global_batch=8", "--config.model.remat=dots_no_batch", "--config.model.quantization=fp8"],
    ),
    ("llama_1b/no_remat", "llama_1b", ["--config.train.global_batch=4", "--config.model.remat=none"]),
    ("llama_1b/full_remat", "llama_1b", ["--config.train.global_batch=16", "--config.model.remat=full"]),
    # MoE, cut to fit one device (MFU counts active parameters): dropless ragged_dot, then capacity-factor 1.25.
    ("mixtral_8x7b/2_layers", "mixtral_8x7b", MOE_ONE_DEVICE + ["--config.model.num_layers=2"]),
    ("deepseek_moe_16b/4_layers", "deepseek_moe_16b", MOE_ONE_DEVICE + ["--config.model.num_layers=4"]),
    (
      "deepseek_moe_16b/4_layers_capacity",
      "deepseek_moe_16b",
      MOE_ONE_DEVICE + ["--config.model.num_layers=4", "--config.model.moe.capacity_factor=1.25"],
    ),
  ],
  "tpu": [
    ("gpt2_124m/splash", "gpt2_124m", ["--config.train.global_batch=32", "--config.train.microbatches=1"]),
    ("llama_1b/splash", "llama_1b", ["--config.train.global_batch=16"]),
    ("llama_1b/splash_int8", "llama_1b", ["--config.train.global_batch=16", "--config.model.quantization=int8"]),
    ("deepseek_moe_16b/4_layers", "deepseek_moe_16b", MOE_ONE_DEVICE + ["--config.model.num_layers=4"]),
  ],
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=PRESETS, default="cpu")
  parser.add_argument("--only", default="", help="comma-separated variant names of the preset")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--results_dir", default=os.path.join(REPO, "benchmarks", "results"))
  args = parser.parse_args()
  variants = [v for v in PRESETS[args.preset] if not args.only or v[0] in args.only.split(",")]
  if not variants:
    sys.exit(f"--only={args.only!r} names no variant of preset {args.preset}: {[v[0] for v in PRESETS[args.preset]]}")
  records = []
  for name, cfg, overrides in variants:
    cmd = [
      sys.executable,
      "-m",
      "maxlm",
      "bench",
      f"--config={REPO}/configs/{cfg}.py",
      f"--steps={args.steps}",
      f"--warmup={args.warmup}",
      f"--results_dir={args.results_dir}",
      *overrides,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
      print(f"{name}: failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}", flush=True)
      records.append({"variant": name, "error": proc.stderr[-2000:]})
      continue
    record = {"variant": name, "overrides": overrides, **json.loads(proc.stdout.strip().splitlines()[-1])}
    records.append(record)
    print(
      f"{name:28} {1e3 * record['step_time_s_median']:9.1f} ms {record['tokens_per_sec_per_device']:12,.0f} tok/s/dev "
      f"{record['tflops_per_device']:8.3g} TFLOP/s  MFU {100 * record['mfu']:5.1f}%  "
      f"mem {record['peak_memory_bytes'] / 2**30:6.2f} GiB",
      flush=True,
    )
  path = os.path.join(args.results_dir, f"mfu_sweep_{args.preset}.json")
  with open(path, "w") as f:
    json.dump(records, f, indent=2)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
