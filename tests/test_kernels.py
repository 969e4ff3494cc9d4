"""Fused attention kernels against `model.xla_attention`: outputs and gradients, with GQA and packed rows.

cuDNN cannot run on a CPU, so its test runs our exact `jax.nn.dot_product_attention` call with
implementation="xla" (it checks the layout, mask and scale we pass; the kernel itself is checked against
xla on a GPU by the benchmarks). Splash runs in Pallas interpret mode on CPU, the same kernel code TPUs run.
"""

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm.errors import UserError
from maxlm.model import attention, kernels, transformer
from maxlm.parallel import mesh as mesh_lib

from conftest import make_config

B, T, H, K, Dh = 4, 128, 4, 2, 16
KERNELS = {
  "splash": kernels.splash_attention,
  "cudnn_call": functools.partial(kernels.cudnn_attention, implementation="xla"),
}


def inputs():
  rng = np.random.default_rng(0)
  q, k, v = (
    jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in [(B, T, H, Dh), (B, T, K, Dh), (B, T, K, Dh)]
  )
  # Rows with 1, 2 and 3 documents, and one whose documents are single tokens at the start.
  segments = np.ones((B, T), np.int32)
  segments[1, 50:] = 2
  segments[2, 30:], segments[2, 90:] = 2, 3
  segments[3, :4] = [5, 6, 7, 8]
  return q, k, v, jnp.asarray(segments)


def loss_and_grads(attention, q, k, v, segments):
  def loss(q, k, v):
    out = attention(q, k, v, segments)
    return jnp.sum(out * jnp.cos(out)), out  # A nonlinear readout: every output element's gradient differs.

  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("mesh_sizes", [None, {"data": 2, "fsdp": 2, "tensor": 2}], ids=["one-device", "d2f2t2"])
def test_kernel_matches_xla_attention(name, mesh_sizes, devices):
  args = inputs()
  want_out, want_grads = jax.jit(functools.partial(loss_and_grads, attention.xla_attention))(*args)
  run = jax.jit(functools.partial(loss_and_grads, KERNELS[name]))
  if mesh_sizes:
    with jax.set_mesh(mesh_lib.mesh_of(devices, **mesh_sizes)):
      got_out, got_grads = run(*args)
  else:
    got_out, got_grads = run(*args)
  np.testing.assert_allclose(got_out, want_out, rtol=1e-5, atol=1e-5)
  for got, want in zip(got_grads, want_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_splash_in_the_model_matches_xla():
  tokens = jax.random.randint(jax.random.key(0), (2, 128), 0, 256)
  segments = jnp.asarray(np.repeat([[1] * 60 + [2] * 68], 2, 0))
  positions = jnp.asarray(np.repeat([np.r_[np.arange(60), np.arange(68)]], 2, 0))
  logits = {}
  for name in ("xla", "splash"):
    m = transformer.create(make_config(**{"model.attention": name, "data.seq_len": 128}).model, seed=2)
    logits[name] = np.asarray(m(tokens, positions, segments))
  np.testing.assert_allclose(logits["splash"], logits["xla"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
  "platform, dtype, seq_len, expected",
  [
    ("cpu", "auto", 64, "xla"),
    ("gpu", "auto", 64, "cudnn"),
    ("gpu", "float32", 64, "xla"),
    ("tpu", "auto", 256, "splash"),
    ("tpu", "auto", 100, "xla"),
  ],
)
def test_auto_attention_per_platform(platform, dtype, seq_len, expected):
  from configs import base
  from maxlm import config

  cfg = base.get_config()
  cfg.model.compute_dtype, cfg.data.seq_len = dtype, seq_len
  assert config.validate(cfg, num_devices=1, platform=platform).model.attention == expected


@pytest.mark.parametrize(
  "platform, overrides, message",
  [
    ("cpu", {"model.attention": "cudnn"}, "model.attention='cudnn' needs a GPU"),
    ("gpu", {"model.attention": "cudnn", "model.compute_dtype": "float32"}, "compute_dtype='bfloat16'"),
    ("gpu", {"model.attention": "splash"}, "'splash' is a TPU kernel"),
    ("tpu", {"model.attention": "splash", "data.seq_len": 100}, "divisible by 128"),
  ],
)
def test_attention_choice_errors(platform, overrides, message):
  from configs import base
  from maxlm import config

  cfg = base.get_config()
  for key, value in overrides.items():
    group, name = key.split(".")
    cfg[group][name] = value
  with pytest.raises(UserError, match=message):
    config.validate(cfg, num_devices=1, platform=platform)


@pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason="libtpu not installed: pip install -e '.[dev,tpu]' (make test does)",
)
def test_splash_lowers_to_the_mosaic_kernel_for_a_tpu_from_this_host():
  """`auto` picks splash for a TPU; lowering for a TPU topology takes the compiled kernel's branch."""
  from configs import base
  from maxlm import config
  from maxlm.perf import aot
  from maxlm.training import step as step_lib

  devices = aot.topology_devices("v5e:2x2")
  cfg = base.get_config()
  cfg.data.seq_len, cfg.mesh.fsdp, cfg.mesh.tensor = 256, 2, 2
  cfg = config.validate(cfg, num_devices=4, platform="tpu")
  assert cfg.model.attention == "splash"
  program = step_lib.build_step(cfg, devices)
  hlo = program.lower().as_text()
  assert "tpu_custom_call" in hlo  # The Mosaic kernel (forward and backward), not the interpreter's HLO.
  program.lower().compile()  # The TPU compiler accepts it.
