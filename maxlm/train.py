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

from maxlm import data, flops, mesh as mesh_lib, model, optim
from maxlm.checkpoint import Checkpointer
from maxlm.config import MESH_AXES
from maxlm.metrics import MetricsWriter, Progress

log = logging.getLogger("maxlm")

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


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


def loss_terms(params, graphdef, batch, z_loss: float):
  """Summed masked cross-entropy (+ z-loss) and the sums needed to normalise it."""
  logits_BxTxV = nnx.merge(graphdef, params)(batch["inputs"], batch["positions"], batch["segment_ids"])
  logits_BxTxV = logits_BxTxV.astype(jnp.float32)  # Softmax statistics in f32 whatever the compute dtype.
  lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  target_logit_BxT = jnp.take_along_axis(logits_BxTxV, batch["targets"][..., None], axis=-1)[..., 0]
  mask_BxT = batch["loss_mask"].astype(jnp.float32)
  nll_sum = jnp.sum((lse_BxT - target_logit_BxT) * mask_BxT)
  # z-loss (PaLM): pushes log Z towards 0, which keeps logits from drifting in low precision.
  z_sum = jnp.sum(jnp.square(lse_BxT) * mask_BxT)
  return nll_sum + z_loss * z_sum, {"nll_sum": nll_sum, "z_sum": z_sum, "tokens": jnp.sum(mask_BxT)}


def _microbatches(batch, n: int):
  """[B, ...] -> [n, B/n, ...] with row j·n + i in microbatch i.

  Each device holds contiguous rows, so striding keeps every microbatch evenly spread over the devices.
  """
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), batch)


def train_step(state: TrainState, batch, *, graphdef, tx, lr_schedule, microbatches: int, z_loss: float):
  grad_fn = jax.grad(loss_terms, has_aux=True)
  if microbatches == 1:
    grads, sums = grad_fn(state.params, graphdef, batch, z_loss)
  else:
    def accumulate(carry, mb):
      mb = {k: mesh_lib.constrain(v, ("act_batch", "act_seq")) for k, v in mb.items()}
      g, s = grad_fn(state.params, graphdef, mb, z_loss)
      return jax.tree.map(lambda c, x: c + x.astype(c.dtype), carry, (g, s)), None

    zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params),
             {"nll_sum": 0.0, "z_sum": 0.0, "tokens": 0.0})
    (grads, sums), _ = jax.lax.scan(accumulate, zeros, _microbatches(batch, microbatches))
  tokens = jnp.maximum(sums["tokens"], 1.0)
  grads = jax.tree.map(lambda g: g / tokens, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": sums["nll_sum"] / tokens, "grad_norm": optax.tree.norm(grads), "lr": lr_schedule(state.step)}
  if z_loss:
    metrics["z_loss"] = sums["z_sum"] / tokens
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, *, graphdef):
  _, sums = loss_terms(params, graphdef, batch, 0.0)
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
class Session:
  """A compiled training setup: what a loop (train, benchmark) needs, built the same way for both."""
  cfg: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  abstract_state: TrainState  # shapes, dtypes and shardings of the state
  init: Callable[[], TrainState]  # a fresh state, created sharded
  step: Callable  # (state, global batch) -> (state, metrics); compiled, donates `state`
  data_iterator: Any  # this process's Grain training iterator (checkpointable)
  next_batch: Callable[[], dict]  # the next global training batch, on device
  evaluate: Callable[[nnx.State], float]  # mean eval loss over train.eval_batches held-out batches
  tokens_per_step: int
  flops_per_step: float
  peak_tflops: float  # per device, for MFU
  compile_s: float


def setup(cfg: ml_collections.ConfigDict, devices=None) -> Session:
  """Mesh, state shardings, data iterators and the AOT-compiled train step for a validated, resolved config."""
  devices = list(jax.devices() if devices is None else devices)
  mesh = mesh_lib.build_mesh([cfg.mesh[a] for a in MESH_AXES], devices)
  t = cfg.train
  tx, lr_schedule = optim.make(cfg.optim, t.steps)
  tokens_per_step = t.global_batch * cfg.data.seq_len
  flops_per_step = flops.training_flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step
  peak, peak_source = peak_tflops_per_device(cfg, devices)
  log.info("%d devices (%s), mesh %s", len(devices), devices[0].device_kind, dict(mesh.shape))
  log.info("model: %.2fM parameters, %.3g training FLOPs/token; MFU peak %.4g TFLOP/s/device (%s)",
           flops.param_count(cfg.model) / 1e6, flops_per_step / tokens_per_step, peak, peak_source)

  train_iter, eval_iter = data.train_and_eval(cfg, jax.process_index(), jax.process_count())
  batch_sharding = mesh_lib.batch_sharding(mesh)
  abstract_batch = {k: jax.ShapeDtypeStruct((t.global_batch, cfg.data.seq_len), jnp.int32, sharding=batch_sharding)
                    for k in BATCH_KEYS}
  # Outside the mesh context: NNX would read the logical names on parameters as mesh axes.
  graphdef, abstract_state, init = init_state(cfg.model, tx, mesh, t.seed)
  shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
  with jax.set_mesh(mesh):
    step_fn = jax.jit(
        functools.partial(train_step, graphdef=graphdef, tx=tx, lr_schedule=lr_schedule,
                          microbatches=t.microbatches, z_loss=t.z_loss),
        in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None), donate_argnums=0)
    eval_fn = jax.jit(functools.partial(eval_step, graphdef=graphdef),
                      in_shardings=(shardings.params, batch_sharding))
    t0 = time.perf_counter()
    compiled_step = step_fn.lower(abstract_state, abstract_batch).compile()
    compile_s = time.perf_counter() - t0
  log.info("train step compiled in %.1f s", compile_s)

  def to_global(local_batch):
    return {k: jax.make_array_from_process_local_data(batch_sharding, local_batch[k]) for k in BATCH_KEYS}

  def evaluate(params) -> float:
    it, loss_sum, count = eval_iter(), 0.0, 0.0
    with jax.set_mesh(mesh):
      for _ in range(t.eval_batches):
        s, n = jax.device_get(eval_fn(params, to_global(next(it))))  # Blocking: one program in flight.
        loss_sum, count = loss_sum + float(s), count + float(n)
    return loss_sum / max(count, 1.0)

  return Session(cfg=cfg, mesh=mesh, abstract_state=abstract_state, init=init, step=compiled_step,
                 data_iterator=train_iter, next_batch=lambda: to_global(next(train_iter)), evaluate=evaluate,
                 tokens_per_step=tokens_per_step, flops_per_step=flops_per_step, peak_tflops=peak,
                 compile_s=compile_s)


def _restore_or_init(s: Session, ckpt: Checkpointer | None) -> tuple[TrainState, int]:
  restored = ckpt.restore_latest(s.abstract_state, s.data_iterator, s.cfg.model) if ckpt else None
  if restored is None:
    return s.init(), 0
  state, step, meta = restored
  saved_mesh, mesh = meta["config"]["mesh"], {a: s.cfg.mesh[a] for a in MESH_AXES}
  resharded = f"; resharded from mesh {saved_mesh} to {mesh}" if saved_mesh != mesh else ""
  log.info("resumed from the checkpoint at step %d%s", step, resharded)
  return state, step


def run(cfg: ml_collections.ConfigDict, workdir: str, devices=None) -> list[dict]:
  """Trains with a validated, resolved config (`maxlm.config.validate`); returns the records logged by this call.

  Resumes from the newest readable checkpoint in `workdir`, if any. SIGTERM/SIGINT end the run after the
  current step with a checkpoint (when checkpointing is on).
  """
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json(indent=2))
  s = setup(cfg, devices)
  t, c, num_devices = cfg.train, cfg.checkpoint, s.mesh.size
  ckpt = Checkpointer(workdir, cfg) if c.every_steps > 0 else None
  state, start = _restore_or_init(s, ckpt)
  if start >= t.steps:
    log.info("the checkpoint is at step %d and train.steps=%d: nothing to train; raise train.steps to continue",
             start, t.steps)
    ckpt.close()
    return []
  writer = MetricsWriter(workdir, tensorboard=cfg.metrics.tensorboard, enabled=is_main, after_step=start)
  progress = Progress(t.steps, enabled=is_main, initial=start)
  stop = StopRequest()
  records, previous, stopping = [], None, False
  window_start, window_steps, last_save = time.perf_counter(), 0, time.monotonic()
  try:
    for step in range(start + 1, t.steps + 1):
      state, metrics = s.step(state, s.next_batch())
      if previous is not None:
        jax.block_until_ready(previous)  # Keep one step in flight: never queue an unbounded backlog.
      previous, window_steps = metrics, window_steps + 1
      stopping, time_due = stop.agreed(c.every_minutes > 0 and time.monotonic() - last_save > 60 * c.every_minutes)
      if ckpt and (step % c.every_steps == 0 or step == t.steps or time_due or stopping):
        ckpt.save(step, state, s.data_iterator, wait=stopping)
        last_save = time.monotonic()
      do_eval = t.eval_every > 0 and (step % t.eval_every == 0 or step == t.steps)
      if step % t.log_every == 0 or step == t.steps or do_eval or stopping:
        record = {"step": step, **{k: float(v) for k, v in jax.device_get(metrics).items()}}
        step_time = (time.perf_counter() - window_start) / window_steps
        achieved = s.flops_per_step / step_time / num_devices / 1e12
        record.update(tokens_per_sec=s.tokens_per_step / step_time, step_time_s=step_time,
                      tflops_per_device=achieved, mfu=achieved / s.peak_tflops)
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
  finally:
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
