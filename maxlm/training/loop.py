"""Training: state init, the pure jitted train step, eval, and the loop that logs metrics.

`train_step(state, batch) -> (state, metrics)` is a pure function compiled once with explicit in/out
shardings and the old state donated. The loss is the token-mean cross-entropy over `loss_mask`; with
gradient accumulation the step sums per-token losses and gradients over microbatches and divides once
by the total token count, so 4 microbatches of B/4 rows give the gradient of one batch of B rows.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from maxlm import checkpoint, data, flops, loss, mesh as mesh_lib, model, optim
from maxlm.checkpoint import Checkpointer
from maxlm.config import DCN_AXES, MESH_AXES, ConfigError, profile_steps
from maxlm.guard import Diverged, Guard
from maxlm.metrics import MetricsWriter, Progress

log = logging.getLogger("maxlm")

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")
CONTROLS = ("loss_scale", "lr_scale", "max_loss")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState


def init_state(model_cfg: ml_collections.ConfigDict, tx: optax.GradientTransformation, mesh, seed: int):
  """(graphdef, abstract state with shardings, init) where `init()` creates the state already sharded."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: model.create(model_cfg, seed)))

  def init() -> TrainState:
    _, params = nnx.split(model.create(model_cfg, seed))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  abstract = jax.eval_shape(init)
  shardings = mesh_lib.tree_shardings(abstract, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return graphdef, abstract, jax.jit(init, out_shardings=shardings)


def loss_terms(params, graphdef, batch, z_loss: float, chunk: int = 0):
  """Summed masked cross-entropy (+ z-loss) and the sums needed to normalise it. The output projection and
  softmax run `chunk` positions at a time (0: all T at once), fused with their gradient (maxlm/loss.py)."""
  net = nnx.merge(graphdef, params)
  x_BxTxD = net.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
  mask_BxT = batch["loss_mask"].astype(jnp.float32)
  objective, nll_sum, z_sum = loss.cross_entropy(x_BxTxD, net.output_projection(), batch["targets"], mask_BxT,
                                                 z_loss, chunk)
  return objective, {"nll_sum": nll_sum, "z_sum": z_sum, "tokens": jnp.sum(mask_BxT)}


def _microbatches(batch, n: int):
  """[B, ...] -> [n, B/n, ...] with row j·n + i in microbatch i.

  Each device holds contiguous rows, so striding keeps every microbatch evenly spread over the devices.
  """
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), batch)


def train_step(state: TrainState, batch, controls, *, graphdef, tx, lr_schedule, microbatches: int,
               z_loss: float, loss_chunk: int, guard: bool):
  """One optimizer step. `controls` are per-step scalars from the host:

  loss_scale: multiplies the loss and gradients (1; NaN or 100 only for fault injection),
  lr_scale:   multiplies the update (the stability guard lowers it after a rollback),
  max_loss:   with `guard`, a step whose loss exceeds it or is not finite keeps the old state.
  """
  grad_fn = jax.grad(loss_terms, has_aux=True)
  if microbatches == 1:
    grads, sums = grad_fn(state.params, graphdef, batch, z_loss, loss_chunk)
  else:
    def accumulate(carry, mb):
      mb = {k: mesh_lib.constrain(v, ("act_batch", "act_seq")) for k, v in mb.items()}
      g, s = grad_fn(state.params, graphdef, mb, z_loss, loss_chunk)
      return jax.tree.map(lambda c, x: c + x.astype(c.dtype), carry, (g, s)), None

    zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params),
             {"nll_sum": 0.0, "z_sum": 0.0, "tokens": 0.0})
    (grads, sums), _ = jax.lax.scan(accumulate, zeros, _microbatches(batch, microbatches))
  tokens = jnp.maximum(sums["tokens"], 1.0)
  scale = controls["loss_scale"]
  grads = jax.tree.map(lambda g: g * (scale / tokens), grads)
  loss, grad_norm = sums["nll_sum"] * scale / tokens, optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  updates = jax.tree.map(lambda u: u * controls["lr_scale"].astype(u.dtype), updates)
  new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)
  metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_schedule(state.step) * controls["lr_scale"]}
  if z_loss:
    metrics["z_loss"] = sums["z_sum"] / tokens
  if guard:
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (loss <= controls["max_loss"])
    new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
    metrics["applied"] = ok
  return new_state, metrics


def eval_step(params, batch, *, graphdef, loss_chunk: int):
  _, sums = loss_terms(params, graphdef, batch, 0.0, loss_chunk)
  return sums["nll_sum"], sums["tokens"]


def peak_tflops_per_device(cfg: ml_collections.ConfigDict, devices) -> tuple[float, str]:
  if cfg.metrics.peak_tflops > 0:
    return cfg.metrics.peak_tflops, "metrics.peak_tflops from the config"
  datasheet = flops.device_peak_tflops(devices[0])
  if datasheet is not None:
    return datasheet, f"datasheet bf16 peak of {devices[0].device_kind}"
  measured = flops.measure_matmul_tflops(jnp.dtype(cfg.model.compute_dtype), device=devices[0])
  # Fake CPU devices share the host's cores, so each gets an equal share of the host's rate.
  local = sum(d.process_index == jax.process_index() for d in devices)
  return measured / local, (f"MEASURED peak: {measured * 1e3:.1f} GFLOP/s for a 2048^3 {cfg.model.compute_dtype} "
                            f"matmul on {devices[0].platform}, shared by {local} local device(s)")


@dataclasses.dataclass
class StepProgram:
  """The jitted train and eval steps of a config on a mesh, with the abstract inputs to lower them for; no data,
  nothing run. `setup` compiles it for training; `maxlm compile` (maxlm/aot.py) for memory figures."""
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
  mesh, tx, lr_schedule, graphdef, abstract_state, init = _state_layout(cfg, list(devices))
  batch_sharding = mesh_lib.batch_sharding(mesh)
  abstract_batch = {k: jax.ShapeDtypeStruct((t.global_batch, cfg.data.seq_len), jnp.int32, sharding=batch_sharding)
                    for k in BATCH_KEYS}
  shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  with jax.set_mesh(mesh):
    step_fn = jax.jit(
        functools.partial(train_step, graphdef=graphdef, tx=tx, lr_schedule=lr_schedule,
                          microbatches=t.microbatches, z_loss=t.z_loss, loss_chunk=t.loss_chunk,
                          guard=t.guard.policy != "none"),
        in_shardings=(shardings, batch_sharding, replicated), out_shardings=(shardings, None), donate_argnums=0)
    eval_fn = jax.jit(functools.partial(eval_step, graphdef=graphdef, loss_chunk=t.loss_chunk),
                      in_shardings=(shardings.params, batch_sharding))
  controls = {k: jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated) for k in CONTROLS}
  start_from = jax.jit(lambda params: TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                                 opt_state=tx.init(params)), out_shardings=shardings)
  return StepProgram(mesh=mesh, abstract_state=abstract_state, init=init, batch_sharding=batch_sharding,
                     step=step_fn, eval=eval_fn, abstract_batch=abstract_batch, abstract_controls=controls,
                     start_from=start_from)


@dataclasses.dataclass
class Session:
  """A compiled training setup: what a loop (train, benchmark) needs, built the same way for both."""
  cfg: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  abstract_state: TrainState  # shapes, dtypes and shardings of the state
  init: Callable[[], TrainState]  # a fresh state, created sharded
  step: Callable  # (state, global batch, controls) -> (state, metrics); compiled, donates `state`
  data_iterator: Any  # this process's Grain training iterator (checkpointable)
  next_batch: Callable[[], dict]  # the next global training batch, on device
  evaluate: Callable[[nnx.State], float]  # mean eval loss over train.eval_batches held-out batches
  start_from: Callable[[nnx.State], TrainState]  # a step-0 state from given (sharded) params, fresh optimizer
  tokens_per_step: int
  flops_per_step: float
  peak_tflops: float  # per device, for MFU
  compile_s: float


def setup(cfg: ml_collections.ConfigDict, devices=None) -> Session:
  """Mesh, state shardings, data iterators and the AOT-compiled train step for a validated, resolved config."""
  devices = list(jax.devices() if devices is None else devices)
  t = cfg.train
  program = build_step(cfg, devices)
  mesh, batch_sharding = program.mesh, program.batch_sharding
  tokens_per_step = t.global_batch * cfg.data.seq_len
  flops_per_step = flops.training_flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step
  peak, peak_source = peak_tflops_per_device(cfg, devices)
  log.info("%d devices (%s), mesh %s", len(devices), devices[0].device_kind, dict(mesh.shape))
  log.info("model: %.2fM parameters, %.3g training FLOPs/token; MFU peak %.4g TFLOP/s/device (%s)",
           flops.param_count(cfg.model) / 1e6, flops_per_step / tokens_per_step, peak, peak_source)

  train_iter, eval_iter = data.train_and_eval(cfg, jax.process_index(), jax.process_count())
  t0 = time.perf_counter()
  compiled_step = program.lower().compile()
  compile_s = time.perf_counter() - t0
  log.info("train step compiled in %.1f s", compile_s)

  def to_global(local_batch):
    return {k: jax.make_array_from_process_local_data(batch_sharding, local_batch[k]) for k in BATCH_KEYS}

  def evaluate(params) -> float:
    it, loss_sum, count = eval_iter(), 0.0, 0.0
    with jax.set_mesh(mesh):
      for _ in range(t.eval_batches):
        s, n = jax.device_get(program.eval(params, to_global(next(it))))  # Blocking: one program in flight.
        loss_sum, count = loss_sum + float(s), count + float(n)
    return loss_sum / max(count, 1.0)

  return Session(cfg=cfg, mesh=mesh, abstract_state=program.abstract_state, init=program.init, step=compiled_step,
                 data_iterator=train_iter, next_batch=lambda: to_global(next(train_iter)), evaluate=evaluate,
                 start_from=program.start_from,
                 tokens_per_step=tokens_per_step, flops_per_step=flops_per_step, peak_tflops=peak,
                 compile_s=compile_s)


def _state_layout(cfg: ml_collections.ConfigDict, devices):
  """(mesh, optimizer, lr schedule, graphdef, abstract state, init) for a resolved config."""
  mesh = mesh_lib.build_mesh(mesh_sizes(cfg.mesh), devices, mesh_sizes(cfg.mesh, dcn=True))
  tx, lr_schedule = optim.make(cfg.optim, cfg.train.steps)
  # Outside a mesh context: NNX would read the logical names on parameters as mesh axes.
  graphdef, abstract_state, init = init_state(cfg.model, tx, mesh, cfg.train.seed)
  return mesh, tx, lr_schedule, graphdef, abstract_state, init


def mesh_sizes(mesh_cfg, dcn: bool = False) -> list[int]:
  """Per-slice (ICI) sizes of the mesh axes, or with `dcn` their sizes across slices (1 for `tensor`)."""
  if dcn:
    return [mesh_cfg.get(f"dcn_{a}", 1) if a in DCN_AXES else 1 for a in MESH_AXES]
  return [mesh_cfg[a] for a in MESH_AXES]


def _axis_sizes(mesh_cfg) -> dict[str, int]:
  """Whole-mesh axis sizes (in-slice size times slices) of a config's `mesh` group, for the resume log."""
  return {a: ici * dcn for a, ici, dcn in zip(MESH_AXES, mesh_sizes(mesh_cfg), mesh_sizes(mesh_cfg, dcn=True))}


def restore_model(cfg: ml_collections.ConfigDict, workdir: str, devices=None, step: int | None = None
                  ) -> model.Transformer:
  """The model of a workdir for sampling and evaluation: the parameters only (no optimizer state) of its
  newest checkpoint (or of `step`), or its imported parameters; placed on `cfg.mesh` over `devices`."""
  devices = list(jax.devices() if devices is None else devices)
  mesh = mesh_lib.build_mesh(mesh_sizes(cfg.mesh), devices, mesh_sizes(cfg.mesh, dcn=True))
  directory, _ = checkpoint.params_location(workdir, step)
  diffs = checkpoint.model_differences(checkpoint.saved_model_config(workdir), cfg.model)
  if diffs:
    raise ConfigError(f"--workdir={workdir} holds a different model ({'; '.join(diffs)})")
  graphdef, abstract = checkpoint.abstract_params(cfg.model, mesh)
  return nnx.merge(graphdef, checkpoint.restore_params(directory, abstract))


def _restore_or_init(s: Session, ckpt: Checkpointer | None, guard: Guard) -> tuple[TrainState, int]:
  restored = ckpt.restore_latest(s.abstract_state, s.data_iterator, s.cfg.model) if ckpt else None
  if restored is None:
    return _init(s), 0
  state, step, meta = restored
  guard.load(meta.get("guard"))
  saved_mesh, mesh = _axis_sizes(meta["config"]["mesh"]), _axis_sizes(s.cfg.mesh)
  resharded = f"; resharded from mesh {saved_mesh} to {mesh}" if saved_mesh != mesh else ""
  log.info("resumed from the checkpoint at step %d%s", step, resharded)
  if s.cfg.train.init_from:
    log.info("train.init_from is ignored: the run resumes from its own checkpoint")
  return state, step


def _init(s: Session) -> TrainState:
  """A fresh state: random parameters, or those of `train.init_from` (with a fresh optimizer state)."""
  source = s.cfg.train.init_from
  if not source:
    return s.init()
  diffs = checkpoint.model_differences(checkpoint.saved_model_config(source), s.cfg.model)
  if diffs:
    raise ConfigError(f"train.init_from={source!r} holds a different model ({'; '.join(diffs)}): use its model "
                      "config (e.g. the config.py that maxlm convert from-hf wrote)")
  directory, step = checkpoint.params_location(source)
  params = checkpoint.restore_params(directory, s.abstract_state.params)
  log.info("initialised the parameters from %s%s; fresh optimizer state", directory,
           "" if step is None else f" (step {step})")
  return s.start_from(params)


def controls(loss_scale: float = 1.0, lr_scale: float = 1.0, max_loss: float = np.inf) -> dict[str, np.float32]:
  """The per-step scalars of `train_step` (defaults: a plain step, nothing injected or guarded)."""
  return {"loss_scale": np.float32(loss_scale), "lr_scale": np.float32(lr_scale), "max_loss": np.float32(max_loss)}


def _controls(cfg: ml_collections.ConfigDict, guard: Guard, step: int) -> dict[str, np.float32]:
  loss_scale = {cfg.train.inject_nan_at_step: np.nan, cfg.train.inject_spike_at_step: 100.0}.get(step, 1.0)
  return controls(loss_scale, guard.lr_scale(step), guard.max_loss())


def run(cfg: ml_collections.ConfigDict, workdir: str, devices=None) -> list[dict]:
  """Trains with a validated, resolved config (`maxlm.config.validate`); returns the records logged by this call.

  Resumes from the newest readable checkpoint in `workdir`, if any. SIGTERM/SIGINT end the run after the
  current step with a checkpoint (when checkpointing is on). Raises `guard.Diverged` when the stability
  guard runs out of rollbacks.
  """
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json(indent=2))
  s = setup(cfg, devices)
  t, c, num_devices = cfg.train, cfg.checkpoint, s.mesh.size
  ckpt = Checkpointer(workdir, cfg) if c.every_steps > 0 else None
  guard = Guard(t.guard)
  state, start = _restore_or_init(s, ckpt, guard)
  if start >= t.steps:
    log.info("the checkpoint is at step %d and train.steps=%d: nothing to train; raise train.steps to continue",
             start, t.steps)
    ckpt.close()
    return []
  writer = MetricsWriter(workdir, tensorboard=cfg.metrics.tensorboard, enabled=is_main, after_step=start)
  progress = Progress(t.steps, enabled=is_main, initial=start)
  profiler = _Profiler(cfg.metrics.profile_steps, os.path.join(workdir, "profile"), enabled=is_main)
  stop = StopRequest()
  records, in_flight, stopping = [], None, False
  window_start, window_steps, last_save = time.perf_counter(), 0, time.monotonic()

  def settle(step: int, metrics, controls) -> bool:
    """Guard bookkeeping for a finished step; True if it was rejected and the policy is rollback."""
    metrics = jax.device_get(metrics)
    applied = bool(metrics.get("applied", True))
    events = guard.observe(step, float(metrics["loss"]), applied, float(controls["max_loss"]))
    for event in events:
      log.warning("step %d: %s", step, ", ".join(f"{k}={v}" for k, v in event.items() if k != "step"))
      writer.write(event)
    return bool(events) and t.guard.policy == "rollback"

  try:
    for step in range(start + 1, t.steps + 1):
      controls = _controls(cfg, guard, step)
      profiler.before(step)
      state, metrics = s.step(state, s.next_batch(), controls)
      profiler.after(step, state)
      window_steps += 1
      # Settle the previous step while this one runs: one step in flight, never an unbounded backlog.
      if in_flight is not None and settle(*in_flight):
        state, to_step = _rollback(ckpt, s, guard, bad_step=in_flight[0], step=step, pending=state)
        writer.write({"step": in_flight[0], "event": "rollback", "to_step": to_step, "data_skipped_to": step})
        in_flight, window_start, window_steps = None, time.perf_counter(), 0
        continue
      in_flight = (step, metrics, controls)
      stopping, time_due = stop.agreed(c.every_minutes > 0 and time.monotonic() - last_save > 60 * c.every_minutes)
      if ckpt and (step % c.every_steps == 0 or step == t.steps or time_due or stopping):
        ckpt.save(step, state, s.data_iterator, extra={"guard": guard.state()}, wait=stopping)
        last_save = time.monotonic()
      do_eval = t.eval_every > 0 and (step % t.eval_every == 0 or step == t.steps)
      if step % t.log_every == 0 or step == t.steps or do_eval or stopping:
        values = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "applied"}
        step_time = (time.perf_counter() - window_start) / window_steps
        achieved = s.flops_per_step / step_time / num_devices / 1e12
        record = {"step": step, **values, "tokens_per_sec": s.tokens_per_step / step_time, "step_time_s": step_time,
                  "tflops_per_device": achieved, "mfu": achieved / s.peak_tflops}
        if do_eval:
          record["eval_loss"] = s.evaluate(state.params)
        writer.write(record)
        progress.update(step, record)
        records.append(record)
        window_start, window_steps = time.perf_counter(), 0
      if stopping:
        saved = "a checkpoint was saved; rerun the same command to resume" if ckpt else "checkpointing is off"
        log.info("stopped by %s after step %d: %s", stop.name or "another process's signal", step, saved)
        break
    if in_flight is not None:
      settle(*in_flight)  # Log its guard events; a rejected last step stays rejected (nothing left to redo).
  finally:
    profiler.close()
    stop.uninstall()
    progress.close()
    writer.close()
    if ckpt:
      ckpt.close()  # Waits for a save in flight.
  if records and not stopping:
    last = records[-1]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    log.info("done: %d steps, final loss %.4f%s, %.0f tokens/s, MFU %.1f%%", t.steps, last["loss"],
             f", eval loss {evals[-1]:.4f}" if evals else "", last["tokens_per_sec"], 100 * last["mfu"])
  return records


def _rollback(ckpt: Checkpointer, s: Session, guard: Guard, *, bad_step: int, step: int,
              pending) -> tuple[TrainState, int]:
  """Restores the newest checkpoint from before `bad_step`; the data iterator keeps its place, so the
  batches between that checkpoint and `step` are left behind."""
  jax.block_until_ready(pending)  # The step in flight ran on the old state; its result is dropped.
  ckpt.wait()
  earlier = [k for k in ckpt.steps() if k < bad_step]
  if not earlier:
    raise Diverged(f"step {bad_step} failed the stability guard and no checkpoint from before it exists: lower "
                   "optim.lr or save checkpoints more often (checkpoint.every_steps)")
  guard.start_rollback(bad_step, earlier[-1], step)
  log.warning("rolling back to the checkpoint at step %d; skipping the data of steps %d-%d; learning rate x%g "
              "until step %d", earlier[-1], earlier[-1] + 1, step, guard.cfg.rollback_lr_scale, guard.lowered_lr_until)
  return ckpt.restore_state(earlier[-1], s.abstract_state), earlier[-1]


class _Profiler:
  """A JAX profiler trace (TensorBoard / Perfetto) of the steps `metrics.profile_steps`, on process 0."""

  def __init__(self, spec: str, directory: str, enabled: bool):
    self.steps = profile_steps(spec) if enabled else None
    self.directory, self.active = directory, False

  def before(self, step: int) -> None:
    if self.steps and step == self.steps[0]:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, state) -> None:
    if self.active and step == self.steps[1]:
      jax.block_until_ready(state)  # The trace ends after the last traced step has run, not when it was queued.
      self.close()
      log.info("profiled steps %d-%d into %s", *self.steps, self.directory)

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


class StopRequest:
  """SIGTERM/SIGINT set a flag that the loop checks between steps (a second SIGINT interrupts at once)."""

  def __init__(self):
    self.requested, self.name = False, ""
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested, self.name = True, signal.Signals(signum).name
    log.info("%s received: stopping after this step", self.name)

  def agreed(self, time_due: bool) -> tuple[bool, bool]:
    """(stop, save now) decided the same on every process: any process's request counts for all."""
    flags = np.array([self.requested, time_due], np.int32)
    if jax.process_count() > 1:
      flags = multihost_utils.process_allgather(flags).max(axis=0)
    return bool(flags[0]), bool(flags[1])

  def uninstall(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
