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

Parameters alone (`save_params`, `restore_params`): `maxlm convert from-hf` writes `<workdir>/params/`, an
Orbax checkpoint holding `{"params": ...}` in the same tree layout as a train state's parameters, so one
reader serves both: eval, sampling, export and `train.init_from` restore only the parameters (never the
optimizer state) of `checkpoints/<step>/state` or of `params/`, optionally a few arrays at a time.

Restore walks from the newest step down. A checkpoint that fails to read (truncated or missing files) is
moved to `<workdir>/checkpoints_corrupt/` (never deleted) with a warning naming the error, and the next
older one is tried. State is restored straight into the current mesh's shardings, so a run saved on one
mesh or device count resumes on another.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
from collections.abc import Sequence

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from configs import base
from maxlm import config, errors, storage
from maxlm.errors import RunFailed, UserError
from maxlm.model import transformer
from maxlm.parallel import mesh as mesh_lib

log = logging.getLogger("maxlm")


class Checkpointer:
  def __init__(self, workdir: str, cfg: ml_collections.ConfigDict):
    self.directory = storage.join(storage.resolve(workdir), "checkpoints")
    c = cfg.checkpoint
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=c.keep,
        keep_period=c.keep_every or None,
        enable_async_checkpointing=True,
        cleanup_tmp_directories=True,
      ),
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
      },
    )
    self.meta = {"config": cfg.to_dict()}
    # One persistent thread: starting threads per save is itself a stall on a busy host.
    self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="maxlm-checkpoint")
    self._pending: concurrent.futures.Future | None = None

  def save(self, step: int, state, data_iterator, *, extra: dict | None = None, wait: bool = False) -> None:
    """Starts an asynchronous save of `state` and the iterator's current position; returns once the
    device-to-host copy is dispatched (or, with `wait`, once the checkpoint is complete). `extra` goes
    into the JSON metadata."""
    self._join()
    self._check_space(step, state)
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
    self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(snapshot),
        data=grain.checkpoint.CheckpointSave(position),
        meta=ocp.args.JsonSave(meta),
      ),
    )

  def _join(self) -> None:
    """Waits for the save handed to the writer thread to be handed to Orbax; re-raises its error."""
    pending, self._pending = self._pending, None
    if pending is not None:
      try:
        pending.result()
      except Exception as e:  # noqa: BLE001  Only the machine's errors are translated; the rest re-raise as is.
        raise self._write_failed(e) from e

  def wait(self) -> None:
    """Blocks until the last save is complete on disk."""
    self._join()
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._write_failed(e) from e

  def _check_space(self, step: int, state) -> None:
    """Refuses to start a save the file system cannot hold (every process checks its own shards), so a full disk
    stops the run with a report instead of a half-written checkpoint and the storage library's errors."""
    need = int(1.1 * _local_bytes(state)) + (4 << 20)
    free = storage.free_bytes(self.directory)  # None on a bucket: nothing to check.
    if not _everywhere(free is None or free >= need):
      where = f"{free / 1e6:.0f} MB are free" if free is not None and free < need else "another process lacks the space"
      raise RunFailed(
        f"not enough free space for the checkpoint of step {step} in {self.directory}: it needs about "
        f"{need / 1e6:.0f} MB and {where}; {self._resume_hint()}"
      )

  def _write_failed(self, error: Exception) -> Exception:
    problem = errors.environment_problem(error)
    if problem is None:
      return error
    return RunFailed(f"cannot write a checkpoint to {self.directory} ({problem}); {self._resume_hint()}")

  def _resume_hint(self) -> str:
    with contextlib.suppress(Exception):  # A save may still be finishing (its own error is the same problem).
      self.manager.wait_until_finished()
    steps = complete_steps(self.directory)
    if not steps:
      return "no checkpoint was completed: free space (or fix the directory) and rerun"
    return (
      f"the checkpoint at step {steps[-1]} is complete: free space (or lower checkpoint.keep) and rerun the same "
      "command to resume from it"
    )

  def restore_state(self, step: int, abstract_state):
    """Only the train state of a checkpoint (a rollback keeps the data iterator where it is)."""
    self._join()
    return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))["state"]

  def steps(self) -> list[int]:
    self._join()
    return sorted(self.manager.all_steps())

  def restore_latest(
    self,
    abstract_state,
    data_iterator,
    model_cfg: ml_collections.ConfigDict,
    optim_cfg: ml_collections.ConfigDict = None,
    train_cfg: ml_collections.ConfigDict = None,
  ):
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
      if optim_cfg is not None:
        _check_optimizer_matches(meta, model_cfg, optim_cfg, step, train_cfg)
      try:
        restored, error = (
          self.manager.restore(
            step,
            args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iterator)
            ),
          ),
          None,
        )
      except Exception as e:  # noqa: BLE001
        error = e
      # Each process reads its own shards and data state: one process's failure makes the step unusable for all.
      if not _everywhere(error is None):
        self._set_aside(step, error)
        continue
      return restored["state"], step, meta
    return None

  def _set_aside(self, step: int, error: Exception | None) -> None:
    reason = (
      f"{type(error).__name__}: {' '.join(str(error).split())[:300]}" if error else "unreadable on another process"
    )
    log.warning(
      "checkpoint step %d is unreadable (%s); moved to checkpoints_corrupt/, trying an older one", step, reason
    )
    if jax.process_index() == 0:
      corrupt = storage.join(str(storage.Path(self.directory).parent), "checkpoints_corrupt")
      storage.makedirs(corrupt)
      storage.move_tree(storage.join(self.directory, str(step)), storage.join(corrupt, str(step)))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"maxlm_set_aside_{step}")  # Nobody reloads before the move is done.
    self.manager.reload()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._writer.shutdown()
      self.manager.close()


def complete_steps(directory: str) -> list[int]:
  """The steps of the complete checkpoints in `directory` (on a bucket a step's directory exists while it is being
  written; Orbax marks it complete last)."""
  if not any(name.isdigit() for name in storage.listdir(directory)):
    return []
  return sorted(ocp.utils.checkpoint_steps(storage.resolve(directory)))


class _Position:
  """A data iterator's saved position, frozen at save time (Grain's handler calls `get_state()` on the
  writer thread, while the training loop has moved the live iterator on)."""

  def __init__(self, state: bytes):
    self._state = state

  def get_state(self) -> bytes:
    return self._state


def _local_bytes(state) -> int:
  """Bytes of `state` this process writes: one replica of each of its shards."""
  return sum(s.data.nbytes for x in jax.tree.leaves(state) for s in x.addressable_shards if s.replica_id == 0)


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
  diffs = model_differences(meta["config"]["model"], model_cfg)
  if diffs:
    raise UserError(
      f"the checkpoint at step {step} was saved for a different model ({'; '.join(diffs)}): "
      "use the saved model config, or a new --workdir"
    )


def optimizer_layout(optim: dict, model: dict, train: dict | None = None) -> dict:
  """The settings that shape the optimizer state's tree (not its values): a checkpoint restores only into the same."""
  base_width = model.get("mup_base_width") or model.get("d_model")
  d = (train or {}).get("diloco", {})
  return {
    "train.diloco.replicas": d.get("replicas", 1),
    "DiLoCo outer momentum": d.get("replicas", 1) > 1 and d.get("outer_momentum", 0.9) > 0,
    "optim.name": optim.get("name", "adamw"),
    "optim.clip_norm > 0": optim.get("clip_norm", 1.0) > 0,
    "optim.decay_embeddings": optim.get("decay_embeddings", False),
    "muP width multiplier != 1": model.get("parametrization", "sp") == "mup" and base_width != model.get("d_model"),
  }


def _check_optimizer_matches(meta: dict, model_cfg, optim_cfg, step: int, train_cfg=None) -> None:
  saved = optimizer_layout(meta["config"].get("optim", {}), meta["config"]["model"], meta["config"].get("train"))
  now = optimizer_layout(optim_cfg.to_dict(), model_cfg.to_dict(), train_cfg.to_dict() if train_cfg else None)
  diffs = [f"{k}: saved {saved[k]!r}, now {now[k]!r}" for k in now if saved[k] != now[k]]
  if diffs:
    raise UserError(
      f"the checkpoint at step {step} holds another optimizer's state ({'; '.join(diffs)}): use the saved optimizer "
      "settings, or start a new --workdir with train.init_from pointing here (parameters only, fresh optimizer)"
    )


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def model_differences(saved_model: dict, model_cfg: ml_collections.ConfigDict) -> list[str]:
  """`model.KEY: saved X, now Y` for every key that shapes the parameters or their meaning and differs.

  Layout-only keys may change between runs. A key the saved config lacks (written before the key existed)
  counts as its default.
  """
  free = {"scan_layers", "remat", "attention", "compute_dtype", "max_position_embeddings"}
  free |= {
    "pipeline_repeats",
    "context_attention",
    "moe.grouped_matmul",
    "quantization",
  }  # How layers run, not what they hold.
  saved = {**_flat(base.get_config().model.to_dict()), **_flat(saved_model)}
  return [
    f"model.{k}: saved {saved.get(k)!r}, now {v!r}"
    for k, v in _flat(model_cfg.to_dict()).items()
    if k not in free and k.split(".")[0] not in free and saved.get(k) != v
  ]


# Parameters only -----------------------------------------------------------------------------------------

PARAMS_DIR = "params"


def _key(entry) -> str:
  return str(getattr(entry, "key", getattr(entry, "name", entry)))


def _paths(tree) -> tuple[list[tuple[str, ...]], list, object]:
  """(key paths as string tuples, leaves, treedef); the paths are Orbax's nested-dict keys for the tree."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return [tuple(_key(e) for e in path) for path, _ in flat], [leaf for _, leaf in flat], treedef


def param_names(tree) -> list[str]:
  """Dotted names of a parameter tree's arrays, e.g. `blocks.attn.q_proj` (NNX's `.value` level left out)."""
  return [".".join(p[:-1] if p[-1] == "value" else p) for p in _paths(tree)[0]]


def _nested(paths: Sequence[tuple[str, ...]], leaves: Sequence) -> dict:
  root: dict = {}
  for path, leaf in zip(paths, leaves):
    node = root
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf
  return root


def abstract_params(model_cfg: ml_collections.ConfigDict, mesh=None) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, parameters as `jax.ShapeDtypeStruct`s with their shardings on `mesh`); nothing is allocated.
  Without a mesh the structs carry no sharding, and `restore_params` reads them as host NumPy arrays."""
  graphdef, params = nnx.split(nnx.eval_shape(lambda: transformer.create(model_cfg, 0)))
  if mesh is None:
    return graphdef, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  shardings = mesh_lib.tree_shardings(params, mesh)
  return graphdef, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, shardings)


def save_params(directory: str, params) -> None:
  """Writes a parameter tree of NumPy arrays (memory maps welcome) as `{"params": ...}` at `directory`.

  Arrays are written from their buffers as they are: no defensive copy (the default NumPy handler deep-copies
  every array first) and no compression (which buffers the encoded arrays in memory, and gains little on
  float weights), so memory-mapped inputs stream to disk without being held in memory.
  """
  registry = ocp.type_handlers.create_type_handler_registry(
    (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
    (jax.Array, ocp.type_handlers.ArrayHandler()),
  )  # Unused here; its absence is logged as a warning.
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False))
  checkpointer.save(storage.resolve(directory), args=ocp.args.PyTreeSave({"params": params}))


def params_location(workdir: str, step: int | None = None, flag: str = "--workdir") -> tuple[str, int | None]:
  """(directory, step) of a workdir's parameters: `checkpoints/<step>/state` (the newest complete one unless
  `step` is given), else the imported `params/` (step None)."""
  checkpoints = storage.join(workdir, "checkpoints")
  steps = complete_steps(checkpoints)
  if step is not None:
    if step not in steps:
      raise UserError(
        f"--step={step}: {workdir} has no checkpoint at that step (it has: {', '.join(map(str, steps)) or 'none'})"
      )
    return storage.join(checkpoints, str(step), "state"), step
  if steps:
    return storage.join(checkpoints, str(steps[-1]), "state"), steps[-1]
  if storage.isdir(storage.join(workdir, PARAMS_DIR)):
    return storage.join(workdir, PARAMS_DIR), None
  raise UserError(
    f"{flag}={workdir} has no checkpoints and no imported parameters: train with "
    "checkpoint.every_steps > 0, or import a model with maxlm convert from-hf"
  )


def restore_params(directory: str, abstract_params, names: Sequence[str] | None = None):
  """The parameters at `directory` (see `params_location`), restored into the shardings of `abstract_params`
  (a tree of `jax.ShapeDtypeStruct`s; NumPy arrays where they have none). With `names`, only those arrays are read
  and a dict name -> array is returned: export reads one array at a time this way."""
  paths, leaves, treedef = _paths(abstract_params)
  chosen = range(len(paths))
  if names is not None:
    index = {n: i for i, n in enumerate(param_names(abstract_params))}
    chosen = [index[n] for n in names]
  item = {"params": _nested([paths[i] for i in chosen], [leaves[i] for i in chosen])}
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
  try:
    restored = checkpointer.restore(
      storage.resolve(directory),
      args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
      ),
    )["params"]
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise UserError(
      f"{directory}: cannot read the parameters of this model config ({' '.join(str(e).split())[:300]})"
    ) from None
  values = []
  for i in chosen:
    node = restored
    for key in paths[i]:
      node = node[key]
    values.append(node)
  if names is not None:
    return dict(zip(names, values))
  return jax.tree_util.tree_unflatten(treedef, values)


def saved_model_config(workdir: str, flag: str = "--workdir") -> dict:
  """The model config a workdir was trained or imported with (its config.json)."""
  return config.read_saved(workdir, flag).get("model", {})


def restore_model(
  cfg: ml_collections.ConfigDict, workdir: str, devices=None, step: int | None = None
) -> transformer.Transformer:
  """The model of a workdir for sampling and evaluation: the parameters only (no optimizer state) of its
  newest checkpoint (or of `step`), or its imported parameters; placed on `cfg.mesh` over `devices`."""
  mesh = mesh_lib.from_config(cfg.mesh, devices)
  directory, _ = params_location(workdir, step)
  diffs = model_differences(saved_model_config(workdir), cfg.model)
  if diffs:
    raise UserError(f"--workdir={workdir} holds a different model ({'; '.join(diffs)})")
  graphdef, abstract = abstract_params(cfg.model, mesh)
  return nnx.merge(graphdef, restore_params(directory, abstract))
