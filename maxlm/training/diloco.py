"""DiLoCo (Douillard et al. 2023) and streaming DiLoCo (Douillard et al. 2025): data parallelism that communicates
every H steps instead of every step.

R = train.diloco.replicas copies of the model train on their own rows (the batch is split over the `diloco` mesh axis
first) with the ordinary inner optimizer and no communication between them: the inner step is `step.train_step`
under `vmap` over the replica axis (`spmd_axis_name="diloco"`, so each replica's arrays live on its devices and its
own data/fsdp/tensor parallelism runs inside as usual). Every H = train.diloco.sync_every steps the outer step
treats the replicas' average drift from the global model as a gradient,

    Δ = θ_outer - mean_r θ_r,      θ_outer <- outer_optimizer(Δ)   (Nesterov SGD, lr 0.7, momentum 0.9),

and every replica restarts from the new θ_outer (their inner optimizer states are kept). Δ is the only thing that
crosses replicas: one all-reduce of the parameters every H steps, optionally in bfloat16
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
  return n * jnp.dtype(d.comm_dtype).itemsize / d.sync_every, n * 4.0


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
  # Each replica's drift, sent in comm_dtype; its mean over replicas is the one all-reduce of the outer step.
  delta_f = [
    jnp.mean((o[None] - i[:, s]).astype(comm_dtype), axis=0).astype(o.dtype) if m else jnp.zeros_like(o)
    for o, i, s, m in zip(outer_f, inner, cuts, mine)
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
  sent = sum(int(np.prod(x.shape)) for x, m in zip(delta_f, mine) if m) * jnp.dtype(comm_dtype).itemsize
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
