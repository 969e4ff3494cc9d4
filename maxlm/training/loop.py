"""The training loop: set up the compiled step, data and checkpoints for a config, then step, log, evaluate
and save until `train.steps`, a stop signal or a failed stability guard.

One step is kept in flight: the host settles step k (guard bookkeeping, logging) while step k+1 runs, never
an unbounded backlog. Everything the loop runs on the devices is `maxlm.training.step`.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from maxlm import storage
from maxlm.config import profile_steps
from maxlm.data import pipeline
from maxlm.errors import UserError
from maxlm.model import flops
from maxlm.parallel import context
from maxlm.parallel import mesh as mesh_lib
from maxlm.parallel import pipeline as pipeline_lib
from maxlm.training import checkpoint, diloco, summary
from maxlm.training import step as step_lib
from maxlm.training.checkpoint import Checkpointer
from maxlm.training.guard import Diverged, Guard
from maxlm.training.metrics import MetricsWriter, Progress
from maxlm.training.step import StepProgram, TrainState

log = logging.getLogger("maxlm")


@dataclasses.dataclass
class Session:
  """A compiled training setup: what a loop (train, benchmark) needs, built the same way for both."""

  cfg: ml_collections.ConfigDict
  program: StepProgram  # mesh, abstract state, init and the jitted steps
  step: Callable  # `program.step` compiled: (state, global batch, controls) -> (state, metrics); donates `state`
  data_iterator: Any  # this process's Grain training iterator (checkpointable)
  next_batch: Callable[[], dict]  # the next global training batch, on device
  evaluate: Callable[[nnx.State], float]  # mean eval loss over train.eval_batches held-out batches
  tokens_per_step: int
  flops_per_step: float
  peak_tflops: float  # per device, for MFU
  compile_s: float

  @property
  def mesh(self) -> jax.sharding.Mesh:
    return self.program.mesh


def setup(cfg: ml_collections.ConfigDict, devices=None) -> Session:
  """Mesh, state shardings, data iterators and the AOT-compiled train step for a validated, resolved config."""
  devices = list(jax.devices() if devices is None else devices)
  t = cfg.train
  program = step_lib.build_step(cfg, devices)
  mesh, batch_sharding = program.mesh, program.batch_sharding
  tokens_per_step = t.global_batch * cfg.data.seq_len
  flops_per_step = flops.training_flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step
  peak, peak_source = flops.peak_tflops_per_device(cfg.metrics.peak_tflops, cfg.model.compute_dtype, devices)
  log.info("%d devices (%s), mesh %s", len(devices), devices[0].device_kind, dict(mesh.shape))
  log.info(
    "model: %.2fM parameters, %.3g training FLOPs/token; MFU peak %.4g TFLOP/s/device (%s)",
    flops.param_count(cfg.model) / 1e6,
    flops_per_step / tokens_per_step,
    peak,
    peak_source,
  )

  rows = mesh_lib.HostRows(batch_sharding, t.global_batch, cfg.data.seq_len)
  if stages := pipeline_lib.describe(cfg):
    log.info("pipeline: %s", stages)
  if (d := cfg.train.diloco).replicas > 1:
    sent, dp = diloco.bytes_per_step(cfg)
    log.info(
      "DiLoCo: %d replicas, an outer step every %d steps%s: each replica sends %.4g MB per step on average, "
      "data parallelism %.4g MB (%.0fx less)",
      d.replicas,
      d.sync_every,
      f" in {d.fragments} staggered fragments" if d.fragments > 1 else "",
      sent / 1e6,
      dp / 1e6,
      dp / sent,
    )
  train_iter, eval_iter = pipeline.train_and_eval(cfg, rows.shard, rows.shards)
  t0 = time.perf_counter()
  compiled_step = program.lower().compile()
  compile_s = time.perf_counter() - t0
  log.info("train step compiled in %.1f s", compile_s)

  c = mesh.shape["context"]

  shape = (t.global_batch, cfg.data.seq_len)

  def to_global(local_batch):
    """This process's rows (`rows.local`) as global arrays, the sequence in the context shards' layout."""
    local_batch = context.balance({k: local_batch[k] for k in step_lib.BATCH_KEYS}, c)
    return {
      k: jax.make_array_from_callback(shape, batch_sharding, lambda index, v=v: v[rows.local(index[0]), index[1]])
      for k, v in local_batch.items()
    }

  def evaluate(params) -> float:
    it, loss_sum, count = eval_iter(), 0.0, 0.0
    with jax.set_mesh(mesh):
      for _ in range(t.eval_batches):
        s, n = jax.device_get(program.eval(params, to_global(next(it))))  # Blocking: one program in flight.
        loss_sum, count = loss_sum + float(s), count + float(n)
    return loss_sum / max(count, 1.0)

  return Session(
    cfg=cfg,
    program=program,
    step=compiled_step,
    data_iterator=train_iter,
    next_batch=lambda: to_global(next(train_iter)),
    evaluate=evaluate,
    tokens_per_step=tokens_per_step,
    flops_per_step=flops_per_step,
    peak_tflops=peak,
    compile_s=compile_s,
  )


def _restore_or_init(s: Session, ckpt: Checkpointer | None, guard: Guard) -> tuple[TrainState, int]:
  restored = (
    ckpt.restore_latest(s.program.abstract_state, s.data_iterator, s.cfg.model, s.cfg.optim, s.cfg.train)
    if ckpt
    else None
  )
  if restored is None:
    return _init(s), 0
  state, step, meta = restored
  guard.load(meta.get("guard"))
  saved_mesh, mesh = mesh_lib.axis_sizes(meta["config"]["mesh"]), mesh_lib.axis_sizes(s.cfg.mesh)
  resharded = f"; resharded from mesh {saved_mesh} to {mesh}" if saved_mesh != mesh else ""
  log.info("resumed from the checkpoint at step %d%s", step, resharded)
  if s.cfg.train.init_from:
    log.info("train.init_from is ignored: the run resumes from its own checkpoint")
  return state, step


def _init(s: Session) -> TrainState:
  """A fresh state: random parameters, or those of `train.init_from` (with a fresh optimizer state)."""
  source = s.cfg.train.init_from
  if not source:
    return s.program.init()
  directory, step = _init_source(s.cfg)
  params = checkpoint.restore_params(directory, s.program.abstract_state.params)
  log.info(
    "initialised the parameters from %s%s; fresh optimizer state", directory, "" if step is None else f" (step {step})"
  )
  return s.program.start_from(params)


def _init_source(cfg: ml_collections.ConfigDict) -> tuple[str, int | None]:
  """(directory, step) of the parameters `train.init_from` names, checked to fit the config's model."""
  source = cfg.train.init_from
  diffs = checkpoint.model_differences(checkpoint.saved_model_config(source, "train.init_from"), cfg.model)
  if diffs:
    raise UserError(
      f"train.init_from={source!r} holds a different model ({'; '.join(diffs)}): use its model "
      "config (e.g. the config.py that maxlm convert from-hf wrote)"
    )
  return checkpoint.params_location(source, flag="train.init_from")


def _controls(cfg: ml_collections.ConfigDict, guard: Guard, step: int) -> dict[str, np.float32]:
  loss_scale = {cfg.train.inject_nan_at_step: np.nan, cfg.train.inject_spike_at_step: 100.0}.get(step, 1.0)
  return step_lib.controls(loss_scale, guard.lr_scale(step), guard.max_loss())


def run(cfg: ml_collections.ConfigDict, workdir: str, devices=None, *, stop_at_step: int | None = None) -> list[dict]:
  """Trains with a validated, resolved config (`maxlm.config.validate`); returns the records logged by this call.

  Resumes from the newest readable checkpoint in `workdir`, if any. SIGTERM/SIGINT end the run after the
  current step with a checkpoint (when checkpointing is on), as does reaching `stop_at_step` (after an eval, when
  evals are on) or, with `train.stop_at_target`, an eval at or below `train.target_eval_loss`. Writes
  `<workdir>/summary.json` when the run ends, however it ends, except for bad input found before training starts.
  Raises `guard.Diverged` when the stability guard runs out of rollbacks.
  """
  started = time.monotonic()
  is_main = jax.process_index() == 0
  if cfg.train.init_from and not any(d.isdigit() for d in storage.listdir(storage.join(workdir, "checkpoints"))):
    _init_source(cfg)  # A wrong train.init_from is reported before anything is compiled or created.
  storage.makedirs(workdir)
  s = setup(cfg, devices)
  ckpt = Checkpointer(workdir, cfg) if cfg.checkpoint.every_steps > 0 else None
  guard = Guard(cfg.train.guard)
  try:
    state, start = _restore_or_init(s, ckpt, guard)
  except BaseException:
    if ckpt:
      ckpt.close()  # Orbax's threads end before the process reports the error.
    raise
  done = _nothing_to_train(cfg, workdir, start)
  if done:
    log.info("%s", done)
    if ckpt:
      ckpt.close()
    return []
  if is_main:  # Only once the run can go on: a refused resume leaves the run's config.json as it was.
    storage.write_atomically(storage.join(workdir, "config.json"), cfg.to_json(indent=2))

  def finish(status: str, reason: str | None) -> None:
    if is_main:
      figures = summary.summarize(
        summary.records(workdir),
        status=status,
        tokens_per_step=s.tokens_per_step,
        flops_per_step=s.flops_per_step,
        num_devices=s.mesh.size,
        peak_tflops=s.peak_tflops,
        target=cfg.train.target_eval_loss,
      )
      devices = f"{s.mesh.size} x {s.mesh.devices.flat[0].device_kind}"
      summary.write(
        workdir, cfg.to_dict(), figures, wall_time_s=time.monotonic() - started, reason=reason, devices=devices
      )

  try:
    records, status, reason = _train(cfg, workdir, s, ckpt, guard, state, start, stop_at_step)
  except Diverged as e:
    finish("diverged", str(e))
    raise
  except BaseException as e:
    finish("stopped" if isinstance(e, KeyboardInterrupt) else "failed", " ".join(f"{type(e).__name__}: {e}".split()))
    raise
  finish(status, reason)
  return records


def _nothing_to_train(cfg: ml_collections.ConfigDict, workdir: str, start: int) -> str | None:
  """Why a resumed run has nothing left to do, or None."""
  if start >= cfg.train.steps:
    return (
      f"the checkpoint is at step {start} and train.steps={cfg.train.steps}: nothing to train; raise train.steps to "
      "continue"
    )
  reached = summary.target_step(summary.records(workdir), cfg.train.target_eval_loss)
  if cfg.train.stop_at_target and reached is not None and reached <= start:
    return f"the run reached train.target_eval_loss at step {reached}: nothing to train (train.stop_at_target)"
  return None


def _scalar_or_list(value) -> float | list[float]:
  """A metric for metrics.jsonl: a float, or a list of floats for a per-layer one (e.g. moe_layer_load)."""
  return float(value) if np.ndim(value) == 0 else [float(v) for v in np.ravel(value)]


def _train(
  cfg: ml_collections.ConfigDict,
  workdir: str,
  s: Session,
  ckpt: Checkpointer | None,
  guard: Guard,
  state: TrainState,
  start: int,
  stop_at_step: int | None,
) -> tuple[list[dict], str, str | None]:
  """The step loop of `run`; returns (records logged, summary status, why it ended)."""
  is_main = jax.process_index() == 0
  t, c, num_devices = cfg.train, cfg.checkpoint, s.mesh.size
  writer = MetricsWriter(workdir, tensorboard=cfg.metrics.tensorboard, enabled=is_main, after_step=start)
  progress = Progress(t.steps, enabled=is_main, initial=start)
  profiler = _Profiler(cfg.metrics.profile_steps, storage.join(workdir, "profile"), enabled=is_main)
  stop = StopRequest()
  records, in_flight, stopping, status, reason = [], None, False, "finished", None
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

  def save(step: int, wait: bool) -> None:
    ckpt.save(step, state, s.data_iterator, extra={"guard": guard.state()}, wait=wait)

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
      pause = step == stop_at_step
      saved = bool(ckpt) and (step % c.every_steps == 0 or step == t.steps or time_due or stopping or pause)
      if saved:
        save(step, wait=stopping or pause)
        last_save = time.monotonic()
      do_eval = t.eval_every > 0 and (step % t.eval_every == 0 or step == t.steps or pause)
      reached = False
      if step % t.log_every == 0 or step == t.steps or do_eval or stopping or pause:
        values = {k: _scalar_or_list(v) for k, v in jax.device_get(metrics).items() if k != "applied"}
        step_time = (time.perf_counter() - window_start) / window_steps
        achieved = s.flops_per_step / step_time / num_devices / 1e12
        record = {
          "step": step,
          **values,
          "tokens_per_sec": s.tokens_per_step / step_time,
          "step_time_s": step_time,
          "tflops_per_device": achieved,
          "mfu": achieved / s.peak_tflops,
        }
        if do_eval:
          record["eval_loss"] = s.evaluate(state.params)
          reached = 0 < record["eval_loss"] <= t.target_eval_loss
        writer.write(record)
        progress.update(step, record)
        records.append(record)
        window_start, window_steps = time.perf_counter(), 0
      if saved:
        writer.sync()  # A bucket workdir's records reach it with each checkpoint (a resume finds them).
      if reached and t.stop_at_target and step < t.steps:
        if ckpt and not saved:
          save(step, wait=True)
        log.info(
          "eval loss %.4f <= train.target_eval_loss=%g at step %d: done", record["eval_loss"], t.target_eval_loss, step
        )
        reason = f"reached train.target_eval_loss={t.target_eval_loss:g} at step {step}"
        break
      if stopping or pause:
        kept = "a checkpoint was saved; rerun the same command to resume" if ckpt else "checkpointing is off"
        why = (stop.name or "another process's signal") if stopping else f"--stop_at_step={stop_at_step}"
        log.info("stopped by %s after step %d: %s", why, step, kept)
        status, reason = "stopped", f"stopped by {why} after step {step}"
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
  if records and status == "finished":
    last = records[-1]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    log.info(
      "done: %d steps, final loss %.4f%s, %.0f tokens/s, MFU %.1f%%",
      last["step"],
      last["loss"],
      f", eval loss {evals[-1]:.4f}" if evals else "",
      last["tokens_per_sec"],
      100 * last["mfu"],
    )
  return records, status, reason


def _rollback(
  ckpt: Checkpointer, s: Session, guard: Guard, *, bad_step: int, step: int, pending
) -> tuple[TrainState, int]:
  """Restores the newest checkpoint from before `bad_step`; the data iterator keeps its place, so the
  batches between that checkpoint and `step` are left behind."""
  jax.block_until_ready(pending)  # The step in flight ran on the old state; its result is dropped.
  ckpt.wait()
  earlier = [k for k in ckpt.steps() if k < bad_step]
  if not earlier:
    raise Diverged(
      f"step {bad_step} failed the stability guard and no checkpoint from before it exists: lower "
      "optim.lr or save checkpoints more often (checkpoint.every_steps)"
    )
  guard.start_rollback(bad_step, earlier[-1], step)
  log.warning(
    "rolling back to the checkpoint at step %d; skipping the data of steps %d-%d; learning rate x%g until step %d",
    earlier[-1],
    earlier[-1] + 1,
    step,
    guard.cfg.rollback_lr_scale,
    guard.lowered_lr_until,
  )
  return ckpt.restore_state(earlier[-1], s.program.abstract_state), earlier[-1]


class _Profiler:
  """A JAX profiler trace (TensorBoard / Perfetto) of the steps `metrics.profile_steps`, on process 0; traced
  into a local directory and uploaded when done for a bucket workdir."""

  def __init__(self, spec: str, directory: str, enabled: bool):
    self.steps = profile_steps(spec) if enabled else None
    self.directory, self.active, self.local = directory, False, directory

  def before(self, step: int) -> None:
    if self.steps and step == self.steps[0]:
      if storage.is_remote(self.directory):
        self.local = storage.staging_dir(self.directory, "profile")
      jax.profiler.start_trace(self.local)
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
      if self.local != self.directory:
        storage.upload_tree(self.local, self.directory)
        shutil.rmtree(self.local, ignore_errors=True)


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
