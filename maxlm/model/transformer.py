"""Llama-style decoder-only transformer in Flax NNX: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Shape suffixes name every tensor's dimensions (legend: maxlm/model/__init__.py): B batch, T query positions,
S key positions, D d_model, H query heads, K kv heads, Dh head dim, F mlp width, V vocab, N layers.

Parameters are stored in `model.param_dtype` and cast to `model.compute_dtype` at use; norms, softmax
and RoPE run in float32. Block parameters are always stacked on a leading "layers" axis, so the
checkpoint layout does not depend on `model.scan_layers`, which only chooses scan vs. an unrolled loop.
Logical axis names on parameters and activations are mapped to the mesh by `maxlm.parallel.mesh.RULES`.
RoPE uses the half-split ("rotate_half") convention of Hugging Face Llama checkpoints.

Mixture-of-Experts models (`model.moe.num_experts` > 0, maxlm/model/moe.py) keep their dense blocks in `blocks` and
their MoE blocks in `moe_blocks`, each stacked in layer order; `moe.is_moe_layer` says which layer is which.

`Transformer.decode` is the inference path: the same blocks over a KV cache (prefill and one-token steps),
used by `maxlm.interop.sample`; training never touches it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from maxlm.model import attention, moe, quant
from maxlm.parallel import context, pipeline
from maxlm.parallel.mesh import constrain, split_count

# The (input, output) axes of each projection matrix of a block, per layer (the stacked blocks add a leading
# "layers" axis): what matrix-aware optimizers (Muon) orthogonalize. Embeddings, norms and lm_head are not here.
MATRIX_AXES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
  "q_proj": ((0,), (1, 2)),  # [D, H, Dh]
  "k_proj": ((0,), (1, 2)),  # [D, K, Dh]
  "v_proj": ((0,), (1, 2)),
  "o_proj": ((0, 1), (2,)),  # [H, Dh, D]
  "gate_proj": ((0,), (1,)),  # [D, F]
  "up_proj": ((0,), (1,)),
  "down_proj": ((0,), (1,)),  # [F, D]
  "w_gate": ((1,), (2,)),  # MoE experts [E, D, F]: one matrix per expert
  "w_up": ((1,), (2,)),
  "w_down": ((1,), (2,)),  # [E, F, D]
}


def width_multiplier(cfg: ml_collections.ConfigDict) -> float:
  """muP's m = d_model / model.mup_base_width (1 under sp, or when the base width is this model's)."""
  if cfg.parametrization != "mup":
    return 1.0
  return cfg.d_model / (cfg.mup_base_width or cfg.d_model)


REMAT_POLICIES: dict[str, Callable | None] = {
  "full": None,  # Save nothing inside a block: recompute the whole forward in the backward pass.
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, names: tuple[str, ...], dtype) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), out_sharding=names)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, param_dtype):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)  # Mean of squares in f32: bf16 loses the small components.
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class RopeScaling(NamedTuple):
  """Llama 3.1 frequency scaling (HF `rope_type: llama3`): wavelengths longer than original_max_len /
  low_freq_factor are stretched by `factor`, those shorter than original_max_len / high_freq_factor are kept,
  and the band between is interpolated smoothly."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_len: int


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> jax.Array:
  """The Dh/2 rotation frequencies theta^(-2i/Dh), optionally Llama-3.1 scaled (as transformers computes them)."""
  half = head_dim // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  if scaling is None:
    return inv_freq
  s = scaling
  wavelen = 2 * jnp.pi / inv_freq
  scaled = jnp.where(wavelen > s.original_max_len / s.low_freq_factor, inv_freq / s.factor, inv_freq)
  smooth = (s.original_max_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= s.original_max_len / s.high_freq_factor) & (wavelen <= s.original_max_len / s.low_freq_factor)
  return jnp.where(medium, smoothed, scaled)


def rope(x_BxTxNxDh: jax.Array, positions_BxT: jax.Array, inv_freq_Half: jax.Array) -> jax.Array:
  """Rotary embedding (Su et al. 2021): rotates pairs (i, i + Dh/2) by position · inv_freq[i]."""
  angle_BxTx1xHalf = (positions_BxT[..., None].astype(jnp.float32) * inv_freq_Half)[:, :, None, :]
  sin, cos = jnp.sin(angle_BxTx1xHalf), jnp.cos(angle_BxTx1xHalf)
  x1, x2 = jnp.split(x_BxTxNxDh.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BxTxNxDh.dtype)


class Attention(nnx.Module):
  def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
    D, H, K = cfg.d_model, cfg.num_heads, cfg.num_kv_heads
    Dh = D // H
    pdt = jnp.dtype(cfg.param_dtype)
    self.q_proj = _normal(rngs, (D, H, Dh), D**-0.5, ("embed", "heads", "head_dim"), pdt)
    self.k_proj = _normal(rngs, (D, K, Dh), D**-0.5, ("embed", "kv_heads", "head_dim"), pdt)
    self.v_proj = _normal(rngs, (D, K, Dh), D**-0.5, ("embed", "kv_heads", "head_dim"), pdt)
    self.o_proj = _normal(rngs, (H, Dh, D), (H * Dh) ** -0.5, ("heads", "head_dim", "embed"), pdt)
    self.q_norm = RMSNorm(Dh, cfg.norm_eps, pdt) if cfg.qk_norm else None
    self.k_norm = RMSNorm(Dh, cfg.norm_eps, pdt) if cfg.qk_norm else None
    self.rope_theta = cfg.rope_theta
    r = cfg.rope_scaling
    self.rope_scaling = (
      RopeScaling(r.factor, r.low_freq_factor, r.high_freq_factor, r.original_max_len) if r.type == "llama3" else None
    )
    self.attention_fn = attention.IMPLEMENTATIONS[cfg.attention]
    self.attention_kernel = cfg.attention
    self.context_attention = cfg.context_attention
    self.dtype = jnp.dtype(cfg.compute_dtype)
    self.quantization = cfg.quantization
    # muP scores q·k by 1/Dh, not 1/sqrt(Dh): q takes the extra Dh^-1/2, so every attention implementation (which all
    # scale by Dh^-1/2) stays as it is.
    self.q_scale = Dh**-0.5 if cfg.parametrization == "mup" else None

  def _project(self, x_BxTxD, positions_BxT):
    """Queries, keys and values of `x`, after the optional QK-norm and RoPE."""
    dt = self.dtype
    q_BxTxHxDh = quant.dot("btd,dhk->bthk", x_BxTxD, self.q_proj[...].astype(dt), self.quantization)
    k_BxSxKxDh = quant.dot("bsd,dhk->bshk", x_BxTxD, self.k_proj[...].astype(dt), self.quantization)
    v_BxSxKxDh = quant.dot("bsd,dhk->bshk", x_BxTxD, self.v_proj[...].astype(dt), self.quantization)
    q_BxTxHxDh = constrain(q_BxTxHxDh, ("act_batch", "act_seq", "act_heads", None))
    k_BxSxKxDh = constrain(k_BxSxKxDh, ("act_batch", "act_seq", "act_kv_heads", None))
    v_BxSxKxDh = constrain(v_BxSxKxDh, ("act_batch", "act_seq", "act_kv_heads", None))
    if self.q_norm is not None:
      q_BxTxHxDh, k_BxSxKxDh = self.q_norm(q_BxTxHxDh), self.k_norm(k_BxSxKxDh)
    inv_freq_Half = rope_inv_freq(q_BxTxHxDh.shape[-1], self.rope_theta, self.rope_scaling)
    q_BxTxHxDh = rope(q_BxTxHxDh, positions_BxT, inv_freq_Half)
    k_BxSxKxDh = rope(k_BxSxKxDh, positions_BxT, inv_freq_Half)
    if self.q_scale is not None:
      q_BxTxHxDh = q_BxTxHxDh * jnp.asarray(self.q_scale, q_BxTxHxDh.dtype)
    return q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh

  def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT):
    q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh = self._project(x_BxTxD, positions_BxT)
    if context.size() > 1:  # The sequence is split over the mesh's context axis, in context.balance's layout.
      out_BxTxHxDh = context.attention(
        q_BxTxHxDh,
        k_BxSxKxDh,
        v_BxSxKxDh,
        segment_ids_BxT,
        variant=self.context_attention,
        kernel=self.attention_kernel,
      )
    else:
      out_BxTxHxDh = self.attention_fn(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, segment_ids_BxT)
    return quant.dot("bthk,hkd->btd", out_BxTxHxDh, self.o_proj[...].astype(self.dtype), self.quantization)

  def decode(self, x_BxTxD, positions_BxT, cache):
    """Writes the new tokens' keys and values into `cache` (slot = position) and attends over it."""
    q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh = self._project(x_BxTxD, positions_BxT)
    rows_Bx1 = jnp.arange(x_BxTxD.shape[0])[:, None]
    k_BxSxKxDh = cache["k"].at[rows_Bx1, positions_BxT].set(k_BxTxKxDh.astype(cache["k"].dtype))
    v_BxSxKxDh = cache["v"].at[rows_Bx1, positions_BxT].set(v_BxTxKxDh.astype(cache["v"].dtype))
    out_BxTxHxDh = attention.cached_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, positions_BxT)
    out_BxTxD = quant.dot("bthk,hkd->btd", out_BxTxHxDh, self.o_proj[...].astype(self.dtype), self.quantization)
    return out_BxTxD, {"k": k_BxSxKxDh, "v": v_BxSxKxDh}


class MLP(nnx.Module):
  """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs, width: int = 0):
    D, F = cfg.d_model, width or cfg.mlp_dim
    pdt = jnp.dtype(cfg.param_dtype)
    self.gate_proj = _normal(rngs, (D, F), D**-0.5, ("embed", "mlp"), pdt)
    self.up_proj = _normal(rngs, (D, F), D**-0.5, ("embed", "mlp"), pdt)
    self.down_proj = _normal(rngs, (F, D), F**-0.5, ("mlp", "embed"), pdt)
    self.dtype = jnp.dtype(cfg.compute_dtype)
    self.quantization = cfg.quantization

  def __call__(self, x_BxTxD):
    dt = self.dtype
    wg_DxF, wu_DxF = self.gate_proj[...].astype(dt), self.up_proj[...].astype(dt)
    if split_count("mlp") == 1:
      # Gate and up as one [BT, D] x [D, 2F] projection, not two that XLA:CPU would run side by side at half speed
      # each; concatenated along F only where F is not split over devices.
      w_Dx2F = jnp.concatenate([wg_DxF, wu_DxF], axis=1)
      gate_up_BxTx2F = quant.dot("btd,df->btf", x_BxTxD, w_Dx2F, self.quantization)
      gate_BxTxF, up_BxTxF = jnp.split(gate_up_BxTx2F, 2, axis=-1)
    else:
      # Stacked on a new leading axis, which keeps each weight's sharding. Unstacked, not indexed: the gradient of
      # an unstack is one stack; of two indexings, two zero-padded [B, T, 2, F] copies summed (benchmarks/NOTES.md).
      w_2xDxF = jnp.stack([wg_DxF, wu_DxF])
      gate_BxTxF, up_BxTxF = jnp.unstack(quant.dot("btd,jdf->btjf", x_BxTxD, w_2xDxF, self.quantization), axis=2)
    h_BxTxF = jax.nn.silu(gate_BxTxF) * up_BxTxF
    h_BxTxF = constrain(h_BxTxF, ("act_batch", "act_seq", "act_mlp"))
    return quant.dot("btf,fd->btd", h_BxTxF, self.down_proj[...].astype(dt), self.quantization)


class Block(nnx.Module):
  """Attention and a feed-forward layer, each pre-normed on a residual branch. The feed-forward layer is a SwiGLU
  MLP, or with `is_moe` the routed experts (maxlm/model/moe.py) plus, if configured, the shared experts."""

  def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs, is_moe: bool = False):
    pdt = jnp.dtype(cfg.param_dtype)
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
    self.mlp = moe.MoE(cfg, rngs) if is_moe else MLP(cfg, rngs)
    shared = cfg.moe.shared_experts * moe.expert_dim(cfg)
    self.shared = MLP(cfg, rngs, shared) if is_moe and shared else None

  def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT):
    """(x_BxTxD, aux): the block's output and, for an MoE block, its auxiliary terms (else None)."""
    x_BxTxD = x_BxTxD + self.attn(self.attn_norm(x_BxTxD), positions_BxT, segment_ids_BxT)
    ff_BxTxD, aux = self._feed_forward(self.mlp_norm(x_BxTxD))
    return constrain(x_BxTxD + ff_BxTxD, ("act_batch", "act_seq", "act_embed")), aux

  def _feed_forward(self, h_BxTxD):
    if not isinstance(self.mlp, moe.MoE):
      return self.mlp(h_BxTxD), None
    y_BxTxD, aux = self.mlp(h_BxTxD)
    if self.shared is not None:
      y_BxTxD = y_BxTxD + self.shared(h_BxTxD)
    return y_BxTxD, aux

  def decode(self, x_BxTxD, positions_BxT, cache):
    attn_BxTxD, cache = self.attn.decode(self.attn_norm(x_BxTxD), positions_BxT, cache)
    x_BxTxD = x_BxTxD + attn_BxTxD
    return x_BxTxD + self._feed_forward(self.mlp_norm(x_BxTxD))[0], cache


def _stack(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs, count: int, is_moe: bool):
  """`count` blocks with their parameters stacked on a leading "layers" axis (None when count is 0)."""
  if count == 0:
    return None

  @nnx.split_rngs(splits=count)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def stacked_blocks(rngs):
    return Block(cfg, rngs, is_moe)

  return stacked_blocks(rngs)


class Transformer(nnx.Module):
  """tokens_BxT -> logits_BxTxV. `positions` restart and `segment_ids` change at packed document borders."""

  def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
    V, D = cfg.vocab_size, cfg.d_model
    pdt = jnp.dtype(cfg.param_dtype)
    self.embed = _normal(rngs, (V, D), cfg.init_std, ("vocab", "embed"), pdt)
    self.is_moe = tuple(moe.is_moe_layer(cfg))
    self.blocks = _stack(cfg, rngs, self.is_moe.count(False), is_moe=False)
    self.moe_blocks = _stack(cfg, rngs, self.is_moe.count(True), is_moe=True)
    # Leading dense layers, then groups of `every` layers whose last is MoE (all N dense without experts).
    self.lead = cfg.moe.first_dense if any(self.is_moe) else cfg.num_layers
    self.every = cfg.moe.every
    self.final_norm = RMSNorm(D, cfg.norm_eps, pdt)
    # muP: the output layer's init and learning rate do not shrink with width; its logits are multiplied by 1/m.
    head_fan_in = (cfg.mup_base_width or D) if cfg.parametrization == "mup" else D
    self.lm_head = None if cfg.tie_embeddings else _normal(rngs, (D, V), head_fan_in**-0.5, ("embed", "vocab"), pdt)
    self.output_multiplier = 1.0 / width_multiplier(cfg)
    self.num_layers = cfg.num_layers
    self.kv_heads, self.head_dim = cfg.num_kv_heads, D // cfg.num_heads
    self.scan_layers = cfg.scan_layers
    self.remat = cfg.remat
    self.pipeline_repeats = cfg.pipeline_repeats
    self.dtype = jnp.dtype(cfg.compute_dtype)

  def __call__(self, tokens_BxT, positions_BxT=None, segment_ids_BxT=None):
    return self.logits(self.hidden(tokens_BxT, positions_BxT, segment_ids_BxT))

  def hidden(self, tokens_BxT, positions_BxT=None, segment_ids_BxT=None):
    """The final-normed residual stream x_BxTxD, before the output projection."""
    return self.forward(tokens_BxT, positions_BxT, segment_ids_BxT)[0]

  def forward(self, tokens_BxT, positions_BxT=None, segment_ids_BxT=None, pipeline_microbatches: int = 0):
    """(x_BxTxD final-normed, aux): aux holds the MoE layers' auxiliary terms (maxlm/model/moe.py), each stacked
    over the MoE layers in order ([G] scalars, counts [G, E]); None for a dense model.

    Under a mesh with a `stage` axis the layers run pipelined (maxlm/parallel/pipeline.py) over
    `pipeline_microbatches` microbatches of the rows (0: one per stage)."""
    B, T = tokens_BxT.shape
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones((B, T), jnp.int32)
    x_BxTxD = jnp.take(self.embed[...], tokens_BxT, axis=0).astype(self.dtype)
    x_BxTxD = constrain(x_BxTxD, ("act_batch", "act_seq", "act_embed"))

    def runner(stack):
      """(block(x, layer params) -> (x, aux), the stacked params) of a stack of blocks; (None, None) if absent."""
      if stack is None:
        return None, None
      graphdef, stacked = nnx.split(stack)

      def block(x_BxTxD, layer_params):
        return nnx.merge(graphdef, layer_params)(x_BxTxD, positions_BxT, segment_ids_BxT)

      if self.remat != "none":
        block = jax.checkpoint(block, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan_layers)
      return block, stacked

    dense, dense_stacked = runner(self.blocks)
    routed, moe_stacked = runner(self.moe_blocks)
    if (stages := pipeline.size()) > 1:  # Dense models only (config.validate).
      x_BxTxD = pipeline.run(
        self._layer_fn(),
        dense_stacked,
        x_BxTxD,
        positions_BxT,
        segment_ids_BxT,
        stages=stages,
        repeats=self.pipeline_repeats,
        microbatches=pipeline_microbatches or stages,
      )
      return self.final_norm(x_BxTxD), None
    if self.scan_layers:
      x_BxTxD, aux = self._scan(x_BxTxD, dense, dense_stacked, routed, moe_stacked)
    else:
      x_BxTxD, aux = self._unrolled(x_BxTxD, dense, dense_stacked, routed, moe_stacked)
    return self.final_norm(x_BxTxD), aux

  def _layer_fn(self):
    """layer(x, layer params, positions, segment ids) -> x of a dense block, with `model.remat`'s policy."""
    graphdef = nnx.graphdef(self.blocks)

    def layer(x_BxTxD, layer_params, positions_BxT, segment_ids_BxT):
      return nnx.merge(graphdef, layer_params)(x_BxTxD, positions_BxT, segment_ids_BxT)[0]

    if self.remat != "none":
      layer = jax.checkpoint(layer, policy=REMAT_POLICIES[self.remat])
    return layer

  def _scan(self, x_BxTxD, dense, dense_stacked, routed, moe_stacked):
    """The leading dense layers in one scan, then one scan over the groups of `every` layers (the last MoE)."""
    lead, rest = dense_stacked, None
    if dense_stacked is not None and self.lead < self.is_moe.count(False):
      # Split once (one concatenate in the gradient), not sliced per use.
      halves = jax.tree.map(lambda a: jnp.split(a, [self.lead]), dense_stacked)
      lead, rest = (jax.tree.map(lambda h, i=i: h[i], halves, is_leaf=lambda x: isinstance(x, list)) for i in (0, 1))
    if self.lead:
      x_BxTxD, _ = jax.lax.scan(lambda x, p: (dense(x, p)[0], None), x_BxTxD, lead)
    if routed is None:
      return x_BxTxD, None
    groups = (
      moe_stacked
      if rest is None
      else (jax.tree.map(lambda a: a.reshape(-1, self.every - 1, *a.shape[1:]), rest), moe_stacked)
    )

    def group(x_BxTxD, params):
      if rest is None:
        return routed(x_BxTxD, params)
      dense_params, moe_params = params
      for j in range(self.every - 1):
        x_BxTxD, _ = dense(x_BxTxD, jax.tree.map(lambda a, j=j: a[j], dense_params))
      return routed(x_BxTxD, moe_params)

    return jax.lax.scan(group, x_BxTxD, groups)

  def _unrolled(self, x_BxTxD, dense, dense_stacked, routed, moe_stacked):
    """Every layer in turn, in the order `is_moe` gives."""

    def layers(stacked):
      # Split once rather than index a[i] per layer: the gradient of a split is one concatenate, that of
      # N indexings N zero-padded copies of the whole stack summed together.
      if stacked is None:
        return iter(())
      n = jax.tree.leaves(stacked)[0].shape[0]
      split = jax.tree.map(lambda a: jnp.split(a, n), stacked)
      return iter(
        [jax.tree.map(lambda parts, i=i: parts[i][0], split, is_leaf=lambda x: isinstance(x, list)) for i in range(n)]
      )

    dense_layers, moe_layers, auxes = layers(dense_stacked), layers(moe_stacked), []
    for is_moe in self.is_moe:
      x_BxTxD, aux = routed(x_BxTxD, next(moe_layers)) if is_moe else dense(x_BxTxD, next(dense_layers))
      if is_moe:
        auxes.append(aux)
    return x_BxTxD, (jax.tree.map(lambda *a: jnp.stack(a), *auxes) if auxes else None)

  def layer(self, i: int) -> Block:
    """Layer i as its own Block (parameters indexed out of its stack): for diagnostics and decoding."""
    stack, index = (
      (self.moe_blocks, self.is_moe[:i].count(True)) if self.is_moe[i] else (self.blocks, self.is_moe[:i].count(False))
    )
    graphdef, stacked = nnx.split(stack)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[index], stacked))

  def output_projection(self):
    """w_DxV in the compute dtype: the embedding's transpose when tied, else lm_head; times muP's 1/m."""
    w_DxV = self.embed[...].T if self.lm_head is None else self.lm_head[...]
    if self.output_multiplier != 1.0:
      w_DxV = w_DxV * self.output_multiplier
    return w_DxV.astype(self.dtype)

  def residuals(self, tokens_BxT) -> list[jax.Array]:
    """Diagnostics (muP coordinate checks): the residual stream after the embedding and after each block, [N + 1]
    arrays x_BxTxD, computed layer by layer."""
    B, T = tokens_BxT.shape
    positions_BxT, segment_ids_BxT = jnp.broadcast_to(jnp.arange(T), (B, T)), jnp.ones((B, T), jnp.int32)
    xs = [jnp.take(self.embed[...], tokens_BxT, axis=0).astype(self.dtype)]
    for i in range(self.num_layers):
      xs.append(self.layer(i)(xs[-1], positions_BxT, segment_ids_BxT)[0])
    return xs

  def logits(self, x_BxTxD):
    """x_BxTxD -> logits_BxTxV in the compute dtype (training uses maxlm.model.loss, which never holds them all)."""
    logits_BxTxV = jnp.einsum("btd,dv->btv", x_BxTxD, self.output_projection())
    return constrain(logits_BxTxV, ("act_batch", "act_seq", "act_vocab"))

  def init_cache(self, batch: int, length: int) -> dict[str, jax.Array]:
    """An empty KV cache for `batch` rows of up to `length` positions: k, v [N, B, S, K, Dh]."""
    shape = (self.num_layers, batch, length, self.kv_heads, self.head_dim)
    return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}

  def decode(self, tokens_BxT, positions_BxT, cache):
    """(logits_BxTxV, cache): the forward pass of T new tokens per row at `positions`, attending over the
    row's earlier tokens in `cache`. Prefill passes the prompts (T = prompt length, positions 0..T-1);
    each decode step passes one token. One sequence per row (no segments); layers always scan."""
    x_BxTxD = jnp.take(self.embed[...], tokens_BxT, axis=0).astype(self.dtype)
    if self.moe_blocks is not None:  # Two stacks: layer by layer, each with its slice of the cache.
      layer_caches = []
      for i in range(self.num_layers):
        x_BxTxD, layer_cache = self.layer(i).decode(x_BxTxD, positions_BxT, jax.tree.map(lambda c, i=i: c[i], cache))
        layer_caches.append(layer_cache)
      cache = jax.tree.map(lambda *c: jnp.stack(c), *layer_caches)
      return self.logits(self.final_norm(x_BxTxD)), cache
    graphdef, stacked = nnx.split(self.blocks)

    def block(x_BxTxD, layer):
      layer_params, layer_cache = layer
      return nnx.merge(graphdef, layer_params).decode(x_BxTxD, positions_BxT, layer_cache)

    x_BxTxD, cache = jax.lax.scan(block, x_BxTxD, (stacked, cache))
    return self.logits(self.final_norm(x_BxTxD)), cache


def create(cfg: ml_collections.ConfigDict, seed: int) -> Transformer:
  """A freshly initialised model. Sharding metadata is recorded, not applied: callers place the arrays."""
  with nnx.use_eager_sharding(False):
    return Transformer(cfg, nnx.Rngs(params=seed))
