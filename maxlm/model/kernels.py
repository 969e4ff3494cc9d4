"""Fused attention kernels behind `model.attention`, with the signature of `attention.xla_attention`:

  (q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, segment_ids_BxT) -> out_BxTxHxDh, causal, within segments.

cudnn:  cuDNN flash attention through `jax.nn.dot_product_attention(implementation="cudnn")` (GPU, bf16/fp16).
        The causal mask is cuDNN's own (masked tiles are skipped); documents of packed rows are kept apart
        by a boolean segment mask, which cuDNN receives as an additive [B, 1, T, S] bias.
        `implementation` may be set to "xla" to run the same call anywhere (the CPU tests do).
splash: Pallas splash attention for TPU (causal block-sparse mask, segment ids natively), one MQA
        kernel per kv head for grouped-query attention. Pallas kernels are opaque to XLA's sharding
        propagation, so under a mesh the kernel runs inside `shard_map`: batch split over the
        data-parallel axes and kv heads over `tensor`, exactly the layout the projections produce.
        On CPU it runs in Pallas interpret mode (slow; for tests).
        With the sequence split over `context` (maxlm/parallel/context.py, all_gather variant),
        `splash_context_attention`: each shard's queries against the all-gathered keys and values, put
        back in original order, under a causal mask whose query indices are the balanced layout's
        original positions; the kernel's block tables are split over the query shards
        (`q_seq_shards`), so each shard skips the blocks its own queries cannot see.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from maxlm.parallel.mesh import logical_to_spec


def cudnn_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, segment_ids_BxT, *, implementation: str = "cudnn"):
  same_segment_Bx1xTxS = (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])[:, None]
  return jax.nn.dot_product_attention(
    q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask=same_segment_Bx1xTxS, is_causal=True, implementation=implementation
  )


def splash_block(seq_len: int, on_tpu: bool) -> int:
  """Tile size along the sequence: the largest of 512, 256, 128 dividing T (TPU tiles are 128-aligned)."""
  for block in (512, 256, 128):
    if seq_len % block == 0:
      return block
  if on_tpu:
    raise ValueError(f"splash attention needs a sequence length divisible by 128, got {seq_len}")
  return seq_len


def _splash_kernel(seq_len: int, group: int, interpret: bool):
  """Built inside each trace: its block tables become constants of the program being traced (the NumPy mask
  analysis is cached by Pallas), so nothing is placed on a device while compiling for another backend."""
  # Imported lazily: Pallas TPU support is not needed by the other implementations.
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

  b = splash_block(seq_len, on_tpu=not interpret)
  sizes = splash.BlockSizes(
    block_q=b,
    block_kv=b,
    block_kv_compute=b,
    block_q_dkv=b,
    block_kv_dkv=b,
    block_kv_dkv_compute=b,
    block_q_dq=b,
    block_kv_dq=b,
  )
  mask = masks.MultiHeadMask([masks.CausalMask((seq_len, seq_len)) for _ in range(group)])
  return splash.make_splash_mqa(mask=mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_context_kernel(seq_len: int, group: int, shards: int, interpret: bool):
  """The splash kernel over a whole row, T = seq_len, for queries in the balanced context layout split into
  `shards` (rows ordered as `context.order`) and keys in original order."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

  from maxlm.parallel import context

  # Not on_tpu=True: both platforms' programs are traced, and config.validate has checked the TPU's 128-alignment.
  b = splash_block(seq_len // shards, on_tpu=False)
  sizes = splash.BlockSizes(
    block_q=b,
    block_kv=b,
    block_kv_compute=b,
    block_q_dkv=b,
    block_kv_dkv=b,
    block_kv_dkv_compute=b,
    block_q_dq=b,
    block_kv_dq=b,
  )
  heads = []
  for _ in range(group):
    mask = masks.CausalMask((seq_len, seq_len), shard_count=shards)
    mask.q_sequence = context.order(seq_len, shards).astype(np.int32)  # query row -> its original position
    heads.append(mask)
  return splash.make_splash_mqa(
    mask=masks.MultiHeadMask(heads), block_sizes=sizes, head_shards=1, q_seq_shards=shards, interpret=interpret
  )


def splash_context_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, segment_ids_BxT):
  """Causal attention within segments of rows in the balanced context layout, the sequence split over `context`,
  by the splash kernel (module docstring)."""
  from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

  from maxlm.parallel import context

  B, T, H, Dh = q_BxTxHxDh.shape
  K = k_BxSxKxDh.shape[2]
  G = H // K
  mesh = jax.sharding.get_abstract_mesh()
  c = mesh.shape[context.AXIS]
  restore = np.argsort(context.order(T, c))  # gathered (balanced) key order -> original order
  q_BxKxGxTxDh = (q_BxTxHxDh * Dh**-0.5).reshape(B, T, K, G, Dh).transpose(0, 2, 3, 1, 4)
  k_BxKxSxDh = k_BxSxKxDh.transpose(0, 2, 1, 3)
  v_BxKxSxDh = v_BxSxKxDh.transpose(0, 2, 1, 3)
  batch, heads = logical_to_spec(("act_batch",))[0], logical_to_spec(("act_kv_heads",))[0]

  def run(interpret: bool, q_bxkxGxTxDh, k_bxkxSxDh, v_bxkxSxDh, segment_ids_bxT):
    kernel = _splash_context_kernel(T, G, c, interpret)
    kernel_spec = kernel.manual_sharding_spec(jax.sharding.NamedSharding(mesh, P(None, context.AXIS)))

    def local(kernel, q, k, v, segment_ids):
      gather = lambda a, axis: jnp.take(jax.lax.all_gather(a, context.AXIS, axis=axis, tiled=True), restore, axis)
      k, v, kv_segment_ids = gather(k, 2), gather(v, 2), gather(segment_ids, 1)
      per_kv_head = jax.vmap(
        lambda q, k, v, s, s_kv: kernel(q, k, v, segment_ids=SegmentIds(q=s, kv=s_kv)), in_axes=(0, 0, 0, None, None)
      )
      return jax.vmap(per_kv_head)(q, k, v, segment_ids, kv_segment_ids)

    qkv = P(batch, heads, None, context.AXIS, None)
    kv = P(batch, heads, context.AXIS, None)
    return jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(kernel_spec, qkv, kv, kv, P(batch, context.AXIS)),
      out_specs=qkv,
      check_vma=False,
    )(kernel, q_bxkxGxTxDh, k_bxkxSxDh, v_bxkxSxDh, segment_ids_bxT)

  out_BxKxGxTxDh = jax.lax.platform_dependent(
    q_BxKxGxTxDh,
    k_BxKxSxDh,
    v_BxKxSxDh,
    segment_ids_BxT.astype(jnp.int32),
    tpu=functools.partial(run, False),
    default=functools.partial(run, True),
  )
  return out_BxKxGxTxDh.transpose(0, 3, 1, 2, 4).reshape(B, T, H, Dh)


def splash_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, segment_ids_BxT):
  from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

  B, T, H, Dh = q_BxTxHxDh.shape
  K = k_BxSxKxDh.shape[2]
  G = H // K
  # The kernel does not scale the scores; scaling q first is the same product.
  q_BxKxGxTxDh = (q_BxTxHxDh * Dh**-0.5).reshape(B, T, K, G, Dh).transpose(0, 2, 3, 1, 4)
  k_BxKxSxDh = k_BxSxKxDh.transpose(0, 2, 1, 3)
  v_BxKxSxDh = v_BxSxKxDh.transpose(0, 2, 1, 3)

  def run(interpret: bool, q_bxkxGxTxDh, k_bxkxSxDh, v_bxkxSxDh, segment_ids_bxT):
    kernel = _splash_kernel(T, G, interpret)
    per_kv_head = jax.vmap(
      lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(q=s, kv=s)), in_axes=(0, 0, 0, None)
    )
    return jax.vmap(per_kv_head)(q_bxkxGxTxDh, k_bxkxSxDh, v_bxkxSxDh, segment_ids_bxT)

  def local(*args):
    # Chosen by the platform being compiled for, not the host's: `maxlm compile` lowers for a TPU from a CPU.
    return jax.lax.platform_dependent(*args, tpu=functools.partial(run, False), default=functools.partial(run, True))

  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    batch, heads = logical_to_spec(("act_batch",))[0], logical_to_spec(("act_kv_heads",))[0]
    qkv = P(batch, heads, None, None, None)
    local = jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(qkv, P(batch, heads, None, None), P(batch, heads, None, None), P(batch, None)),
      out_specs=qkv,
      check_vma=False,
    )
  out_BxKxGxTxDh = local(q_BxKxGxTxDh, k_BxKxSxDh, v_BxKxSxDh, segment_ids_BxT.astype(jnp.int32))
  return out_BxKxGxTxDh.transpose(0, 3, 1, 2, 4).reshape(B, T, H, Dh)
