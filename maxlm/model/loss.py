"""Cross-entropy over the output projection, fused and chunked: the full f32 logits never exist at once.

    objective = Σ mask · (lse − logit[target])  +  z_loss · Σ mask · lse²,    lse = log Σ_v exp(logit_v)

The forward pass walks the sequence in chunks of `chunk` positions (contiguous; strided when the sequence is split
over the `context` mesh axis: with n = T/chunk chunks, chunk j holds positions j, j + n, j + 2n, ..., so that each
chunk spans every context shard, as microbatches span the data shards; the sums do not depend on the grouping, and
contiguous chunks of one row are free reshapes, strided ones a transpose); for each chunk it computes the
logits x·W in f32, the two sums, and at once their gradient with respect to the logits,

    ∂objective/∂logit_v = mask · (p_v · (1 + 2·z_loss·lse) − [v = target]),   p = softmax(logits),

which it turns into that chunk's dx = dlogits·Wᵀ and its share of dW = xᵀ·dlogits (accumulated in f32).
The backward pass only scales dx and dW by the incoming cotangent. So memory holds one chunk's logits
([B, chunk, V]) instead of [B, T, V], and nothing is recomputed: the FLOPs equal plain autodiff's
(logits, dx, dW: 3 × 2·D·V per token), unlike rematerialising each chunk (4 ×).

Only `objective` is differentiable; `nll_sum` and `z_sum` are returned for logging (their cotangents
are ignored). Softmax statistics are f32 whatever the compute dtype; dlogits is cast to the compute dtype
for the two matmuls, as autodiff of a bf16 matmul would.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from maxlm.parallel import context


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def cross_entropy(x_BxTxD, w_DxV, targets_BxT, mask_BxT, z_loss: float, chunk: int):
  """(objective, nll_sum, z_sum) for hidden states x, output projection w (compute dtype), float mask."""
  objective, nll_sum, z_sum, _ = _sums(x_BxTxD, w_DxV, targets_BxT, mask_BxT, z_loss, chunk, with_grads=False)
  return objective, nll_sum, z_sum


def _forward(x_BxTxD, w_DxV, targets_BxT, mask_BxT, z_loss, chunk):
  objective, nll_sum, z_sum, grads = _sums(x_BxTxD, w_DxV, targets_BxT, mask_BxT, z_loss, chunk, with_grads=True)
  return (objective, nll_sum, z_sum), grads


def _backward(z_loss, chunk, grads, cotangents):
  g = cotangents[0]
  dx_BxTxD, dw_DxV = grads
  return (g * dx_BxTxD).astype(dx_BxTxD.dtype), (g * dw_DxV).astype(dw_DxV.dtype), None, None


cross_entropy.defvjp(_forward, _backward)


def _sums(x_BxTxD, w_DxV, targets_BxT, mask_BxT, z_loss, chunk, *, with_grads: bool):
  B, T, D = x_BxTxD.shape
  V = w_DxV.shape[1]
  chunk = chunk if 0 < chunk < T else T
  n = T // chunk
  # [B, T, ...] -> [n, B, chunk, ...]: the batch axis keeps its data-parallel sharding in every chunk, and with
  # strided chunks (position c·n + j in chunk j) the chunk axis keeps the context sharding of the sequence.
  strided = context.size() > 1
  if strided:
    split = lambda a: jnp.moveaxis(a.reshape(B, chunk, n, *a.shape[2:]), 2, 0)
  else:
    split = lambda a: a.reshape(B, n, chunk, *a.shape[2:]).swapaxes(0, 1)

  def body(carry, xs):
    nll, z, dw_DxV = carry
    x_BxCxD, targets_BxC, mask_BxC = xs
    logits_BxCxV = jnp.einsum("bcd,dv->bcv", x_BxCxD, w_DxV).astype(jnp.float32)
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    target_logit_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    nll = nll + jnp.sum((lse_BxC - target_logit_BxC) * mask_BxC)
    # z-loss (PaLM): pushes log Z towards 0, which keeps logits from drifting in low precision.
    z = z + jnp.sum(jnp.square(lse_BxC) * mask_BxC)
    if not with_grads:
      return (nll, z, dw_DxV), None
    p_BxCxV = jnp.exp(logits_BxCxV - lse_BxC[..., None])
    is_target_BxCxV = jnp.arange(V) == targets_BxC[..., None]
    dlogits_BxCxV = (
      p_BxCxV * (mask_BxC * (1 + 2 * z_loss * lse_BxC))[..., None]
      - jnp.where(is_target_BxCxV, mask_BxC[..., None], 0.0)
    ).astype(x_BxCxD.dtype)
    dx_BxCxD = jnp.einsum("bcv,dv->bcd", dlogits_BxCxV, w_DxV)
    dw_DxV = dw_DxV + jnp.einsum("bcd,bcv->dv", x_BxCxD, dlogits_BxCxV, preferred_element_type=jnp.float32)
    return (nll, z, dw_DxV), dx_BxCxD

  dw0 = jnp.zeros((D, V) if with_grads else (0, 0), jnp.float32)
  (nll_sum, z_sum, dw_DxV), dx_nxBxCxD = jax.lax.scan(
    body, (jnp.float32(0), jnp.float32(0), dw0), (split(x_BxTxD), split(targets_BxT), split(mask_BxT))
  )
  grads = None
  if with_grads:
    rows = jnp.moveaxis(dx_nxBxCxD, 0, 2) if strided else dx_nxBxCxD.swapaxes(0, 1)  # back in split's order
    dx_BxTxD = rows.reshape(B, T, D)
    grads = (dx_BxTxD, dw_DxV.astype(w_DxV.dtype))
  return nll_sum + z_loss * z_sum, nll_sum, z_sum, grads
