"""Host memory of `maxlm convert`: does an import or export hold one tensor at a time, not the model?

Writes a synthetic Llama checkpoint (random bf16 safetensors, sharded; no torch), imports it to float32,
exports it back to bf16, and samples the process's anonymous resident memory (RssAnon: what the process
allocated, not the page cache of memory-mapped files) every 10 ms. Reports each step's peak above the
baseline before it, next to the model size and the largest single tensor.
Writes benchmarks/results/convert_memory_<platform>.json.

  python benchmarks/convert_memory.py [--layers 16] [--d_model 1024] [--mlp_dim 2816] [--vocab 32000]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import threading
import time

import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from maxlm.interop import hf  # noqa: E402


def rss_anon_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("RssAnon:"):
        return int(line.split()[1]) / 1024
  raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


class PeakMemory:
  """Peak RssAnon above the level at entry, sampled in a thread."""

  def __enter__(self):
    self.base = self.peak = rss_anon_mb()
    self.done = False
    self.thread = threading.Thread(target=self._sample, daemon=True)
    self.thread.start()
    self.t0 = time.perf_counter()
    return self

  def _sample(self):
    while not self.done:
      self.peak = max(self.peak, rss_anon_mb())
      time.sleep(0.01)

  def __exit__(self, *exc):
    self.seconds = time.perf_counter() - self.t0
    self.done = True
    self.thread.join()
    self.above_mb = self.peak - self.base


def write_checkpoint(directory: str, L: int, D: int, F: int, V: int, H: int, K: int, shard_bytes: int) -> dict:
  """A random LlamaForCausalLM checkpoint in bf16 safetensors shards of about `shard_bytes`."""
  Dh = D // H
  hf_cfg = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": V,
    "hidden_size": D,
    "intermediate_size": F,
    "num_hidden_layers": L,
    "num_attention_heads": H,
    "num_key_value_heads": K,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 5e5,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
  }
  shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
  for i in range(L):
    p = f"model.layers.{i}."
    shapes.update(
      {
        p + "self_attn.q_proj.weight": (H * Dh, D),
        p + "self_attn.k_proj.weight": (K * Dh, D),
        p + "self_attn.v_proj.weight": (K * Dh, D),
        p + "self_attn.o_proj.weight": (D, H * Dh),
        p + "mlp.gate_proj.weight": (F, D),
        p + "mlp.up_proj.weight": (F, D),
        p + "mlp.down_proj.weight": (D, F),
        p + "input_layernorm.weight": (D,),
        p + "post_attention_layernorm.weight": (D,),
      }
    )
  rng = np.random.default_rng(0)
  shards, current, size = [], {}, 0
  for name, shape in shapes.items():
    current[name] = (0.02 * rng.standard_normal(shape, np.float32)).astype(ml_dtypes.bfloat16)
    size += current[name].nbytes
    if size >= shard_bytes:
      shards.append(current)
      current, size = {}, 0
  if current:
    shards.append(current)
  weight_map = {}
  for k, tensors in enumerate(shards):
    name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(tensors, os.path.join(directory, name), metadata={"format": "pt"})
    weight_map.update({t: name for t in tensors})
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf_cfg, f)
  params = sum(int(np.prod(s)) for s in shapes.values())
  # maxlm arrays: the embedding and head as they are, every per-layer tensor stacked over the L layers.
  largest_maxlm = max(V * D, L * max(F * D, H * Dh * D))
  return {
    "params_m": params / 1e6,
    "largest_hf_tensor_params_m": max(int(np.prod(s)) for s in shapes.values()) / 1e6,
    "largest_maxlm_array_params_m": largest_maxlm / 1e6,
    "bf16_mb": 2 * params / 2**20,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=16)
  parser.add_argument("--d_model", type=int, default=1024)
  parser.add_argument("--mlp_dim", type=int, default=2816)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--kv_heads", type=int, default=4)
  args = parser.parse_args()
  root = tempfile.mkdtemp(prefix="convert_memory_")
  try:
    os.makedirs(f"{root}/hf")
    model = write_checkpoint(
      f"{root}/hf",
      args.layers,
      args.d_model,
      args.mlp_dim,
      args.vocab,
      args.heads,
      args.kv_heads,
      shard_bytes=200 * 2**20,
    )
    with PeakMemory() as imported:
      hf.from_hf(f"{root}/hf", f"{root}/run", param_dtype="float32")
    with PeakMemory() as exported:
      hf.to_hf(f"{root}/run", f"{root}/out", dtype="bfloat16", max_shard_bytes=500 * 10**6)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  device = jax.devices("cpu")[0]
  result = {
    "benchmark": "convert_memory",
    "date": datetime.date.today().isoformat(),
    "platform": device.platform,
    "host_cores": os.cpu_count(),
    "jax": jax.__version__,
    **model,
    "f32_mb": 2 * model["bf16_mb"],
    "import_bf16_to_f32_s": imported.seconds,
    "import_peak_anon_above_baseline_mb": imported.above_mb,
    "export_f32_to_bf16_s": exported.seconds,
    "export_peak_anon_above_baseline_mb": exported.above_mb,
    "largest_maxlm_array_f32_mb": 4 * model["largest_maxlm_array_params_m"] * 1e6 / 2**20,
  }
  os.makedirs(f"{REPO}/benchmarks/results", exist_ok=True)
  with open(f"{REPO}/benchmarks/results/convert_memory_{device.platform}.json", "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
