"""Model FLOPs per token and device peaks, for MFU = achieved model FLOP/s / peak FLOP/s.

Training FLOPs per token (PaLM appendix B; attention counted like MaxText after its causal fix):

  6 · N_matmul                 forward 2·N, backward 4·N, for every weight used in a matmul
  + 6 · L · H · Dh · T         attention scores QKᵀ and values AV: 2 · 2·T·H·Dh per token and layer in the
                               forward pass, halved for the causal mask, times 3 for forward + backward

N_matmul = L · (D·H·Dh + 2·D·K·Dh + H·Dh·D + 3·D·F) + D·V. The output projection D·V counts whether or
not it is tied to the embedding; the embedding lookup is a gather, not a matmul, and counts zero.
In an MoE layer 3·D·F becomes the *active* weights of a token: the router D·E, top_k routed experts
top_k · 3·D·Fe and the shared experts 3·D·Fs (Fe = moe.mlp_dim, Fs = shared_experts · Fe); the FLOPs
(and so MFU) count these, while `param_count` counts all E experts.
Rematerialised recomputation is not counted (it is not model FLOPs), so remat lowers MFU honestly.
Packed rows are counted as full causal rows of length T.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections

from maxlm.model import moe

# Dense bf16 peak TFLOP/s per device (datasheets). Matched against `device.device_kind`, longest key first.
PEAK_TFLOPS = {
  "TPU v4": 275.0,
  "TPU v5 lite": 197.0,  # v5e
  "TPU v5e": 197.0,
  "TPU v5p": 459.0,
  "TPU v5": 459.0,  # v5p reports "TPU v5"
  "TPU v6 lite": 918.0,  # v6e (Trillium)
  "TPU v6e": 918.0,
  "A100": 312.0,
  "H100 PCIe": 756.0,
  "H100": 989.0,
  "H200": 989.0,
  "GH200": 989.0,
}


def matmul_params(m: ml_collections.ConfigDict, active: bool = True) -> int:
  """Weights in matmuls: those one token uses (`active`, the FLOP count's N) or all of them (every expert)."""
  D, H, K, F, V, L = m.d_model, m.num_heads, m.num_kv_heads, m.mlp_dim, m.vocab_size, m.num_layers
  Dh = D // H
  attention = D * H * Dh + 2 * D * K * Dh + H * Dh * D
  e = m.moe
  moe_layers = sum(moe.is_moe_layer(m))
  Fe = moe.expert_dim(m)
  routed = (e.top_k if active else e.num_experts) * 3 * D * Fe
  moe_ff = D * e.num_experts + routed + 3 * D * e.shared_experts * Fe
  return L * attention + (L - moe_layers) * 3 * D * F + moe_layers * moe_ff + D * V


def param_count(m: ml_collections.ConfigDict) -> int:
  """All parameters: the matmul weights (every expert), the embedding if untied, and the norm scales."""
  D, H, L = m.d_model, m.num_heads, m.num_layers
  embedding = 0 if m.tie_embeddings else m.vocab_size * D
  norms = L * (2 * D + (2 * (D // H) if m.qk_norm else 0)) + D
  return matmul_params(m, active=False) + embedding + norms


def training_flops_per_token(m: ml_collections.ConfigDict, seq_len: int) -> float:
  attention = 6 * m.num_layers * m.num_heads * (m.d_model // m.num_heads) * seq_len
  return 6.0 * matmul_params(m) + attention


def device_peak_tflops(device: jax.Device) -> float | None:
  """Datasheet bf16 peak for a known accelerator, else None."""
  kind = device.device_kind
  for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
    if key in kind:
      return PEAK_TFLOPS[key]
  return None


def measure_matmul_tflops(dtype=jnp.float32, n: int = 2048, repeats: int = 5, device=None) -> float:
  """Median rate of an n³ matmul on one device: the peak used for MFU where no datasheet figure applies."""
  device = device or jax.devices()[0]
  a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), dtype), device)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n**3 / sorted(times)[len(times) // 2] / 1e12


def peak_tflops_per_device(configured: float, compute_dtype: str, devices) -> tuple[float, str]:
  """(per-device peak TFLOP/s for MFU, where it comes from): `metrics.peak_tflops` when set (`configured` > 0),
  else the datasheet figure, else (CPU) a matmul measured now in the compute dtype."""
  if configured > 0:
    return configured, "metrics.peak_tflops from the config"
  datasheet = device_peak_tflops(devices[0])
  if datasheet is not None:
    return datasheet, f"datasheet bf16 peak of {devices[0].device_kind}"
  measured = measure_matmul_tflops(jnp.dtype(compute_dtype), device=devices[0])
  # Fake CPU devices share the host's cores, so each gets an equal share of the host's rate.
  local = sum(d.process_index == jax.process_index() for d in devices)
  return measured / local, (
    f"MEASURED peak: {measured * 1e3:.1f} GFLOP/s for a 2048^3 {compute_dtype} "
    f"matmul on {devices[0].platform}, shared by {local} local device(s)"
  )
