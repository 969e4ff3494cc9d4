"""MFU's FLOP count: a hand count for the tiny config, and XLA's own count of a compiled step."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from maxlm.model import attention, flops, transformer

from conftest import make_config


def test_tiny_config_hand_count():
  m = make_config().model  # V=256 D=64 N=2 H=4 K=2 Dh=16 F=192, T=64
  per_layer = 64 * 4 * 16 + 2 * 64 * 2 * 16 + 4 * 16 * 64 + 3 * 64 * 192  # q, k+v, o, SwiGLU = 49,152
  n_matmul = 2 * per_layer + 64 * 256  # + output projection = 114,688
  assert flops.matmul_params(m) == n_matmul
  attention = 6 * 2 * 4 * 16 * 64  # 6·N·H·Dh·T: causal half of 2 matmuls × 2 FLOPs, × 3 for fwd+bwd
  assert flops.training_flops_per_token(m, 64) == 6 * n_matmul + attention == 737_280
  # Parameters: matmul weights (embedding tied to the output projection) + 2 norms per layer + final norm.
  assert flops.param_count(m) == n_matmul + 2 * 2 * 64 + 64


@pytest.mark.parametrize(
  "overrides", [{}, {"model.d_model": 128, "model.mlp_dim": 384, "model.vocab_size": 512, "data.seq_len": 128}]
)
def test_analytic_count_agrees_with_xla_cost_analysis(overrides):
  """XLA counts the scores `xla_attention` computes: with nb query blocks (nb+1)/(2·nb) of the T×T matrix
  (all of it for one block), against the causal half in the formula; plus elementwise work."""
  cfg = make_config(**{"model.scan_layers": False, **overrides})  # cost_analysis counts a scan body once.
  m, T, B = cfg.model, cfg.data.seq_len, 4
  graphdef, params = nnx.split(transformer.create(m, 0))
  tokens = jnp.zeros((B, T), jnp.int32)

  def loss(p):
    return jnp.sum(jax.nn.logsumexp(nnx.merge(graphdef, p)(tokens), -1))

  xla_per_token = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()["flops"] / (B * T)
  blocks = T // attention.query_block(T)
  scored = flops.training_flops_per_token(m, T) + 6 * m.num_layers * m.d_model * T * (1 / blocks)
  assert scored <= xla_per_token <= 1.06 * scored


def test_device_peaks():
  class Dev:
    def __init__(self, kind):
      self.device_kind = kind

  assert flops.device_peak_tflops(Dev("NVIDIA H100 80GB HBM3")) == 989.0
  assert flops.device_peak_tflops(Dev("NVIDIA H100 PCIe")) == 756.0
  assert flops.device_peak_tflops(Dev("TPU v5 lite")) == 197.0
  assert flops.device_peak_tflops(Dev("TPU v5")) == 459.0
  assert flops.device_peak_tflops(Dev("TPU v6 lite")) == 918.0
  assert flops.device_peak_tflops(Dev("cpu")) is None
