"""Attention kernels on this machine's backend: numerics against `xla` and forward+backward time.

For each shape (GQA, packed rows of several documents) and each kernel available here (cudnn on a GPU,
splash on a TPU, both also against xla), reports the largest output and gradient differences from
`attention.xla_attention` in the benchmark dtype, and the median forward+backward time of each. Writes
benchmarks/results/attention_check_<device>.json.

  python benchmarks/attention_check.py [--dtype bfloat16] [--repeats 10]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from maxlm.model import attention, kernels
from maxlm.perf import bench

from timing import median_seconds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (B, T, H, K, Dh): GPT-2-124M-like, Llama-1B-like, Llama-8B-like at a shorter T.
SHAPES = [(16, 1024, 12, 12, 64), (4, 2048, 32, 8, 64), (1, 4096, 32, 8, 128)]


def inputs(B, T, H, K, Dh, dtype):
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (B, T, H, Dh), dtype)
  k = jax.random.normal(keys[1], (B, T, K, Dh), dtype)
  v = jax.random.normal(keys[2], (B, T, K, Dh), dtype)
  lengths = np.random.default_rng(0).integers(T // 8, T, size=(B, 4))  # ~4 documents per row
  segments = np.ones((B, T), np.int32)
  for b in range(B):
    for i, start in enumerate(sorted(lengths[b])):
      segments[b, start:] = i + 2
  return q, k, v, jnp.asarray(segments)


def fwd_bwd(attention):
  def loss(q, k, v, segments):
    out = attention(q, k, v, segments)
    return jnp.sum(out.astype(jnp.float32) ** 2), out

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--results_dir", default=os.path.join(REPO, "benchmarks", "results"))
  args = parser.parse_args()
  backend = jax.default_backend()
  candidates = {"gpu": {"cudnn": kernels.cudnn_attention}, "tpu": {"splash": kernels.splash_attention}}.get(
    backend, {"splash (interpreted)": kernels.splash_attention}
  )
  shapes = SHAPES if backend != "cpu" else [(2, 256, 4, 2, 32)]
  dtype = jnp.dtype(args.dtype if backend != "cpu" else "float32")
  rows = []
  for shape in shapes:
    q, k, v, segments = inputs(*shape, dtype)
    ref = fwd_bwd(attention.xla_attention)
    (_, ref_out), ref_grads = ref(q, k, v, segments)
    row = {"shape_BxTxHxKxDh": shape, "xla_ms": 1e3 * median_seconds(ref, (q, k, v, segments), args.repeats)}
    for name, kernel in candidates.items():
      f = fwd_bwd(kernel)
      (_, out), grads = f(q, k, v, segments)
      err = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
      row[name] = {
        "max_abs_out_diff": err(out, ref_out),
        "max_abs_grad_diff": [err(g, r) for g, r in zip(grads, ref_grads)],
        "ms": 1e3 * median_seconds(f, (q, k, v, segments), args.repeats),
      }
      row[name]["speedup_vs_xla"] = row["xla_ms"] / row[name]["ms"]
    rows.append(row)
    print(json.dumps(row), flush=True)
  device = jax.devices()[0]
  result = {
    "benchmark": "attention_check",
    "date": datetime.date.today().isoformat(),
    "device": device.device_kind,
    "jax": jax.__version__,
    "dtype": str(dtype),
    "rows": rows,
    "note": "forward+backward of sum(out^2); diffs are against attention.xla_attention in the same dtype",
  }
  os.makedirs(args.results_dir, exist_ok=True)
  slug = bench.device_slug(device.device_kind)
  path = os.path.join(args.results_dir, f"attention_check_{slug}.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
