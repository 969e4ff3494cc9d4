"""Training matmuls: the one `dot` (and `ragged_dot`) of the attention, MLP and MoE projections, in the compute dtype
or at low precision.

`model.quantization` (configs/base.py QUANTIZATIONS):
  none   the einsum in the compute dtype. A projection (x's trailing axes contracted with w's leading ones) runs as
         one [M, K] x [K, N] matmul with a written-out VJP: dx = dy·wᵀ, dw = xᵀ·dy (`_matmul`).
  fp8    (H100/H200) operands cast to float8_e4m3fn and incoming gradients to float8_e5m2, each with a current absmax
         scale per row (per output channel for the weight): the forward dot is e4m3 x e4m3, the two backward dots
         e5m2 x e4m3; outputs in the compute dtype.
  int8   (TPU) operands and incoming gradients int8 with the same rowwise scales: the three dots int8 x int8 -> int32.

The quantized dots are qwix's (`dot_general_qt`, `ragged_dot_qt`: custom VJPs that quantize in the forward and the
backward pass), pinned exactly because they live under `qwix._src`. The embedding lookup, the router, the output
head (the loss) and attention's scores and values stay in the compute dtype: they are where low precision costs
the most loss for the least time.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


@functools.cache
def _configs() -> dict:
  from qwix._src.core import dot_general_qt, ragged_dot_qt  # noqa: PLC0415  Only for quantized runs.

  e4m3, e5m2 = jnp.float8_e4m3fn, jnp.float8_e5m2
  forward = {"fp8": (e4m3, e5m2), "int8": (jnp.int8, jnp.int8)}
  return {
    name: (
      dot_general_qt.DotGeneralQtConfig(lhs_qtype=f, rhs_qtype=f, dlhs_grad_qtype=b, drhs_grad_qtype=b),
      ragged_dot_qt.RaggedDotQtConfig(lhs_qtype=f, rhs_qtype=f, dlhs_grad_qtype=b, drhs_grad_qtype=b),
    )
    for name, (f, b) in forward.items()
  }


@jax.custom_vjp
def _matmul(x_MxK: jax.Array, w_KxN: jax.Array) -> jax.Array:
  """x·w whose backward pass is the two products written out, each with the operand order of its result.

  Derived from an einsum, the weight gradient is formed as (dyᵀ·x)ᵀ, and XLA:CPU copies the activation gradient
  into a transposed layout first (11 MB per MLP layer of `cpu_10m`); xᵀ·dy runs as one product on the stored
  operands: 8-16% of the `cpu_10m` CPU step (benchmarks/NOTES.md, 2026-12-07). Remat policies see the same dots.
  """
  return x_MxK @ w_KxN


def _matmul_fwd(x_MxK, w_KxN):
  return x_MxK @ w_KxN, (x_MxK, w_KxN)


def _matmul_bwd(residuals, dy_MxN):
  x_MxK, w_KxN = residuals
  return dy_MxN @ w_KxN.T, x_MxK.T @ dy_MxN


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


@functools.cache
def _projection(equation: str) -> int:
  """How many axes an einsum contracts if it is a projection: x's trailing axes against w's leading ones, in order,
  the output x's other axes then w's; 0 if it is anything else (a batch axis, a permuted output)."""
  inputs, out = equation.replace(" ", "").split("->")
  xs, ws = inputs.split(",")
  k = len(set(xs) & set(ws))
  projection = 0 < k < len(xs) and xs[len(xs) - k :] == ws[:k] and out == xs[: len(xs) - k] + ws[k:]
  return k if projection else 0


def dot(equation: str, x: jax.Array, w: jax.Array, quantization: str = "none") -> jax.Array:
  """`jnp.einsum(equation, x, w)` (two operands, explicit output), quantized as `quantization` says."""
  if quantization == "none":
    k = _projection(equation)
    if not k or k == w.ndim:
      return jnp.einsum(equation, x, w)
    lead, contracted, out = x.shape[: x.ndim - k], x.shape[x.ndim - k :], w.shape[k:]
    y_MxN = _matmul(x.reshape(math.prod(lead), math.prod(contracted)), w.reshape(math.prod(contracted), -1))
    return y_MxN.reshape(*lead, *out)
  from qwix._src.core import dot_general_qt, einsum_info  # noqa: PLC0415

  info = einsum_info.EinsumInfo.parse(equation)
  out = dot_general_qt.dot_general_qt(x, w, info.dimension_numbers, _configs()[quantization][0])
  return out if info.output_perm is None else out.transpose(info.output_perm)


def ragged_dot(x_MxK: jax.Array, w_gxKxN: jax.Array, groups_g: jax.Array, quantization: str = "none") -> jax.Array:
  """`jax.lax.ragged_dot`, quantized as `quantization` says."""
  if quantization == "none":
    return jax.lax.ragged_dot(x_MxK, w_gxKxN, groups_g)
  from qwix._src.core import ragged_dot_qt  # noqa: PLC0415

  return ragged_dot_qt.ragged_dot_qt(x_MxK, w_gxKxN, groups_g, _configs()[quantization][1])
