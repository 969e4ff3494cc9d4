"""Orbax checkpoints of everything a run needs to continue exactly: train state, data position, config.

Layout: `<workdir>/checkpoints/<step>/{state,data,meta}`. `state` is the TrainState (parameters,
optimizer state, step), `data` the Grain iterator state of every process, `meta` JSON with the resolved
config and mesh. Saves are asynchronous: `save` returns once arrays are copied to host memory and the
files are written in the background; Orbax writes into a temporary directory and renames it when
complete, so an interrupted save never looks like a checkpoint.

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

import json
import logging
import os
import shutil
from collections.abc import Sequence

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from configs import base
from maxlm import mesh as mesh_lib, model
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
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      except Exception as e:  # noqa: BLE001  Any read failure means this checkpoint is unusable.
        self._set_aside(step, e)
        continue
      _check_model_matches(meta, model_cfg, step)
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iterator)))
      except Exception as e:  # noqa: BLE001
        self._set_aside(step, e)
        continue
      return restored["state"], step, meta
    return None

  def _set_aside(self, step: int, error: Exception) -> None:
    reason = " ".join(str(error).split())[:300]
    log.warning("checkpoint step %d is unreadable (%s: %s); moved to checkpoints_corrupt/, trying an older one",
                step, type(error).__name__, reason)
    if jax.process_index() == 0:
      corrupt = os.path.join(os.path.dirname(self.directory), "checkpoints_corrupt")
      os.makedirs(corrupt, exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), os.path.join(corrupt, str(step)))
    self.manager.reload()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _check_model_matches(meta: dict, model_cfg: ml_collections.ConfigDict, step: int) -> None:
  diffs = model_differences(meta["config"]["model"], model_cfg)
  if diffs:
    raise ConfigError(f"the checkpoint at step {step} was saved for a different model ({'; '.join(diffs)}): "
                      "use the saved model config, or a new --workdir")


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
  saved = {**_flat(base.get_config().model.to_dict()), **_flat(saved_model)}
  return [f"model.{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in _flat(model_cfg.to_dict()).items()
          if k.split(".")[0] not in free and saved.get(k) != v]


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
  graphdef, params = nnx.split(nnx.eval_shape(lambda: model.create(model_cfg, 0)))
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
      (jax.Array, ocp.type_handlers.ArrayHandler()))  # Unused here; its absence is logged as a warning.
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False))
  checkpointer.save(os.path.abspath(directory), args=ocp.args.PyTreeSave({"params": params}))


def params_location(workdir: str, step: int | None = None) -> tuple[str, int | None]:
  """(directory, step) of a workdir's parameters: `checkpoints/<step>/state` (the newest complete one unless
  `step` is given), else the imported `params/` (step None)."""
  checkpoints = os.path.join(workdir, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(checkpoints) if d.isdigit()) if os.path.isdir(checkpoints) else []
  if step is not None:
    if step not in steps:
      raise ConfigError(f"--step={step}: {workdir} has no checkpoint at that step (it has: "
                        f"{', '.join(map(str, steps)) or 'none'})")
    return os.path.join(checkpoints, str(step), "state"), step
  if steps:
    return os.path.join(checkpoints, str(steps[-1]), "state"), steps[-1]
  if os.path.isdir(os.path.join(workdir, PARAMS_DIR)):
    return os.path.join(workdir, PARAMS_DIR), None
  raise ConfigError(f"--workdir={workdir} has no checkpoints and no imported parameters: train with "
                    "checkpoint.every_steps > 0, or import a model with maxlm convert from-hf")


def restore_params(directory: str, abstract_params, names: Sequence[str] | None = None):
  """The parameters at `directory` (see `params_location`), restored into the shardings of `abstract_params`
  (a tree of `jax.ShapeDtypeStruct`s; NumPy arrays where they have none). With `names`, only those arrays are read and a dict name -> array is
  returned: export reads one array at a time this way."""
  paths, leaves, treedef = _paths(abstract_params)
  chosen = range(len(paths))
  if names is not None:
    index = {n: i for i, n in enumerate(param_names(abstract_params))}
    chosen = [index[n] for n in names]
  item = {"params": _nested([paths[i] for i in chosen], [leaves[i] for i in chosen])}
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
  try:
    restored = checkpointer.restore(os.path.abspath(directory), args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))["params"]
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise ConfigError(f"{directory}: cannot read the parameters of this model config ({' '.join(str(e).split())[:300]})"
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


def saved_model_config(workdir: str) -> dict:
  """The model config a workdir was trained or imported with (its config.json)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"--workdir={workdir} has no config.json: not a maxlm run or imported model")
  with open(path) as f:
    return json.load(f)["model"]
