"""MoE train step against a dense model with the same active parameters, side by side on this machine.

The MoE model routes each token to 2 of 8 SwiGLU experts of width F/2, so a token's active feed-forward weights equal
the dense model's one SwiGLU of width F (plus the small router): same FLOPs counted, and the ratio of step times is
what routing, sorting, grouped matmuls and (with a capacity) the fixed buffers cost. Each variant runs through
`maxlm.perf.bench.measure` (the production step), in alternation, `--rounds` times; the medians are compared.

  python benchmarks/moe_step.py [--rounds 2] [--steps 8]

Writes benchmarks/results/moe_step_<device>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import jax

from configs import base
from maxlm import config, provenance
from maxlm.perf import bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = {"vocab_size": 4096, "d_model": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 768}
VARIANTS = {
  "dense (SwiGLU F=768)": {},
  "moe dropless (8 x F=384, top-2)": {"num_experts": 8, "top_k": 2, "mlp_dim": 384},
  "moe capacity 1.25": {"num_experts": 8, "top_k": 2, "mlp_dim": 384, "capacity_factor": 1.25},
}


def make(moe: dict):
  c = base.get_config()
  c.model.update(SHAPE)
  c.model.moe.update(moe)
  c.data.seq_len = 256
  c.train.update(global_batch=8, log_every=1000, eval_every=0)
  c.checkpoint.every_steps = 0
  c.metrics.update(tensorboard=False)
  return config.validate(c, num_devices=1)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--steps", type=int, default=8)
  args = parser.parse_args()
  device = jax.devices()[:1]
  times = {name: [] for name in VARIANTS}
  records = {}
  for _ in range(args.rounds):
    for name, moe in VARIANTS.items():
      r = bench.measure(make(moe), steps=args.steps, warmup=2, name=name, devices=device)
      times[name].append(r["step_time_s_median"])
      records[name] = r
  dense = statistics.median(times["dense (SwiGLU F=768)"])
  rows = []
  for name in VARIANTS:
    t = statistics.median(times[name])
    r = records[name]
    rows.append(
      {
        "variant": name,
        "step_ms": 1e3 * t,
        "step_ms_rounds": [1e3 * x for x in times[name]],
        "ratio_to_dense": t / dense,
        "flops_per_token": r["flops_per_token"],
        "params_m": r["params_m"],
        "mfu": r["mfu"],
      }
    )
  result = {
    "benchmark": "moe_step",
    "date": records["dense (SwiGLU F=768)"]["date"],
    "device": records["dense (SwiGLU F=768)"]["device"],
    "host": provenance.host_description(),
    "jax": jax.__version__,
    "shape": SHAPE,
    "seq_len": 256,
    "global_batch": 8,
    "rows": rows,
  }
  out = os.path.join(REPO, "benchmarks", "results", f"moe_step_{jax.devices()[0].platform}.json")
  with open(out, "w") as f:
    json.dump(result, f, indent=2)
  print("| variant | params (M) | FLOPs/token | step ms (median; rounds) | vs dense | MFU |")
  print("| --- | ---: | ---: | --- | ---: | ---: |")
  for r in rows:
    rounds = ", ".join(f"{x:.0f}" for x in r["step_ms_rounds"])
    print(
      f"| {r['variant']} | {r['params_m']:.1f} | {r['flops_per_token'] / 1e6:.1f}M | {r['step_ms']:.0f} ({rounds}) | "
      f"{r['ratio_to_dense']:.2f}x | {100 * r['mfu']:.1f}% |"
    )
  print(f"\n{result['device']}, {result['host']}, jax {result['jax']}; written to {out}")


if __name__ == "__main__":
  main()
