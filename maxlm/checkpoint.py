"""Orbax checkpoints of everything a run needs to continue exactly: train state, data position, config.

Layout: `<workdir>/checkpoints/<step>/{state,data,meta}`. `state` is the TrainState (parameters,
optimizer state, step), `data` the Grain iterator state of every process, `meta` JSON with the resolved
config and mesh. Saves are asynchronous and block training only to *start* a device-to-host copy: `save`
snapshots the state into host memory (a copy, so the next step may donate the device buffers), records
the data iterator's position, and hands both to one background thread that runs Orbax's save (its
directory setup, serialization and writes). One save is in flight at a time; the next `save`, `wait`,
`steps` and every restore first wait for it and re-raise its error. With several processes Orbax's save
call runs on the training thread instead: its barriers are device collectives
(`multihost_utils.sync_global_devices`), and issued from a second thread they could interleave with the
train step's collectives in a different order on each process and deadlock. Orbax writes into a temporary
directory and renames it when complete, so an interrupted save never looks like a checkpoint.

Restore walks from the newest step down. A checkpoint that fails to read (truncated or missing files) is
moved to `<workdir>/checkpoints_corrupt/` (never deleted) with a warning naming the error, and the next
older one is tried. State is restored straight into the current mesh's shardings, so a run saved on one
mesh or device count resumes on another.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import shutil

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from maxlm.config import ConfigError

log = logging.getLogger("maxlm")


class Checkpointer:

  def __init__(self, workdir: str, cfg: ml_collections.ConfigDict):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    c = cfg.checkpoint
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=c.keep, keep_period=c.keep_every or None, enable_async_checkpointing=True,
            cleanup_tmp_directories=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})
    self.meta = {"config": cfg.to_dict()}
    # One persistent thread: starting threads per save is itself a stall on a busy host.
    self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="maxlm-checkpoint")
    self._pending: concurrent.futures.Future | None = None

  def save(self, step: int, state, data_iterator, *, extra: dict | None = None, wait: bool = False) -> None:
    """Starts an asynchronous save of `state` and the iterator's current position; returns once the
    device-to-host copy is dispatched (or, with `wait`, once the checkpoint is complete). `extra` goes
    into the JSON metadata."""
    self._join()
    snapshot = jax.device_put(state, jax.tree.map(_host_sharding, state), may_alias=False)
    position = _Position(json.dumps(data_iterator.get_state(), indent=2).encode())
    meta = {**self.meta, **(extra or {}), "step": step}
    if jax.process_count() == 1:
      self._pending = self._writer.submit(self._save, step, snapshot, position, meta)
    else:
      self._save(step, snapshot, position, meta)
    if wait:
      self.wait()

  def _save(self, step: int, snapshot, position: _Position, meta: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(snapshot), data=grain.checkpoint.CheckpointSave(position),
        meta=ocp.args.JsonSave(meta)))

  def _join(self) -> None:
    """Waits for the save handed to the writer thread to be handed to Orbax; re-raises its error."""
    pending, self._pending = self._pending, None
    if pending is not None:
      pending.result()

  def wait(self) -> None:
    """Blocks until the last save is complete on disk."""
    self._join()
    self.manager.wait_until_finished()

  def restore_state(self, step: int, abstract_state):
    """Only the train state of a checkpoint (a rollback keeps the data iterator where it is)."""
    self._join()
    return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))["state"]

  def steps(self) -> list[int]:
    self._join()
    return sorted(self.manager.all_steps())

  def restore_latest(self, abstract_state, data_iterator, model_cfg: ml_collections.ConfigDict):
    """(state, step, saved meta) of the newest readable checkpoint, or None if there is none."""
    for step in reversed(self.steps()):
      try:
        meta, error = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"], None
      except Exception as e:  # noqa: BLE001  Any read failure means this checkpoint is unusable.
        meta, error = None, e
      if not _everywhere(error is None):
        self._set_aside(step, error)
        continue
      _check_model_matches(meta, model_cfg, step)
      try:
        restored, error = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator))), None
      except Exception as e:  # noqa: BLE001
        error = e
      # Each process reads its own shards and data state: one process's failure makes the step unusable for all.
      if not _everywhere(error is None):
        self._set_aside(step, error)
        continue
      return restored["state"], step, meta
    return None

  def _set_aside(self, step: int, error: Exception | None) -> None:
    reason = (f"{type(error).__name__}: {' '.join(str(error).split())[:300]}" if error
              else "unreadable on another process")
    log.warning("checkpoint step %d is unreadable (%s); moved to checkpoints_corrupt/, trying an older one",
                step, reason)
    if jax.process_index() == 0:
      corrupt = os.path.join(os.path.dirname(self.directory), "checkpoints_corrupt")
      os.makedirs(corrupt, exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), os.path.join(corrupt, str(step)))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"maxlm_set_aside_{step}")  # Nobody reloads before the move is done.
    self.manager.reload()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._writer.shutdown()
      self.manager.close()


class _Position:
  """A data iterator's saved position, frozen at save time (Grain's handler calls `get_state()` on the
  writer thread, while the training loop has moved the live iterator on)."""

  def __init__(self, state: bytes):
    self._state = state

  def get_state(self) -> bytes:
    return self._state


def _host_sharding(x: jax.Array) -> jax.sharding.Sharding:
  """The array's sharding in host memory where the backend has one (GPU, TPU, CPU), else as it is."""
  kinds = {m.kind for m in next(iter(x.devices())).addressable_memories()}
  return x.sharding.with_memory_kind("pinned_host") if "pinned_host" in kinds else x.sharding


def _everywhere(ok: bool) -> bool:
  """True only if `ok` holds on every process (all processes must call it)."""
  if jax.process_count() == 1:
    return ok
  return bool(multihost_utils.process_allgather(np.array([ok], np.int32)).min())


def _check_model_matches(meta: dict, model_cfg: ml_collections.ConfigDict, step: int) -> None:
  saved = meta["config"]["model"]
  # Layout-only keys may change between runs; everything that shapes the parameters may not.
  free = {"scan_layers", "remat", "attention", "compute_dtype"}
  diffs = [f"model.{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in model_cfg.items()
           if k not in free and saved.get(k) != v]
  if diffs:
    raise ConfigError(f"the checkpoint at step {step} was saved for a different model ({'; '.join(diffs)}): "
                      "use the saved model config, or a new --workdir")
