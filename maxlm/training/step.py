"""The train step: a pure function `train_step(state, batch, controls) -> (state, metrics)`, and the program
that jits it with explicit shardings over a mesh (`build_step`), shared by training, `maxlm bench` and
`maxlm compile`.

The loss is the token-mean cross-entropy over `loss_mask`; with gradient accumulation the step sums
per-token losses and gradients over microbatches and divides once by the total token count, so 4
microbatches of B/4 rows give the gradient of one batch of B rows. The old state is donated.

MoE models add `moe.lb_weight` · balance loss + `moe.router_z_weight` · router z-loss (means over their MoE layers)
per token to the objective, log them with the dropped fraction and each layer's load (the busiest expert's routed
copies over the mean), and, with `moe.bias_update_rate`, move the routers' balancing bias after each step.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from maxlm.model import loss, moe, transformer
from maxlm.parallel import mesh as mesh_lib
from maxlm.training import diloco, optim

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")
CONTROLS = ("loss_scale", "lr_scale", "max_loss")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State  # with DiLoCo: the global (outer) model
  opt_state: optax.OptState  # with DiLoCo: the outer optimizer's state
  replicas: diloco.Replicas | None = None  # DiLoCo's replicas (maxlm/training/diloco.py); None without


def fresh_state(params, tx: optax.GradientTransformation, outer=None) -> TrainState:
  """A step-0 state from `params`: `tx`'s fresh state, or with `outer` = (outer optimizer, replicas, fragments) a
  DiLoCo state whose replicas all start from `params` with fresh inner states."""
  step = jnp.zeros((), jnp.int32)
  if outer is None:
    return TrainState(step=step, params=params, opt_state=tx.init(params))
  outer_tx, replicas, fragments = outer
  inner = diloco.Replicas(
    params=diloco.with_replicas(params, replicas),
    opt_state=diloco.with_replicas(tx.init(params), replicas),
    outer_update_norm=jnp.zeros((), jnp.float32),
  )
  return TrainState(
    step=step, params=params, opt_state=diloco.outer_states(params, outer_tx, fragments), replicas=inner
  )


def init_state(model_cfg: ml_collections.ConfigDict, tx: optax.GradientTransformation, mesh, seed: int, outer=None):
  """(graphdef, abstract state with shardings, init) where `init()` creates the state already sharded; `outer` as in
  `fresh_state`."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: transformer.create(model_cfg, seed)))

  def init() -> TrainState:
    _, params = nnx.split(transformer.create(model_cfg, seed))
    return fresh_state(params, tx, outer)

  abstract = jax.eval_shape(init)
  shardings = mesh_lib.tree_shardings(abstract, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return graphdef, abstract, jax.jit(init, out_shardings=shardings)


def loss_terms(
  params,
  graphdef,
  batch,
  z_loss: float,
  chunk: int = 0,
  moe_weights: tuple[float, float] = (0.0, 0.0),
  pipeline_microbatches: int = 0,
):
  """Summed masked cross-entropy (+ z-loss, + the MoE terms weighted by `moe_weights` = (balance, router z) per
  token) and the sums needed to normalise and log them. The output projection and softmax run `chunk` positions at
  a time (0: all T at once), fused with their gradient (maxlm/model/loss.py). Under a `stage` mesh axis the layers
  run pipelined over `pipeline_microbatches` pieces of the rows."""
  net = nnx.merge(graphdef, params)
  x_BxTxD, aux = net.forward(batch["inputs"], batch["positions"], batch["segment_ids"], pipeline_microbatches)
  mask_BxT = batch["loss_mask"].astype(jnp.float32)
  objective, nll_sum, z_sum = loss.cross_entropy(
    x_BxTxD, net.output_projection(), batch["targets"], mask_BxT, z_loss, chunk
  )
  tokens = jnp.sum(mask_BxT)
  sums = {"nll_sum": nll_sum, "z_sum": z_sum, "tokens": tokens}
  if aux is not None:
    # Token-weighted, so microbatches average like the cross-entropy; counts are summed.
    means = {k: tokens * jnp.mean(aux[k]) for k in ("balance_loss", "router_z_loss", "dropped")}
    objective = objective + moe_weights[0] * means["balance_loss"] + moe_weights[1] * means["router_z_loss"]
    sums.update({f"moe_{k}": v for k, v in means.items()}, moe_counts=aux["counts"])
  return objective, sums


def _microbatches(batch, n: int):
  """[B, ...] -> [n, B/n, ...] with row j·n + i in microbatch i.

  Each device holds contiguous rows, so striding keeps every microbatch evenly spread over the devices.
  """
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), batch)


def train_step(
  state: TrainState,
  batch,
  controls,
  *,
  graphdef,
  tx,
  lr_schedule,
  microbatches: int,
  z_loss: float,
  loss_chunk: int,
  guard: bool,
  moe_weights: tuple[float, float] = (0.0, 0.0),
  bias_update_rate: float = 0.0,
  pipeline_microbatches: int = 0,
):
  """One optimizer step. `controls` are per-step scalars from the host:

  loss_scale: multiplies the loss and gradients (1; NaN or 100 only for fault injection),
  lr_scale:   multiplies the update (the stability guard lowers it after a rollback),
  max_loss:   with `guard`, a step whose loss exceeds it or is not finite keeps the old state.
  """
  grad_fn = functools.partial(
    jax.grad(loss_terms, has_aux=True), moe_weights=moe_weights, pipeline_microbatches=pipeline_microbatches
  )
  if microbatches == 1:
    grads, sums = grad_fn(state.params, graphdef, batch, z_loss, loss_chunk)
  else:

    def accumulate(carry, mb):
      mb = {k: mesh_lib.constrain(v, ("act_batch", "act_seq")) for k, v in mb.items()}
      g, s = grad_fn(state.params, graphdef, mb, z_loss, loss_chunk)
      return jax.tree.map(lambda c, x: c + x.astype(c.dtype), carry, (g, s)), None

    batches = _microbatches(batch, microbatches)
    one = jax.tree.map(lambda x: x[0], batches)
    shapes = jax.eval_shape(lambda params, mb: grad_fn(params, graphdef, mb, z_loss, loss_chunk), state.params, one)
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), shapes)
    (grads, sums), _ = jax.lax.scan(accumulate, zeros, batches)
  tokens = jnp.maximum(sums["tokens"], 1.0)
  scale = controls["loss_scale"]
  grads = jax.tree.map(lambda g: g * (scale / tokens), grads)
  loss, grad_norm = sums["nll_sum"] * scale / tokens, optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  updates = jax.tree.map(lambda u: u * controls["lr_scale"].astype(u.dtype), updates)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_schedule(state.step) * controls["lr_scale"]}
  if z_loss:
    metrics["z_loss"] = sums["z_sum"] / tokens
  if "moe_counts" in sums:
    counts_NmxE = sums["moe_counts"]
    if bias_update_rate:
      params = moe.update_router_bias(params, counts_NmxE, bias_update_rate)
    metrics.update({f"moe_{k}": sums[f"moe_{k}"] / tokens for k in ("balance_loss", "router_z_loss", "dropped")})
    metrics["moe_layer_load"] = jnp.max(counts_NmxE, axis=-1) / jnp.maximum(jnp.mean(counts_NmxE, axis=-1), 1e-9)
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
  if guard:
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (loss <= controls["max_loss"])
    new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
    metrics["applied"] = ok
  return new_state, metrics


def eval_step(params, batch, *, graphdef, loss_chunk: int, pipeline_microbatches: int = 0):
  _, sums = loss_terms(params, graphdef, batch, 0.0, loss_chunk, pipeline_microbatches=pipeline_microbatches)
  return sums["nll_sum"], sums["tokens"]


@dataclasses.dataclass
class StepProgram:
  """The jitted train and eval steps of a config on a mesh, with the abstract inputs to lower them for; no data,
  nothing run. `loop.setup` compiles it for training; `maxlm compile` (maxlm/perf/aot.py) for memory figures."""

  mesh: jax.sharding.Mesh
  abstract_state: TrainState  # shapes, dtypes and shardings of the state
  init: Callable[[], TrainState]  # a fresh state, created sharded
  batch_sharding: jax.sharding.NamedSharding
  step: Callable  # jitted (state, global batch, controls) -> (state, metrics); donates `state`
  eval: Callable  # jitted (params, global batch) -> (nll sum, token count)
  abstract_batch: dict  # a global batch as ShapeDtypeStructs
  abstract_controls: dict
  start_from: Callable[[nnx.State], TrainState]  # a step-0 state from given (sharded) params, fresh optimizer

  def lower(self):
    with jax.set_mesh(self.mesh):
      return self.step.lower(self.abstract_state, self.abstract_batch, self.abstract_controls)


def build_step(cfg: ml_collections.ConfigDict, devices) -> StepProgram:
  """The train step of a validated, resolved config over `devices` (local ones, or a TPU topology's)."""
  t = cfg.train
  mesh = mesh_lib.from_config(cfg.mesh, devices)
  tx, lr_schedule = optim.make(cfg.optim, t.steps, transformer.width_multiplier(cfg.model))
  d = t.diloco
  outer = (diloco.outer_optimizer(d), d.replicas, d.fragments) if d.replicas > 1 else None
  # Outside a mesh context: NNX would read the logical names on parameters as mesh axes.
  graphdef, abstract_state, init = init_state(cfg.model, tx, mesh, t.seed, outer)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  abstract_batch = {
    k: jax.ShapeDtypeStruct((t.global_batch, cfg.data.seq_len), jnp.int32, sharding=batch_sharding) for k in BATCH_KEYS
  }
  shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  step = functools.partial(
    train_step,
    graphdef=graphdef,
    tx=tx,
    lr_schedule=lr_schedule,
    microbatches=t.microbatches,
    z_loss=t.z_loss,
    loss_chunk=t.loss_chunk,
    guard=t.guard.policy != "none",
    moe_weights=(cfg.model.moe.lb_weight, cfg.model.moe.router_z_weight),
    bias_update_rate=cfg.model.moe.bias_update_rate,
    pipeline_microbatches=t.pipeline_microbatches,
  )
  if outer is not None:
    step = functools.partial(
      diloco.train_step,
      inner_step=step,
      outer_tx=outer[0],
      sync_every=d.sync_every,
      fragments=d.fragments,
      comm_dtype=jnp.dtype(d.comm_dtype),
    )
  with jax.set_mesh(mesh):
    step_fn = jax.jit(
      step,
      in_shardings=(shardings, batch_sharding, replicated),
      out_shardings=(shardings, None),
      donate_argnums=0,
    )
    eval_fn = jax.jit(
      functools.partial(
        eval_step, graphdef=graphdef, loss_chunk=t.loss_chunk, pipeline_microbatches=t.pipeline_microbatches
      ),
      in_shardings=(shardings.params, batch_sharding),
    )
  controls = {k: jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated) for k in CONTROLS}
  start_from = jax.jit(lambda params: fresh_state(params, tx, outer), out_shardings=shardings)
  return StepProgram(
    mesh=mesh,
    abstract_state=abstract_state,
    init=init,
    batch_sharding=batch_sharding,
    step=step_fn,
    eval=eval_fn,
    abstract_batch=abstract_batch,
    abstract_controls=controls,
    start_from=start_from,
  )


def controls(loss_scale: float = 1.0, lr_scale: float = 1.0, max_loss: float = np.inf) -> dict[str, np.float32]:
  """The per-step scalars of `train_step` (defaults: a plain step, nothing injected or guarded)."""
  return {"loss_scale": np.float32(loss_scale), "lr_scale": np.float32(lr_scale), "max_loss": np.float32(max_loss)}
