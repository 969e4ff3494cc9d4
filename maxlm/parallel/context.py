"""Context parallelism: each row's sequence split over the `context` mesh axis.

Layout. With c = mesh.context, a row's T positions are cut into 2c chunks of t = T/2c and shard i holds chunks i and
2c-1-i (the dual-chunk swap, or zigzag): under a causal mask early chunks see few keys and late chunks many, and the
pairing gives every shard the same number of visible query-key pairs. `balance` puts a step's [B, T] inputs in that
order on the host (tokens, targets, positions, segment ids, loss mask) and `restore` undoes it. Everything but
attention works token by token, and the loss is a sum over tokens, so nothing else needs to know.

Attention runs inside `jax.shard_map`: each shard has its 2t queries, keys and values. Which keys a query sees
comes from the tokens' original indices (known from the shard index and the layout) and the segment ids, so packed
rows keep their documents apart. `model.context_attention` chooses how the other shards' keys arrive:

  all_gather: K and V (and the keys' segment ids) are all-gathered over `context` at once: T·K·Dh values, small
              with grouped-query attention; the backward pass reduce-scatters their gradients.
  ring:       K and V travel around the ring by `ppermute`, c-1 hops, each block attended as it arrives: memory
              holds one remote block instead of all T keys, and a hop can overlap the previous block's math.

Either way the c key blocks are merged by the online softmax (running max, sum and unnormalised output, as in flash
attention), and of a block from shard j ≠ i only the visible half is computed: for j < i every query against j's
early chunk (j's late chunk lies in every local query's future); for j > i, i's late chunk against both of j's
chunks (i's early chunk sees neither). A shard so scores (c + 1)·2t² pairs, against c·2t² for exact causal work.
Gradients are autodiff's through the scan over blocks, each block's scores recomputed in the backward pass (as
flash attention does) so that memory holds one piece of one block's scores at a time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from maxlm.parallel.mesh import logical_to_spec

AXIS = "context"
VARIANTS = ("all_gather", "ring")  # model.context_attention's choices (configs/base.py CONTEXT_ATTENTION)
QUERY_BLOCK = 512  # Query positions scored at once against one key block: its f32 scores are [b, k, G, 512, S].
_MASKED = float(jnp.finfo(jnp.float32).min)


def size() -> int:
  """The `context` axis size of the mesh being traced under (1 without a mesh or without that axis)."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty or AXIS not in mesh.axis_names else mesh.shape[AXIS]


def order(seq_len: int, c: int) -> np.ndarray:
  """order[j]: the original position of the token at position j of the balanced layout."""
  if seq_len % (2 * c):
    raise ValueError(f"context parallelism over {c} shards needs a sequence length divisible by {2 * c}, got {seq_len}")
  t = seq_len // (2 * c)
  chunks = [k for i in range(c) for k in (i, 2 * c - 1 - i)]
  return np.concatenate([np.arange(k * t, (k + 1) * t) for k in chunks])


def balance(batch: dict[str, np.ndarray], c: int) -> dict[str, np.ndarray]:
  """[B, T] host arrays put in the balanced layout for `c` context shards (unchanged for c = 1)."""
  if c == 1:
    return batch
  return {k: v[:, order(v.shape[1], c)] for k, v in batch.items()}


def restore(x_BxT, c: int):
  """The inverse of `balance` for one array whose axis 1 is the sequence."""
  if c == 1:
    return x_BxT
  return x_BxT[:, np.argsort(order(x_BxT.shape[1], c))]


def attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, segment_ids_BxT, *, variant: str, kernel: str = "xla"):
  """Causal attention within segments of rows in the balanced layout, the sequence split over `context`. With
  `kernel="splash"` the all_gather variant runs the splash kernel (maxlm/model/kernels.py); otherwise the blocks
  below, in XLA einsums."""
  if variant not in VARIANTS:
    raise ValueError(f"context attention variant {variant!r} is not one of {', '.join(VARIANTS)}")
  if kernel == "splash" and variant == "all_gather":
    from maxlm.model import kernels

    return kernels.splash_context_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, segment_ids_BxT)
  q_spec = logical_to_spec(("act_batch", "act_seq", "act_heads", None))
  kv_spec = logical_to_spec(("act_batch", "act_seq", "act_kv_heads", None))
  seq_spec = logical_to_spec(("act_batch", "act_seq"))
  local = functools.partial(_local_attention, c=size(), ring=variant == "ring")
  return jax.shard_map(local, in_specs=(q_spec, kv_spec, kv_spec, seq_spec), out_specs=q_spec, check_vma=False)(
    q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, segment_ids_BxT
  )


def _local_attention(q_bxTxhxDh, k_bxSxkxDh, v_bxSxkxDh, segment_ids_bxT, *, c: int, ring: bool):
  """One shard's queries (its 2t positions) against every shard's keys, block by block."""
  b, T, h, Dh = q_bxTxhxDh.shape
  kh = k_bxSxkxDh.shape[2]
  t = T // 2
  i = jax.lax.axis_index(AXIS)
  q_bxkxGxTxDh = (q_bxTxhxDh * jnp.asarray(Dh**-0.5, q_bxTxhxDh.dtype)).reshape(b, T, kh, h // kh, Dh)
  q_bxkxGxTxDh = q_bxkxGxTxDh.transpose(0, 2, 3, 1, 4)
  queries = (q_bxkxGxTxDh, segment_ids_bxT, _original_index(i, t, c))

  def attend(acc, j, k_bxSxkxDh, v_bxSxkxDh, segment_ids_bxS):
    keys = (k_bxSxkxDh, v_bxSxkxDh, segment_ids_bxS, _original_index(j, t, c))
    branch = jnp.where(j == i, 0, jnp.where(j < i, 1, 2))
    block = jax.lax.switch(branch, (_diagonal, _past, _future), queries, keys)
    return block if acc is None else _merge(acc, block)

  acc = attend(None, i, k_bxSxkxDh, v_bxSxkxDh, segment_ids_bxT)
  if ring:
    # Shard r sends its block to r + 1, so after s hops shard i holds shard (i - s) mod c's keys.
    hop = functools.partial(jax.lax.ppermute, axis_name=AXIS, perm=[(r, (r + 1) % c) for r in range(c)])

    def step(carry, s):
      acc, keys = carry
      keys = hop(keys)
      return (attend(acc, (i - s) % c, *keys), keys), None

    (acc, _), _ = jax.lax.scan(step, (acc, (k_bxSxkxDh, v_bxSxkxDh, segment_ids_bxT)), jnp.arange(1, c))
  else:
    gathered = jax.lax.all_gather((k_bxSxkxDh, v_bxSxkxDh, segment_ids_bxT), AXIS)  # each [c, b, ...]

    def step(acc, s):
      j = (i - s) % c
      return attend(acc, j, *(a[j] for a in gathered)), None

    acc, _ = jax.lax.scan(step, acc, jnp.arange(1, c))
  out_bxkxGxTxDh, _, sum_bxkxGxT = acc
  out_bxkxGxTxDh = (out_bxkxGxTxDh / sum_bxkxGxT[..., None]).astype(q_bxTxhxDh.dtype)
  return out_bxkxGxTxDh.transpose(0, 3, 1, 2, 4).reshape(b, T, h, Dh)


def _original_index(shard, t: int, c: int):
  """The original positions of a shard's 2t tokens: its early chunk `shard`, then its late chunk 2c-1-shard."""
  return jnp.concatenate([shard * t + jnp.arange(t), (2 * c - 1 - shard) * t + jnp.arange(t)])


def _block(q_bxkxGxTxDh, seg_q_bxT, index_q_T, k_bxSxkxDh, v_bxSxkxDh, seg_k_bxS, index_k_S):
  """Unnormalised softmax·v of a block of queries against a block of keys: (out, row max, row sum), f32.

  The queries go QUERY_BLOCK positions at a time, and each piece's scores are recomputed in the backward pass
  (`jax.checkpoint`) rather than kept: at 32K positions over 8 shards one block's f32 scores would take GiBs."""
  b, kh, G, T, Dh = q_bxkxGxTxDh.shape
  rows = QUERY_BLOCK if T % QUERY_BLOCK == 0 else T
  keys = (k_bxSxkxDh, v_bxSxkxDh, seg_k_bxS, index_k_S)
  if rows == T:
    return _scores(q_bxkxGxTxDh, seg_q_bxT, index_q_T, *keys)
  n = T // rows
  pieces = (
    jnp.moveaxis(q_bxkxGxTxDh.reshape(b, kh, G, n, rows, Dh), 3, 0),
    jnp.moveaxis(seg_q_bxT.reshape(b, n, rows), 1, 0),
    index_q_T.reshape(n, rows),
  )
  out, row_max, row_sum = jax.lax.map(lambda piece: _scores(*piece, *keys), pieces)
  return (
    jnp.moveaxis(out, 0, 3).reshape(b, kh, G, T, Dh),
    jnp.moveaxis(row_max, 0, 3).reshape(b, kh, G, T),
    jnp.moveaxis(row_sum, 0, 3).reshape(b, kh, G, T),
  )


@jax.checkpoint
def _scores(q_bxkxGxTxDh, seg_q_bxT, index_q_T, k_bxSxkxDh, v_bxSxkxDh, seg_k_bxS, index_k_S):
  """`_block` for one piece of queries. The row max only shifts exp's range: the merged output is the same for any
  shift, so it takes no gradient."""
  visible_bx1x1xTxS = (
    (index_k_S[None, :] <= index_q_T[:, None])[None] & (seg_q_bxT[:, :, None] == seg_k_bxS[:, None, :])
  )[:, None, None]
  scores = jnp.einsum("bkgqd,bskd->bkgqs", q_bxkxGxTxDh, k_bxSxkxDh, preferred_element_type=jnp.float32)
  scores = jnp.where(visible_bx1x1xTxS, scores, _MASKED)
  max_bxkxGxT = jax.lax.stop_gradient(jnp.max(scores, axis=-1))
  e = jnp.where(visible_bx1x1xTxS, jnp.exp(scores - max_bxkxGxT[..., None]), 0.0)
  out = jnp.einsum("bkgqs,bskd->bkgqd", e.astype(v_bxSxkxDh.dtype), v_bxSxkxDh, preferred_element_type=jnp.float32)
  return out, max_bxkxGxT, jnp.sum(e, axis=-1)


def _diagonal(queries, keys):
  """The shard's own keys: both chunks, masked causally."""
  return _block(*queries, *keys)


def _past(queries, keys):
  """An earlier shard's keys: only its early chunk is visible, to every local query."""
  k, v, seg, index = keys
  t = k.shape[1] // 2
  return _block(*queries, k[:, :t], v[:, :t], seg[:, :t], index[:t])


def _future(queries, keys):
  """A later shard's keys: only the local late chunk sees them (both chunks); the early chunk's rows stay empty."""
  q, seg, index = queries
  t = q.shape[3] // 2
  out, row_max, row_sum = _block(q[:, :, :, t:], seg[:, t:], index[t:], *keys)
  empty = jnp.zeros_like(row_sum)
  return (
    jnp.concatenate([jnp.zeros_like(out), out], axis=3),
    jnp.concatenate([jnp.full_like(row_max, _MASKED), row_max], axis=3),
    jnp.concatenate([empty, row_sum], axis=3),
  )


def _merge(a, b):
  """Two blocks' (out, max, sum) for the same queries combined as one softmax over both blocks' keys."""
  out_a, max_a, sum_a = a
  out_b, max_b, sum_b = b
  row_max = jnp.maximum(max_a, max_b)
  scale_a, scale_b = jnp.exp(max_a - row_max), jnp.exp(max_b - row_max)
  return out_a * scale_a[..., None] + out_b * scale_b[..., None], row_max, sum_a * scale_a + sum_b * scale_b
