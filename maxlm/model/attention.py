"""Attention in plain einsums: the training path (causal, within packed segments, with a hand-written VJP) and
the KV-cache path of decoding; `IMPLEMENTATIONS` maps `model.attention` to these and the fused kernels.

Shape suffixes: the legend in maxlm/model/__init__.py; here also Q = G·t, the query rows of one block (the G
query heads of a kv head folded in, t positions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from maxlm.model import kernels

_MASKED = float(jnp.finfo(jnp.float32).min)


@jax.custom_vjp
def _attend(q_BxKxQxDh, k_BxSxKxDh, v_BxSxKxDh, mask_Bx1x1xTxS):
  """softmax(q·kᵀ masked)·v for one query block, rows Q = G·T (the G heads of a kv head folded in)."""
  return _attend_fwd(q_BxKxQxDh, k_BxSxKxDh, v_BxSxKxDh, mask_Bx1x1xTxS)[0]


def _attend_fwd(q_BxKxQxDh, k_BxSxKxDh, v_BxSxKxDh, mask_Bx1x1xTxS):
  B, K, Q, _ = q_BxKxQxDh.shape
  S, T = k_BxSxKxDh.shape[1], mask_Bx1x1xTxS.shape[-2]
  scores_BxKxGxTxS = jnp.einsum("bkqd,bskd->bkqs", q_BxKxQxDh, k_BxSxKxDh, preferred_element_type=jnp.float32).reshape(
    B, K, Q // T, T, S
  )
  scores_BxKxQxS = jnp.where(mask_Bx1x1xTxS, scores_BxKxGxTxS, _MASKED).reshape(B, K, Q, S)
  # Every query sees at least itself, so no row is fully masked; masked entries of e are exactly 0.
  e_BxKxQxS = jnp.exp(scores_BxKxQxS - jnp.max(scores_BxKxQxS, axis=-1, keepdims=True)).astype(v_BxSxKxDh.dtype)
  sum_BxKxQx1 = jnp.sum(e_BxKxQxS, axis=-1, keepdims=True, dtype=jnp.float32)
  # Normalising after the PV product divides Q·Dh values instead of Q·S.
  out_BxKxQxDh = (
    jnp.einsum("bkqs,bskd->bkqd", e_BxKxQxS, v_BxSxKxDh, preferred_element_type=jnp.float32) / sum_BxKxQx1
  ).astype(q_BxKxQxDh.dtype)
  return out_BxKxQxDh, (q_BxKxQxDh, k_BxSxKxDh, v_BxSxKxDh, e_BxKxQxS, sum_BxKxQx1, out_BxKxQxDh)


def _attend_bwd(residuals, dout_BxKxQxDh):
  """With p = e/l: dv = pᵀ·do, ds = p·(do·vᵀ − Σ_d do·o), dq = ds·k, dk = dsᵀ·q. The 1/l factor is folded
  into do (Q·Dh values), and the row sum Σ_d do·o runs over Dh rather than over the S scores."""
  q_BxKxQxDh, k_BxSxKxDh, v_BxSxKxDh, e_BxKxQxS, sum_BxKxQx1, out_BxKxQxDh = residuals
  dt = q_BxKxQxDh.dtype
  dout_BxKxQxDh = dout_BxKxQxDh.astype(jnp.float32) / sum_BxKxQx1
  rowsum_BxKxQx1 = jnp.sum(dout_BxKxQxDh * out_BxKxQxDh.astype(jnp.float32), axis=-1, keepdims=True)
  dout_BxKxQxDh = dout_BxKxQxDh.astype(dt)
  dv_BxSxKxDh = jnp.einsum("bkqs,bkqd->bskd", e_BxKxQxS, dout_BxKxQxDh, preferred_element_type=jnp.float32)
  dp_BxKxQxS = jnp.einsum("bkqd,bskd->bkqs", dout_BxKxQxDh, v_BxSxKxDh, preferred_element_type=jnp.float32)
  ds_BxKxQxS = (e_BxKxQxS.astype(jnp.float32) * (dp_BxKxQxS - rowsum_BxKxQx1)).astype(dt)
  dq_BxKxQxDh = jnp.einsum("bkqs,bskd->bkqd", ds_BxKxQxS, k_BxSxKxDh, preferred_element_type=jnp.float32)
  dk_BxSxKxDh = jnp.einsum("bkqs,bkqd->bskd", ds_BxKxQxS, q_BxKxQxDh, preferred_element_type=jnp.float32)
  return (dq_BxKxQxDh.astype(dt), dk_BxSxKxDh.astype(k_BxSxKxDh.dtype), dv_BxSxKxDh.astype(v_BxSxKxDh.dtype), None)


_attend.defvjp(_attend_fwd, _attend_bwd)


def query_block(T: int) -> int:
  """Query positions per block of `xla_attention`: max(64, T/8) where that divides T, else all T."""
  t = max(64, T // 8)
  return t if T % t == 0 else T


def xla_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, segment_ids_BxT):
  """Causal GQA attention in plain einsums; a query sees keys at or before it in its own segment.

  The G query heads sharing a kv head are folded into the rows (Q = G·t), so each kv head runs one
  [Q, Dh] x [Dh, S] matmul instead of G small ones (benchmarks/NOTES.md). Queries go in blocks of
  t = max(64, T/8) positions, and block i only scores the keys before its end: with nb blocks that is
  (nb+1)/(2·nb) of the T×T scores (5/8 at T=256), the masked upper triangle mostly skipped. Each block's
  softmax·v has a hand-written VJP (`_attend`) that touches the score-sized tensors fewer times than the
  derived one (benchmarks/NOTES.md).
  """
  B, T, H, Dh = q_BxTxHxDh.shape
  K = k_BxSxKxDh.shape[2]
  G = H // K
  t = query_block(T)
  q_BxTxHxDh = q_BxTxHxDh * jnp.asarray(Dh**-0.5, q_BxTxHxDh.dtype)  # Scaling q is cheaper than the scores.
  outs = []
  for start in range(0, T, t):
    S = start + t  # Keys after the block's last query are masked for every query in it.
    q_BxKxQxDh = q_BxTxHxDh[:, start:S].reshape(B, t, K, G, Dh).transpose(0, 2, 3, 1, 4).reshape(B, K, G * t, Dh)
    causal_TxS = (start + jnp.arange(t))[:, None] >= jnp.arange(S)[None, :]
    same_segment_BxTxS = segment_ids_BxT[:, start:S, None] == segment_ids_BxT[:, None, :S]
    mask_Bx1x1xTxS = (causal_TxS & same_segment_BxTxS)[:, None, None]
    out_BxKxQxDh = _attend(q_BxKxQxDh, k_BxSxKxDh[:, :S], v_BxSxKxDh[:, :S], mask_Bx1x1xTxS)
    outs.append(out_BxKxQxDh.reshape(B, K, G, t, Dh).transpose(0, 3, 1, 2, 4).reshape(B, t, H, Dh))
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def cached_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, positions_BxT):
  """Attention of T new queries over a KV cache whose slot s holds the row's token at position s.

  A query at position p sees slots 0..p: the row's earlier tokens (prompt or generated) and itself. Slots
  after p may hold stale values (prompt padding) that are overwritten before any query can see them.
  """
  B, T, H, Dh = q_BxTxHxDh.shape
  S, K = k_BxSxKxDh.shape[1], k_BxSxKxDh.shape[2]
  G = H // K
  q_BxKxGxTxDh = q_BxTxHxDh.reshape(B, T, K, G, Dh).transpose(0, 2, 3, 1, 4)
  scores_BxKxGxTxS = (
    jnp.einsum("bkgtd,bskd->bkgts", q_BxKxGxTxDh, k_BxSxKxDh, preferred_element_type=jnp.float32) * Dh**-0.5
  )
  visible_BxTxS = jnp.arange(S)[None, None, :] <= positions_BxT[:, :, None]
  scores_BxKxGxTxS = jnp.where(visible_BxTxS[:, None, None], scores_BxKxGxTxS, jnp.finfo(jnp.float32).min)
  probs_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxSxKxDh.dtype)
  out_BxKxGxTxDh = jnp.einsum("bkgts,bskd->bkgtd", probs_BxKxGxTxS, v_BxSxKxDh)
  return out_BxKxGxTxDh.transpose(0, 3, 1, 2, 4).reshape(B, T, H, Dh)


# `model.attention` -> implementation, each with the signature of `xla_attention` (fused kernels: kernels.py).
# "auto" is resolved by `config.validate` for the platform.
IMPLEMENTATIONS = {"xla": xla_attention, "cudnn": kernels.cudnn_attention, "splash": kernels.splash_attention}
