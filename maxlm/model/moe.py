"""Mixture-of-Experts feed-forward layers: a router sends each token to `top_k` of E SwiGLU experts.

Per token (x the normed residual stream):

  logits_E = x · router                     in float32
  scores_E = softmax(logits) | sigmoid(logits)                            (`model.moe.router`)
  chosen   = top_k(scores + bias)           the bias (auxiliary-loss-free balancing) steers the choice only
  weights  = scores[chosen] (/ their sum if `model.moe.renormalize`)
  y        = Σ_chosen weight · expert(x)  +  shared(x)                    (shared: DeepSeek's always-on experts)

Experts run on the devices of the `expert` mesh axis (E/Ep each). The layer is a `shard_map` over the whole mesh:
every device routes its own tokens (rows split over data, fsdp and expert; replicated over tensor), sends each
routed copy to the device holding its expert with `all_to_all`, runs its experts, and sends the outputs back.
Expert weights are split over `expert` (experts) and `tensor` (the SwiGLU width, so the outputs are summed over
tensor); fsdp-sharded expert weights are gathered at the shard_map boundary, as XLA does for dense FSDP weights.
Outside the MoE layers the expert axis is one more data-parallel axis.

Two dispatch schemes (`model.moe.capacity_factor`):

  dropless (0)  copies sorted by expert and multiplied as grouped matmuls (no padding FLOPs): `jax.lax.ragged_dot`
                or the Megablox kernel on TPU (`model.moe.grouped_matmul`). Across devices each device sends every
                destination exactly its rows with `jax.lax.ragged_all_to_all` (offsets from an all_gather of the
                per-expert counts); the receive buffer holds the worst case (Ep·X·A rows), as a static shape must.
                XLA:CPU does not implement ragged_all_to_all, so on CPU the same call runs as an all_to_all of
                X·A-row blocks, one per destination (`_ragged_all_to_all`).
  capacity (>0) each expert takes at most Cap = ceil(capacity_factor · X·A / E) copies per device, first choices
                first (GShard); the rest are dropped (their expert output is zero, the residual carries the token).
                Fixed [E, Cap, D] buffers: all_to_all moves exactly them.

Auxiliary terms, over the whole global batch (psum over the batch axes):

  balance loss  E · Σ_e f_e · p_e   f_e: fraction of the X·A routed copies that chose e; p_e: mean routing
                                    probability of e (sigmoid scores normalised per token). 1 when uniform (Switch).
  router z-loss mean(logsumexp(logits)²)                                                    (ST-MoE)
  dropped       fraction of routed copies over capacity
  counts        routed copies per expert (the load; the balancing bias moves against it)

Shape suffixes (legend in maxlm/model/__init__.py): X tokens on a device, E experts, e experts on a device,
A choices per token (top_k), R routed copies (X·A), M rows a device can receive (Ep·R), Cap capacity slots, Ep devices
on the expert axis, N rows of a ragged_all_to_all operand.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import PartitionSpec as P

from maxlm.model import quant
from maxlm.parallel import mesh as mesh_lib

AUX_KEYS = ("balance_loss", "router_z_loss", "dropped", "counts")


def is_moe_layer(m: ml_collections.ConfigDict) -> list[bool]:
  """Which of the model's layers are MoE: after `first_dense` dense layers, every `every`-th (the last of each
  group of `every`); all False for a dense model (moe.num_experts == 0)."""
  e = m.moe
  if e.num_experts == 0:
    return [False] * m.num_layers
  return [i >= e.first_dense and (i - e.first_dense + 1) % e.every == 0 for i in range(m.num_layers)]


def expert_dim(m: ml_collections.ConfigDict) -> int:
  """The SwiGLU width of one routed expert (moe.mlp_dim, else model.mlp_dim)."""
  return m.moe.mlp_dim or m.mlp_dim


class RouterBias(nnx.Variable):
  """The auxiliary-loss-free balancing bias (DeepSeek-V3): not trained by the optimizer, moved after each step by
  `update_router_bias`; it only changes which experts are chosen, never the weights."""


class MoE(nnx.Module):
  def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
    e = cfg.moe
    D, E, F = cfg.d_model, e.num_experts, expert_dim(cfg)
    pdt = jnp.dtype(cfg.param_dtype)

    def normal(shape, std, names):
      return nnx.Param(std * jax.random.normal(rngs.params(), shape, pdt), out_sharding=names)

    self.router = normal((D, E), D**-0.5, ("embed", None))
    self.w_gate = normal((E, D, F), D**-0.5, ("expert", "embed", "mlp"))
    self.w_up = normal((E, D, F), D**-0.5, ("expert", "embed", "mlp"))
    self.w_down = normal((E, F, D), F**-0.5, ("expert", "mlp", "embed"))
    self.router_bias = RouterBias(jnp.zeros((E,), jnp.float32), out_sharding=(None,))
    self.top_k, self.capacity_factor = e.top_k, e.capacity_factor
    self.router_fn, self.renormalize = e.router, e.renormalize
    self.grouped_matmul = e.grouped_matmul
    self.dtype = jnp.dtype(cfg.compute_dtype)
    self.quantization = cfg.quantization

  def __call__(self, x_BxTxD) -> tuple[jax.Array, dict]:
    """(y_BxTxD, aux): the routed experts' output and this layer's auxiliary terms (module docstring)."""
    weights = (self.router[...], self.w_gate[...], self.w_up[...], self.w_down[...], self.router_bias[...])
    routed = lambda x, w: _moe_local(x, *w, **self._options())
    if jax.sharding.get_abstract_mesh().empty:
      return routed(x_BxTxD, weights)
    x_spec = mesh_lib.logical_to_spec(("act_batch", "act_seq", None))
    w_specs = (P(), P("expert", None, "tensor"), P("expert", None, "tensor"), P("expert", "tensor", None), P())
    aux_specs = {k: P() for k in AUX_KEYS}
    # check_vma=False: the Megablox pallas_call carries no varying-axes types (as for splash attention).
    return jax.shard_map(routed, in_specs=(x_spec, w_specs), out_specs=(x_spec, aux_specs), check_vma=False)(
      x_BxTxD, weights
    )

  def _options(self) -> dict:
    return {
      "top_k": self.top_k,
      "capacity_factor": self.capacity_factor,
      "router_fn": self.router_fn,
      "renormalize": self.renormalize,
      "grouped_matmul": self.grouped_matmul,
      "dtype": self.dtype,
      "quantization": self.quantization,
    }


def _axis(name: str) -> str | None:
  """`name` when this code runs inside a shard_map over a mesh with that axis, else None (no collective)."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or name not in mesh.axis_names else name


def _batch_axes() -> tuple[str, ...]:
  """The mesh axes that split the tokens: the batch axes and the sequence's context axis."""
  mesh = jax.sharding.get_abstract_mesh()
  return () if mesh.empty else tuple(a for a in (*mesh_lib.BATCH_AXES, "context") if a in mesh.axis_names)


def route(x_XxD, router_DxE, bias_E, top_k: int, router_fn: str, renormalize: bool):
  """(chosen_XxA expert ids, weights_XxA float32, probs_XxE for the balance loss, logits_XxE float32)."""
  logits_XxE = jnp.einsum("xd,de->xe", x_XxD.astype(jnp.float32), router_DxE.astype(jnp.float32))
  if router_fn == "softmax":
    scores_XxE = jax.nn.softmax(logits_XxE, axis=-1)
    probs_XxE = scores_XxE
  else:
    scores_XxE = jax.nn.sigmoid(logits_XxE)
    probs_XxE = scores_XxE / jnp.sum(scores_XxE, axis=-1, keepdims=True)
  _, chosen_XxA = jax.lax.top_k(scores_XxE + jax.lax.stop_gradient(bias_E), top_k)
  weights_XxA = jnp.take_along_axis(scores_XxE, chosen_XxA, axis=-1)
  if renormalize:
    weights_XxA = weights_XxA / jnp.sum(weights_XxA, axis=-1, keepdims=True)
  return chosen_XxA, weights_XxA, probs_XxE, logits_XxE


def _moe_local(x_BxTxD, router_DxE, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, bias_E, **options):
  """One device's part of the layer (the whole layer without a mesh): its tokens, its experts (e = E/Ep)."""
  b, T, D = x_BxTxD.shape
  E = router_DxE.shape[1]
  dt = options["dtype"]
  x_XxD = x_BxTxD.reshape(b * T, D)
  chosen_XxA, weights_XxA, probs_XxE, logits_XxE = route(
    x_XxD, router_DxE, bias_E, options["top_k"], options["router_fn"], options["renormalize"]
  )
  experts = (w_gate_ExDxF.astype(dt), w_up_ExDxF.astype(dt), w_down_ExFxD.astype(dt))
  x_XxD = x_XxD.astype(dt)
  if options["capacity_factor"] > 0:
    y_XxAxD, kept_XxA = _capacity(x_XxD, chosen_XxA, experts, E, options["capacity_factor"], options["quantization"])
  else:
    y_XxAxD = _dropless(x_XxD, chosen_XxA, experts, E, options["grouped_matmul"], options["quantization"])
    kept_XxA = jnp.ones(chosen_XxA.shape, bool)
  y_XxD = jnp.einsum("xad,xa->xd", y_XxAxD, weights_XxA.astype(dt))
  if tensor := _axis("tensor"):
    y_XxD = jax.lax.psum(y_XxD, tensor)  # Each tensor shard summed its part of the SwiGLU width.

  # Auxiliary terms over the global batch: local sums, then psum over the batch axes.
  counts_E = jnp.zeros((E,), jnp.float32).at[chosen_XxA.reshape(-1)].add(1.0)
  sums = {
    "tokens": jnp.float32(b * T),
    "counts": counts_E,
    "probs": jnp.sum(probs_XxE, axis=0),
    "z": jnp.sum(jnp.square(jax.nn.logsumexp(logits_XxE, axis=-1))),
    "dropped": jnp.sum(1.0 - kept_XxA.astype(jnp.float32)),
  }
  if axes := _batch_axes():
    sums = jax.lax.psum(sums, axes)
  copies = sums["tokens"] * options["top_k"]
  aux = {
    "balance_loss": E * jnp.sum(sums["counts"] / copies * sums["probs"] / sums["tokens"]),
    "router_z_loss": sums["z"] / sums["tokens"],
    "dropped": sums["dropped"] / copies,
    "counts": sums["counts"],
  }
  return y_XxD.reshape(b, T, D), aux


def _grouped_matmul(x_MxK, w_gxKxN, groups_g, kernel: str, quantization: str = "none"):
  """Row block g of x (rows sorted by group, groups_g of each) times w[g]; rows past the groups give 0."""
  if kernel != "megablox":
    # XLA:CPU expands ragged_dot into a dense product with every group (G times the FLOPs): tiles there instead.
    return jax.lax.platform_dependent(
      x_MxK,
      w_gxKxN,
      groups_g,
      cpu=functools.partial(_grouped_matmul_tiled, quantization=quantization),
      default=functools.partial(quant.ragged_dot, quantization=quantization),
    )
  from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

  M = x_MxK.shape[0]
  tm = min(128, -(-M // 8) * 8)  # the kernel's row tile must divide the rows: pad them with rows in no group
  x_MxK = jnp.pad(x_MxK, ((0, -M % tm), (0, 0)))

  def run(interpret, x, w, groups):
    return megablox.gmm(x, w, groups, x.dtype, (tm, 128, 128), interpret=interpret)

  # The TPU kernel where the program is compiled for a TPU; the Pallas interpreter elsewhere (tests, slow).
  y = jax.lax.platform_dependent(
    x_MxK, w_gxKxN, groups_g, tpu=functools.partial(run, False), default=functools.partial(run, True)
  )
  return y[:M]


def _grouped_matmul_tiled(x_MxK, w_gxKxN, groups_g, quantization: str = "none"):
  """ragged_dot as batched matmuls over segments: the rows are cut at every tile start and every group end, so each
  segment lies in one tile and one group, and there are at most M/t + G of them (Megablox's scheme in XLA). Each
  segment multiplies its whole tile, masked to its rows: (M + G·t)·K·N multiply-adds instead of G·M·K·N."""
  M, K = x_MxK.shape
  G, _, N = w_gxKxN.shape
  t = min(256, max(8, 1 << (max(1, M // G) - 1).bit_length()))  # rows per tile: about a group's share, 8..256
  n = -(-M // t)  # tiles
  x_nxtxK = jnp.pad(x_MxK, ((0, n * t - M), (0, 0))).reshape(n, t, K)
  ends_g = jnp.cumsum(groups_g)
  start_P = jnp.sort(jnp.concatenate([jnp.arange(n, dtype=ends_g.dtype) * t, ends_g]))
  end_P = jnp.concatenate([start_P[1:], jnp.full((1,), n * t, start_P.dtype)])
  tile_P = jnp.minimum(start_P // t, n - 1)
  group_P = jnp.searchsorted(ends_g, start_P, side="right")  # G: past every group (padding rows)
  row_Pxt = tile_P[:, None] * t + jnp.arange(t)
  mine_Pxt = (row_Pxt >= start_P[:, None]) & (row_Pxt < end_P[:, None]) & (group_P[:, None] < G)
  x_PxtxK = jnp.where(mine_Pxt[..., None], x_nxtxK[tile_P], 0)
  y_PxtxN = quant.dot("ptk,pkn->ptn", x_PxtxK, w_gxKxN[jnp.minimum(group_P, G - 1)], quantization)
  y_nxtxN = jnp.zeros((n, t, N), y_PxtxN.dtype).at[tile_P].add(y_PxtxN)
  return y_nxtxN.reshape(n * t, N)[:M]


def _swiglu_grouped(x_RxD, groups_e, w_gate_exDxF, w_up_exDxF, w_down_exFxD, kernel: str, quantization: str = "none"):
  """Expert g's SwiGLU on its rows (rows sorted by expert, groups_e of each); rows past the groups give 0."""
  gate_RxF = _grouped_matmul(x_RxD, w_gate_exDxF, groups_e, kernel, quantization)
  up_RxF = _grouped_matmul(x_RxD, w_up_exDxF, groups_e, kernel, quantization)
  return _grouped_matmul(jax.nn.silu(gate_RxF) * up_RxF, w_down_exFxD, groups_e, kernel, quantization)


def _exclusive_cumsum(x, axis=0):
  return jnp.cumsum(x, axis=axis) - x


def _ragged_all_to_all(operand_NxD, output_MxD, input_offsets, send_sizes, output_offsets, recv_sizes, axis: str):
  """`jax.lax.ragged_all_to_all`: this device's rows [input_offsets[d], +send_sizes[d]) go to device d, written there
  from output_offsets[d]; recv_sizes[s] rows come from device s. XLA:CPU lacks the collective, so the CPU program
  sends N-row blocks (one per destination, padded) with all_to_all and writes the same rows."""

  def blocks(operand_NxD, output_MxD, input_offsets, send_sizes, output_offsets, recv_sizes):
    N, M = operand_NxD.shape[0], output_MxD.shape[0]
    Ep = send_sizes.shape[0]
    i_N = jnp.arange(N)
    rows_EpxN = jnp.minimum(input_offsets[:, None] + i_N, N - 1)
    send_EpxNxD = jnp.where((i_N < send_sizes[:, None])[..., None], operand_NxD[rows_EpxN], 0)
    got_EpxNxD = jax.lax.all_to_all(send_EpxNxD, axis, 0, 0)  # block s: what device s sent here
    at_Ep = jax.lax.all_to_all(output_offsets.reshape(Ep, 1), axis, 0, 0).reshape(Ep)  # where s's rows go here
    dest_EpxN = jnp.where(i_N < recv_sizes[:, None], at_Ep[:, None] + i_N, M)  # M: out of bounds, dropped
    return output_MxD.at[dest_EpxN].set(got_EpxNxD, mode="drop")

  ragged = functools.partial(jax.lax.ragged_all_to_all, axis_name=axis)
  args = (operand_NxD, output_MxD, input_offsets, send_sizes, output_offsets, recv_sizes)
  return jax.lax.platform_dependent(*args, cpu=blocks, default=ragged)


def _dropless(x_XxD, chosen_XxA, experts, E: int, kernel: str, quantization: str = "none"):
  """Every routed copy's expert output, y_XxAxD, with no copy dropped (module docstring)."""
  X, A = chosen_XxA.shape
  D = x_XxD.shape[1]
  R = X * A
  expert_R = chosen_XxA.reshape(R)
  order_R = jnp.argsort(expert_R, stable=True)  # routed copies grouped by expert
  x_RxD = x_XxD[order_R // A]
  counts_E = jnp.zeros((E,), jnp.int32).at[expert_R].add(1)
  expert_axis = _axis("expert")
  Ep = 1 if expert_axis is None else jax.lax.axis_size(expert_axis)
  if Ep == 1:
    y_RxD = _swiglu_grouped(x_RxD, counts_E, *experts, kernel, quantization)
  else:
    e, M = E // Ep, Ep * R
    me = jax.lax.axis_index(expert_axis)
    counts_EpxE = jax.lax.all_gather(counts_E, expert_axis)  # [source, expert]: every device's routed copies
    sent_EpxEp = counts_EpxE.reshape(Ep, Ep, e).sum(axis=-1)  # [source, destination]
    mine_Epxe = jax.lax.dynamic_slice_in_dim(counts_EpxE, me * e, e, axis=1)  # [source, local expert] for here
    sent_Ep, recv_Ep = sent_EpxEp[me], mine_Epxe.sum(axis=1)
    # Out: the rows for destination d are contiguous (sorted by expert); there they follow those of devices < me.
    recv_MxD = _ragged_all_to_all(
      x_RxD,
      jnp.zeros((M, D), x_RxD.dtype),
      _exclusive_cumsum(sent_Ep),
      sent_Ep,
      _exclusive_cumsum(sent_EpxEp, axis=0)[me],
      recv_Ep,
      expert_axis,
    )
    # Received rows: source after source, each sorted by local expert. Group them by local expert (empty rows last).
    ends = jnp.cumsum(mine_Epxe.reshape(Ep * e))
    segment_M = jnp.searchsorted(ends, jnp.arange(M), side="right")  # source·e + local expert; Ep·e when empty
    order_M = jnp.argsort(jnp.where(segment_M < Ep * e, segment_M % e, e), stable=True)
    y_MxD = _swiglu_grouped(recv_MxD[order_M], mine_Epxe.sum(axis=0), *experts, kernel, quantization)
    y_MxD = jnp.zeros_like(y_MxD).at[order_M].set(y_MxD)
    # Back: source s's rows return to where it sent them from.
    y_RxD = _ragged_all_to_all(
      y_MxD,
      jnp.zeros((R, D), y_MxD.dtype),
      _exclusive_cumsum(recv_Ep),
      recv_Ep,
      _exclusive_cumsum(sent_EpxEp, axis=1)[:, me],
      sent_Ep,
      expert_axis,
    )
  return jnp.zeros((R, D), y_RxD.dtype).at[order_R].set(y_RxD).reshape(X, A, D)


def capacity(tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
  """Slots per expert on one device: ceil(capacity_factor · tokens · top_k / num_experts)."""
  return max(1, math.ceil(capacity_factor * tokens * top_k / num_experts))


def _capacity(x_XxD, chosen_XxA, experts, E: int, capacity_factor: float, quantization: str = "none"):
  """(y_XxAxD, kept_XxA): each expert takes at most Cap copies, all first choices before any second (GShard)."""
  X, A = chosen_XxA.shape
  D = x_XxD.shape[1]
  Cap = capacity(X, A, E, capacity_factor)
  # Slot of each copy in its expert's buffer, counting choice-major (choice 0 of every token, then choice 1, ...).
  onehot_AxXxE = jax.nn.one_hot(chosen_XxA.T, E, dtype=jnp.int32)
  before_AxXxE = jnp.cumsum(onehot_AxXxE.reshape(A * X, E), axis=0).reshape(A, X, E) - onehot_AxXxE
  slot_XxA = jnp.sum(before_AxXxE * onehot_AxXxE, axis=-1).T
  kept_XxA = slot_XxA < Cap
  slot_XxA = jnp.where(kept_XxA, slot_XxA, Cap)  # out of bounds: dropped by the scatter, zero from the gather
  x_XxAxD = jnp.broadcast_to(x_XxD[:, None], (X, A, D))
  buffer_ExCapxD = jnp.zeros((E, Cap, D), x_XxD.dtype).at[chosen_XxA, slot_XxA].set(x_XxAxD, mode="drop")
  expert_axis = _axis("expert")
  Ep = 1 if expert_axis is None else jax.lax.axis_size(expert_axis)
  w_gate_exDxF, w_up_exDxF, w_down_exFxD = experts
  e = E // Ep
  if Ep > 1:  # [Ep, e, Cap, D] by destination -> by source, then each local expert's rows from every source.
    recv_EpxexCapxD = jax.lax.all_to_all(buffer_ExCapxD.reshape(Ep, e, Cap, D), expert_axis, 0, 0)
    buffer_ExCapxD = recv_EpxexCapxD.swapaxes(0, 1).reshape(e, Ep * Cap, D)
  gate_ExCapxF = quant.dot("ecd,edf->ecf", buffer_ExCapxD, w_gate_exDxF, quantization)
  up_ExCapxF = quant.dot("ecd,edf->ecf", buffer_ExCapxD, w_up_exDxF, quantization)
  out_ExCapxD = quant.dot("ecf,efd->ecd", jax.nn.silu(gate_ExCapxF) * up_ExCapxF, w_down_exFxD, quantization)
  if Ep > 1:
    out_EpxexCapxD = out_ExCapxD.reshape(e, Ep, Cap, D).swapaxes(0, 1)
    out_ExCapxD = jax.lax.all_to_all(out_EpxexCapxD, expert_axis, 0, 0).reshape(E, Cap, D)
  y_XxAxD = out_ExCapxD.at[chosen_XxA, slot_XxA].get(mode="fill", fill_value=0)
  return y_XxAxD, kept_XxA


def update_router_bias(params, counts_NmxE: jax.Array, rate: float):
  """DeepSeek-V3's auxiliary-loss-free balancing: each MoE layer's bias moves by `rate` towards the experts that got
  fewer routed copies than the mean this step: b_e += rate · sign(mean − count_e). `counts_NmxE` is the `counts` aux
  of the stacked MoE layers (the one RouterBias leaf is [Nm, E])."""
  step_NmxE = rate * jnp.sign(jnp.mean(counts_NmxE, axis=-1, keepdims=True) - counts_NmxE)
  return jax.tree.map(
    lambda v: v.replace(v[...] + step_NmxE) if isinstance(v, RouterBias) else v,
    params,
    is_leaf=lambda v: isinstance(v, nnx.Variable),
  )
