"""The floor a CPU train step's matmuls set: every projection matmul of one step timed alone, in XLA:CPU and PyTorch.

For a config's shape (tokens M = batch · seq_len), the step's projection and output-head products in the three
orientations autodiff needs: forward x[M,K]·w[K,N], input gradient dy[M,N]·wᵀ, weight gradient xᵀ·dy, each shape
timed alone (median of `--repeats`) and multiplied by how often the step runs it. The sums are what the step would
take if it did nothing but these matmuls, one at a time, with each library's kernels: JAX's (XLA:CPU: YNNPACK or
Eigen) and PyTorch's (oneDNN/MKL), in alternating rounds so that a drifting host slows both alike. Attention's
score products are not included (a few % of the FLOPs); each JAX call includes its dispatch (tens of µs).
Compare with `nanogpt_compare.py`'s step times.

  python benchmarks/matmul_floor.py --config cpu_10m --batch 8 [--rounds 4] [--config.model.mlp_dim=683 ...]

Writes benchmarks/results/matmul_floor_cpu_<config>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics

import jax
import numpy as np

from maxlm import config, provenance

from timing import median_seconds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def products(m) -> list[tuple[str, int, int, int]]:
  """(name, K, N, runs per step) of the projections x[M,K]·w[K,N]: per layer q, k, v, o, gate+up, down; the head."""
  dh = m.d_model // m.num_heads
  layer = [
    ("q", m.d_model, m.num_heads * dh),
    ("k", m.d_model, m.num_kv_heads * dh),
    ("v", m.d_model, m.num_kv_heads * dh),
    ("o", m.num_heads * dh, m.d_model),
    ("gate_up", m.d_model, 2 * m.mlp_dim),
    ("down", m.mlp_dim, m.d_model),
  ]
  return [(name, k, n, m.num_layers) for name, k, n in layer] + [("head", m.d_model, m.vocab_size, 1)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="cpu_10m")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=5, help="timings per shape per round (median)")
  parser.add_argument("--results_dir", default=os.path.join(REPO, "benchmarks", "results"))
  args, overrides = parser.parse_known_args()
  cfg = config.load([f"--config={REPO}/configs/{args.config}.py", *overrides])
  M = args.batch * cfg.data.seq_len
  try:
    import torch
  except ImportError:
    torch = None
  rng = np.random.default_rng(0)
  jax_fns = {
    "forward": jax.jit(lambda x, w, g: x @ w),
    "input_grad": jax.jit(lambda x, w, g: g @ w.T),
    "weight_grad": jax.jit(lambda x, w, g: x.T @ g),
  }
  torch_fns = {
    "forward": lambda x, w, g: x @ w,
    "input_grad": lambda x, w, g: g @ w.T,
    "weight_grad": lambda x, w, g: x.T @ g,
  }
  rows = []
  for name, k, n, runs in products(cfg.model):
    x, w, g = (rng.standard_normal(shape, np.float32) for shape in ((M, k), (k, n), (M, n)))
    arrays = (jax.device_put(x), jax.device_put(w), jax.device_put(g))
    tensors = tuple(torch.from_numpy(a) for a in (x, w, g)) if torch else None
    for kind in jax_fns:
      rows.append({"product": name, "kind": kind, "M": M, "K": k, "N": n, "runs_per_step": runs, "jax_s": []})
      rows[-1]["call"] = (kind, arrays, tensors)
      if torch:
        rows[-1]["torch_s"] = []
  sums = {"jax": [], "torch": []}
  for r in range(args.rounds):
    for side in ("jax", "torch") if r % 2 == 0 else ("torch", "jax"):
      if side == "torch" and not torch:
        continue
      total = 0.0
      for row in rows:
        kind, arrays, tensors = row["call"]
        fn, operands = (jax_fns[kind], arrays) if side == "jax" else (torch_fns[kind], tensors)
        s = median_seconds(fn, operands, args.repeats)
        row[f"{side}_s"].append(s)
        total += s * row["runs_per_step"]
      sums[side].append(total)
    print(f"round {r + 1}/{args.rounds}: " + "  ".join(f"{k} {1e3 * v[-1]:.0f} ms" for k, v in sums.items() if v))
  gflop = sum(2 * row["M"] * row["K"] * row["N"] * row["runs_per_step"] for row in rows) / 1e9
  for row in rows:
    del row["call"]
    for side in ("jax", "torch"):
      if f"{side}_s" in row:
        row[f"{side}_gflops"] = 2 * row["M"] * row["K"] * row["N"] / statistics.median(row[f"{side}_s"]) / 1e9
  result = {
    "benchmark": "matmul_floor",
    "date": datetime.date.today().isoformat(),
    "config": args.config,
    "overrides": overrides,
    "host": provenance.host_description(),
    "jax": jax.__version__,
    "torch": torch.__version__ if torch else None,
    "torch_threads": torch.get_num_threads() if torch else None,
    "tokens": M,
    "gflop_per_step": gflop,
    "step_matmul_s": {k: statistics.median(v) for k, v in sums.items() if v},
    "rounds": {k: v for k, v in sums.items() if v},
    "products": rows,
  }
  os.makedirs(args.results_dir, exist_ok=True)
  path = os.path.join(args.results_dir, f"matmul_floor_cpu_{args.config}.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  for side, s in result["step_matmul_s"].items():
    print(
      f"{side:6} the step's projection matmuls alone: {1e3 * s:.0f} ms ({gflop:.1f} GFLOP, {gflop / s:.0f} GFLOP/s)"
    )
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
