"""Orbax checkpoints of everything a run needs to continue exactly: train state, data position, config.

Layout: `<workdir>/checkpoints/<step>/{state,data,meta}`. `state` is the TrainState (parameters,
optimizer state, step), `data` the Grain iterator state of every process, `meta` JSON with the resolved
config and mesh. Saves are asynchronous: `save` returns once arrays are copied to host memory and the
files are written in the background; Orbax writes into a temporary directory and renames it when
complete, so an interrupted save never looks like a checkpoint.

Restore walks from the newest step down. A checkpoint that fails to read (truncated or missing files) is
moved to `<workdir>/checkpoints_corrupt/` (never deleted) with a warning naming the error, and the next
older one is tried. State is restored straight into the current mesh's shardings, so a run saved on one
mesh or device count resumes on another.
"""

from __future__ import annotations

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

  def save(self, step: int, state, data_iterator, *, extra: dict | None = None, wait: bool = False) -> None:
    """Starts an asynchronous save; returns once the arrays are copied off the devices (or, with
    `wait`, once the checkpoint is complete). `extra` goes into the JSON metadata."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator),
        meta=ocp.args.JsonSave({**self.meta, **(extra or {}), "step": step})))
    if wait:
      self.wait()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def restore_state(self, step: int, abstract_state):
    """Only the train state of a checkpoint (a rollback keeps the data iterator where it is)."""
    return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))["state"]

  def steps(self) -> list[int]:
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
    self.manager.wait_until_finished()
    self.manager.close()


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
