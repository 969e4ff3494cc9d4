"""DiLoCo (Douillard et al. 2023) and streaming DiLoCo (Douillard et al. 2025): data parallelism that communicates
every H steps instead of every step.

R = train.diloco.replicas copies of the model train on their own rows (the batch is split over the `diloco` mesh axis
first) with the ordinary inner optimizer and no communication between them: the inner step is `step.train_step`
under `vmap` over the replica axis (`spmd_axis_name="diloco"`, so each replica's arrays live on its devices and its
own data/fsdp/tensor parallelism runs inside as usual). Every H = train.diloco.sync_every steps the outer step
treats the replicas' average drift from the global model as a gradient,

    Δ = θ_outer - mean_r θ_r,      θ_outer <- outer_optimizer(Δ)   (Nesterov SGD, lr 0.7, momentum 0.9),

and every replica restarts from the new θ_outer (their inner optimizer states are kept). Δ is the only thing that
crosses replicas: one all-reduce of the parameters every H steps, optionally in bfloat16 or int8
(train.diloco.comm_dtype), where data parallelism all-reduces the gradients every step.

Streaming DiLoCo splits the parameters into F = train.diloco.fragments fragments (layer groups: the stacked blocks cut
into F contiguous ranges of layers; embeddings, final norm and output head go with fragment 0) and syncs fragment f
at the steps s with s mod H = ((f + 1)·H/F) mod H: each fragment once per period, staggered, so the peak traffic is
1/F of the model.

State: `TrainState.params` is the global (outer) model, which evals, checkpoints for export and `train.init_from`
see; `TrainState.opt_state` the outer optimizer's states (a tuple, one per fragment); `TrainState.replicas` the inner
parameters and optimizer states, each with a leading replica axis sharded over `diloco`, and the norm of the last
outer update.
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

AXIS = "diloco"
REPLICA = "replica"  # the logical name of the replica axis (maxlm.parallel.mesh.RULES maps it to `diloco`)
STACKS = ("blocks", "moe_blocks")  # parameter groups stacked on a leading layers axis


@flax.struct.dataclass
class Replicas:
  params: nnx.State  # [R, ...] each replica's parameters
  opt_state: optax.OptState  # [R, ...] each replica's inner optimizer state
  outer_update_norm: jax.Array  # the global norm of the last outer update (0 before the first)


def bytes_per_step(cfg: ml_collections.ConfigDict) -> tuple[float, float]:
  """(DiLoCo, data parallelism): the payload each replica contributes to all-reduces per step, on average: the
  parameters in train.diloco.comm_dtype every sync_every steps, against the float32 gradients every step. (A ring
  all-reduce moves about twice its payload through each device in both cases.)"""
  from maxlm.model import flops  # noqa: PLC0415

  n = flops.param_count(cfg.model)
  d = cfg.train.diloco
  return n * jnp.dtype(d.comm_dtype).itemsize / d.sync_every, n * 4.0  # (int8's row scales add 4/row_width)


def outer_optimizer(d: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The outer optimizer of `train.diloco`: SGD with (Nesterov) momentum on Δ."""
  momentum = d.outer_momentum or None
  return optax.sgd(d.outer_lr, momentum=momentum, nesterov=d.outer_optimizer == "nesterov" and momentum is not None)


def with_replicas(tree, replicas: int):
  """`tree` (parameters or optimizer state) copied `replicas` times on a new leading axis; nnx.Variables get the
  logical name REPLICA on it, so the copies are sharded over the `diloco` mesh axis."""

  def copy(leaf):
    if isinstance(leaf, nnx.Variable):
      value = leaf.get_value()
      if not hasattr(value, "shape"):
        return leaf
      names = leaf.get_metadata().get("out_sharding") or (None,) * value.ndim
      return leaf.replace(jnp.broadcast_to(value, (replicas, *value.shape)), out_sharding=(REPLICA, *names))
    return jnp.broadcast_to(leaf, (replicas, *jnp.shape(leaf)))

  return jax.tree.map(copy, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def fragment_slices(params, fragments: int, fragment: int) -> list[slice]:
  """Per parameter leaf (flattened order), the slice of its leading axis in `fragment`: layers [n·f/F, n·(f+1)/F)
  of a stacked group, the whole of every other leaf in fragment 0 and none of it in the others."""

  def of(path, leaf):
    stacked = any(getattr(k, "key", None) in STACKS for k in path)
    n = leaf.shape[0] if leaf.ndim else 1
    if stacked:
      return slice(n * fragment // fragments, n * (fragment + 1) // fragments)
    return slice(0, n if fragment == 0 else 0)

  return [of(path, leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]]


def _stored(cut: slice) -> slice:
  """The slice a fragment's outer state keeps of a leaf: `cut`, or one placeholder row where the fragment has none
  of it (checkpoints cannot hold zero-size arrays); placeholders see Δ = 0 and are never written back."""
  return cut if cut.stop > cut.start else slice(0, 1)


def fragment(params, fragments: int, f: int):
  """The parameter tree cut to fragment f as its outer state holds it (same structure, leading axes sliced)."""
  leaves, treedef = jax.tree.flatten(params)
  cuts = fragment_slices(params, fragments, f)
  return jax.tree.unflatten(treedef, [x[_stored(s)] for x, s in zip(leaves, cuts)])


def outer_states(params, outer_tx, fragments: int) -> tuple:
  """The outer optimizer's fresh state, one per fragment (each over its slice of the parameters)."""
  return tuple(outer_tx.init(fragment(params, fragments, f)) for f in range(fragments))


def due_fragment(step, sync_every: int, fragments: int):
  """The fragment whose sync falls on `step` (counted after the step), or `fragments` for none."""
  which = jnp.int32(fragments)
  for f in range(fragments):
    which = jnp.where(step % sync_every == ((f + 1) * sync_every // fragments) % sync_every, f, which)
  return which


GROUP = 256  # int8 communication: values per float32 scale


def payload_bytes(shape, comm_dtype) -> int:
  """Bytes one replica contributes for a drift of this shape: its values in comm_dtype, and under int8 one float32
  scale per GROUP values. (A ring all-reduce, like the int8 all-to-all + all-gather, moves about twice this.)"""
  n = int(np.prod(shape))
  if jnp.dtype(comm_dtype) == jnp.int8:
    return n + 4 * -(-n // GROUP)
  return n * jnp.dtype(comm_dtype).itemsize


def quantize_int8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8 along the last axis (absmax / 127 per row, round to nearest): x ≈ q · scale, |error| ≤ scale/2."""
  scale = (jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0).astype(jnp.float32)
  q = jnp.round(x / jnp.where(scale > 0, scale, 1.0))
  return jnp.clip(q, -127, 127).astype(jnp.int8), scale


def _mean_of_block(block: jax.Array, replicas: int, comm_dtype) -> jax.Array:
  """Inside shard_map: this device's block [1, ...] of one replica's drift -> the mean over the `diloco` axis.

  float32 / bfloat16: one psum in that dtype. int8 (a sum of int8 would overflow): a two-shot all-reduce. The block
  is cut into `replicas` chunks of GROUP-value rows, quantized, and exchanged by all_to_all so that each replica
  holds every replica's copy of one chunk; it averages them in float32, quantizes the mean again, and all_gather
  brings every chunk's mean to every replica. Each replica sends 2(R-1)/R of its int8 values (plus the scales), as a
  ring all-reduce does of its float32 ones; each element's error is at most its two scales' halves."""
  x = block[0].astype(jnp.float32)
  if jnp.dtype(comm_dtype) != jnp.int8:
    return jax.lax.psum((x / replicas).astype(comm_dtype), AXIS).astype(jnp.float32)
  n = x.size
  rows = -(-n // (replicas * GROUP))
  chunks = jnp.pad(x.reshape(-1), (0, replicas * rows * GROUP - n)).reshape(replicas, rows, GROUP)
  q, scale = quantize_int8(chunks)
  q, scale = (jax.lax.all_to_all(a, AXIS, 0, 0) for a in (q, scale))  # [source replica, rows, GROUP] of my chunk
  q, scale = quantize_int8(jnp.mean(q.astype(jnp.float32) * scale, axis=0))
  q, scale = (jax.lax.all_gather(a, AXIS) for a in (q, scale))  # [chunk, rows, GROUP]: every chunk's mean
  return (q.astype(jnp.float32) * scale).reshape(-1)[:n].reshape(x.shape)


def mean_drift(outer: jax.Array, inner: jax.Array, spec: P | None, comm_dtype) -> jax.Array:
  """mean_r (outer - inner[r]) over the leading replica axis of `inner` (sharded as `spec`, whose first entry is
  the `diloco` axis), with what crosses replicas in comm_dtype: an explicit collective in `shard_map` over the mesh
  (without a mesh, e.g. eager on one device: the same arithmetic in place)."""
  replicas = inner.shape[0]
  drift = outer[None] - inner
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or spec is None:
    if jnp.dtype(comm_dtype) != jnp.int8:
      return jnp.sum((drift / replicas).astype(comm_dtype), axis=0, dtype=jnp.float32).astype(outer.dtype)
    q, scale = quantize_int8(drift)
    return jnp.mean(q.astype(jnp.float32) * scale, axis=0).astype(outer.dtype)
  body = functools.partial(_mean_of_block, replicas=replicas, comm_dtype=comm_dtype)
  mean = jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=P(*spec[1:]), check_vma=False)(drift)
  return mean.astype(outer.dtype)


def _specs(tree) -> list[P | None]:
  """Per array leaf of a replicas' tree, its PartitionSpec from the Variable's logical names (None if unnamed)."""
  from maxlm.parallel import mesh as mesh_lib  # noqa: PLC0415

  def spec(leaf):
    if isinstance(leaf, nnx.Variable):
      names = leaf.get_metadata().get("out_sharding")
      return [mesh_lib.logical_to_spec(names) if names else None]
    return [None]

  return [s for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable)) for s in spec(x)]


def sync(params, opt_states, replicas: Replicas, *, f: int, fragments: int, outer_tx, comm_dtype):
  """The outer step on fragment f: Δ from the replicas' mean, the outer update, every replica reset to it.
  Returns (outer params, outer optimizer states, replicas, bytes each replica sent).

  The replicas' Variables carry an extra logical name, so their tree differs from the outer one: they are handled
  leaf by leaf."""
  outer, treedef = jax.tree.flatten(params)
  inner, inner_def = jax.tree.flatten(replicas.params)
  cuts = fragment_slices(params, fragments, f)
  mine = [s.stop > s.start for s in cuts]
  outer_f = [x[_stored(s)] for x, s in zip(outer, cuts)]
  specs = _specs(replicas.params)
  delta_f = [
    mean_drift(o, i[:, s], spec, comm_dtype) if m else jnp.zeros_like(o)
    for o, i, s, m, spec in zip(outer_f, inner, cuts, mine, specs)
  ]
  outer_f_tree = jax.tree.unflatten(treedef, outer_f)
  updates_f, new_opt_f = outer_tx.update(jax.tree.unflatten(treedef, delta_f), opt_states[f], outer_f_tree)
  new_outer_f = jax.tree.leaves(optax.apply_updates(outer_f_tree, updates_f))
  params = jax.tree.unflatten(
    treedef, [x.at[s].set(v) if m else x for x, s, v, m in zip(outer, cuts, new_outer_f, mine)]
  )
  opt_states = (*opt_states[:f], new_opt_f, *opt_states[f + 1 :])
  inner = [
    x.at[:, s].set(jnp.broadcast_to(v, x[:, s].shape)) if m else x for x, s, v, m in zip(inner, cuts, new_outer_f, mine)
  ]
  sent = sum(payload_bytes(x.shape, comm_dtype) for x, m in zip(delta_f, mine) if m)
  replicas = replicas.replace(params=jax.tree.unflatten(inner_def, inner), outer_update_norm=optax.tree.norm(updates_f))
  return params, opt_states, replicas, jnp.float32(sent)


def train_step(state, batch, controls, *, inner_step, outer_tx, sync_every: int, fragments: int, comm_dtype):
  """One DiLoCo step: every replica's inner step on its rows, then the outer step of the fragment due (if any)."""
  from maxlm.training.step import TrainState  # noqa: PLC0415  (step.py imports this module)

  replicas = state.replicas
  R = jax.tree.leaves(replicas.params)[0].shape[0]
  inner = TrainState(step=jnp.broadcast_to(state.step, (R,)), params=replicas.params, opt_state=replicas.opt_state)
  rows = jax.tree.map(lambda x: x.reshape(R, x.shape[0] // R, *x.shape[1:]), batch)
  new_inner, metrics = jax.vmap(inner_step, in_axes=(0, 0, None), spmd_axis_name=AXIS)(inner, rows, controls)
  metrics = {k: jnp.all(v, axis=0) if v.dtype == bool else jnp.mean(v, axis=0) for k, v in metrics.items()}
  step = jnp.max(new_inner.step)  # the guard may keep a replica's old state; the run advances if any applied
  replicas = replicas.replace(params=new_inner.params, opt_state=new_inner.opt_state)

  def branch(f):
    if f == fragments:
      return lambda params, opt_states, replicas: (params, opt_states, replicas, jnp.float32(0))
    return functools.partial(sync, f=f, fragments=fragments, outer_tx=outer_tx, comm_dtype=comm_dtype)

  # A step the guard rejected on every replica does not advance, and must not sync twice.
  which = jnp.where(step > state.step, due_fragment(step, sync_every, fragments), fragments)
  params, opt_state, replicas, sent = jax.lax.switch(
    which, [branch(f) for f in range(fragments + 1)], state.params, state.opt_state, replicas
  )
  metrics.update(diloco_sent_bytes=sent, outer_update_norm=replicas.outer_update_norm)
  return TrainState(step=step, params=params, opt_state=opt_state, replicas=replicas), metrics
