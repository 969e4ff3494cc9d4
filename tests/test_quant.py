"""model.quantization (maxlm/model/quant.py): fp8 and int8 projection matmuls on CPU: error bounds against bf16,
finite gradients, the model's einsums, a tiny run that tracks the bf16 one, and the quantized dtypes in the program."""

import functools
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm.errors import UserError
from maxlm.model import quant
from maxlm.training import loop

from conftest import make_config

# Relative L2 error bounds against an f32 reference, for bf16 inputs (measured: fp8 3.6% forward, 4.6-5.6% gradients;
# int8 1.0% and 1.1-1.2%; bf16 itself 0.2%).
BOUNDS = {"none": (0.005, 0.005), "fp8": (0.06, 0.08), "int8": (0.02, 0.025)}
# Every einsum the model sends through quant.dot: attention, MLP (gate/up concatenated, or stacked where the mlp axis
# is split), MoE capacity and CPU grouped tiles.
EQUATIONS = {
  "btd,dhk->bthk": ((2, 16, 64), (64, 4, 32)),
  "btd,df->btf": ((2, 16, 64), (64, 192)),
  "bthk,hkd->btd": ((2, 16, 4, 32), (4, 32, 64)),
  "btd,jdf->btjf": ((2, 16, 64), (2, 64, 96)),
  "btf,fd->btd": ((2, 16, 96), (96, 64)),
  "ecd,edf->ecf": ((4, 24, 64), (4, 64, 48)),
  "ptk,pkn->ptn": ((5, 8, 64), (5, 64, 48)),
}


def rel(a, b):
  return float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("quantization", ["none", "fp8", "int8"])
@pytest.mark.parametrize("equation", sorted(EQUATIONS))
def test_dot_is_the_einsum_within_bounds_with_finite_gradients(equation, quantization):
  x_shape, w_shape = EQUATIONS[equation]
  kx, kw = jax.random.split(jax.random.key(len(equation)))
  x = jax.random.normal(kx, x_shape, jnp.bfloat16)
  w = (jax.random.normal(kw, w_shape, jnp.float32) * w_shape[-2] ** -0.5).astype(jnp.bfloat16)
  loss = lambda x, w, f: (f(x, w).astype(jnp.float32) ** 2).sum()
  reference = lambda x, w: jnp.einsum(equation, x.astype(jnp.float32), w.astype(jnp.float32))
  quantized = lambda x, w: quant.dot(equation, x, w, quantization)
  y = jax.jit(quantized)(x, w)
  assert y.shape == reference(x, w).shape and y.dtype == jnp.bfloat16
  forward, backward = BOUNDS[quantization]
  assert rel(y, reference(x, w)) < forward
  grads = jax.jit(jax.grad(lambda x, w: loss(x, w, quantized), argnums=(0, 1)))(x, w)
  expected = jax.grad(lambda x, w: loss(x, w, reference), argnums=(0, 1))(x.astype(jnp.float32), w.astype(jnp.float32))
  for g, e in zip(grads, expected):
    assert bool(jnp.isfinite(g).all()) and rel(g, e) < backward


def test_projections_take_the_written_out_vjp_and_match_the_einsum_in_f32():
  """quant.dot's projections ([M, K]·[K, N] with dx = dy·wᵀ, dw = xᵀ·dy) give the einsum's values and gradients; other
  contractions (batch axes, permuted outputs) stay einsums."""
  projections = {"btd,dhk->bthk": 1, "bthk,hkd->btd": 2, "btd,df->btf": 1, "btf,fd->btd": 1}
  for equation in EQUATIONS:
    assert quant._projection(equation) == projections.get(equation, 0), equation
  assert quant._projection("btd,dhk->btkh") == 0  # a permuted output
  x, w = jnp.arange(6.0).reshape(2, 3), jnp.arange(3.0)
  np.testing.assert_allclose(quant.dot("bd,d->b", x, w), jnp.einsum("bd,d->b", x, w))  # w fully contracted
  for equation in EQUATIONS:
    x_shape, w_shape = EQUATIONS[equation]
    x = jax.random.normal(jax.random.key(0), x_shape)
    w = jax.random.normal(jax.random.key(1), w_shape)
    cotangent = jax.random.normal(jax.random.key(2), jnp.einsum(equation, x, w).shape)
    y, vjp = jax.vjp(functools.partial(quant.dot, equation), x, w)
    y_ref, vjp_ref = jax.vjp(functools.partial(jnp.einsum, equation), x, w)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(vjp(cotangent), vjp_ref(cotangent)):
      np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-4)
  jaxpr = jax.make_jaxpr(lambda x, w: quant.dot("btd,df->btf", x, w))(jnp.ones((2, 4, 8)), jnp.ones((8, 6)))
  assert "custom_vjp_call" in str(jaxpr)


@pytest.mark.parametrize("quantization", ["fp8", "int8"])
def test_ragged_dot_within_bounds(quantization):
  kx, kw = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (24, 64), jnp.bfloat16)
  w = (jax.random.normal(kw, (3, 64, 32)) * 0.125).astype(jnp.bfloat16)
  groups = jnp.array([8, 10, 6], jnp.int32)
  expected = jax.lax.ragged_dot(x.astype(jnp.float32), w.astype(jnp.float32), groups)
  assert rel(quant.ragged_dot(x, w, groups, quantization), expected) < BOUNDS[quantization][0]
  grads = jax.grad(lambda x, w: (quant.ragged_dot(x, w, groups, quantization).astype(jnp.float32) ** 2).sum(), (0, 1))(
    x, w
  )
  assert all(bool(jnp.isfinite(g).all()) for g in grads)


RUN = {
  "train.steps": 30,
  "train.log_every": 1,
  "train.eval_every": 0,
  "metrics.tensorboard": False,
  "metrics.peak_tflops": 1.0,
  "checkpoint.every_steps": 0,
  "model.compute_dtype": "bfloat16",
}


def losses(**overrides):
  records = loop.run(make_config(**{**RUN, **overrides}), tempfile.mkdtemp(), devices=jax.devices()[:1])
  return np.array([r["loss"] for r in records])


@pytest.fixture(scope="module")
def reference():
  return losses()


@pytest.mark.parametrize("quantization, tolerance", [("fp8", 0.02), ("int8", 0.01)])
def test_a_tiny_run_tracks_the_bf16_one(reference, quantization, tolerance):
  quantized = losses(**{"model.quantization": quantization})
  assert reference[-1] < reference[0] - 0.5  # it learns
  assert np.abs(quantized - reference).max() < tolerance  # measured: fp8 0.008, int8 0.002
  assert not np.array_equal(quantized, reference)  # and is not the bf16 run


def test_moe_experts_are_quantized_both_ways():
  moe = {"model.moe.num_experts": 4, "model.moe.top_k": 2, "model.quantization": "fp8", "train.steps": 2}
  moe["model.num_layers"] = 1
  for capacity in (0.0, 1.5):  # dropless (grouped tiles on CPU) and capacity buffers
    assert np.isfinite(losses(**moe, **{"model.moe.capacity_factor": capacity})).all()


@pytest.mark.parametrize("quantization, dtypes", [("fp8", ("f8E4M3FN", "f8E5M2")), ("int8", ("i8",))])
def test_the_train_step_program_holds_the_quantized_types(quantization, dtypes):
  cfg = make_config(**{**RUN, "model.quantization": quantization})
  text = loop.step_lib.build_step(cfg, jax.devices()[:1]).lower().as_text()
  for dtype in dtypes:
    assert len(re.findall(rf"tensor<[\dx]*x{dtype}>", text)) > 10, dtype
  plain = loop.step_lib.build_step(make_config(**RUN), jax.devices()[:1]).lower().as_text()
  assert not re.search(r"tensor<[\dx]*x(f8E4M3FN|f8E5M2|i8)>", plain)


def test_megablox_has_no_quantized_form():
  with pytest.raises(UserError, match=r"grouped_matmul='megablox' has no int8 form: use 'auto' or 'ragged_dot'"):
    make_config(**{"model.moe.num_experts": 4, "model.moe.grouped_matmul": "megablox", "model.quantization": "int8"})
