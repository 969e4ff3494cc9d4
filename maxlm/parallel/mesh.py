"""The device mesh and the logical-axis rules: the one place that decides how arrays are laid out.

Parameters and activations are annotated with *logical* axis names ("embed", "act_batch", ...). `RULES`
maps each name to mesh axes, so DP, FSDP and TP (and mixes) differ only in the mesh sizes of the config:

  diloco : DiLoCo replicas (maxlm/training/diloco.py): each trains apart on its rows; they meet every H steps.
  stage  : pipeline stages: the stacked layers split (maxlm/parallel/pipeline.py); microbatches flow through them.
  data   : batch split, parameters replicated.
  fsdp   : batch split, parameters and optimizer state split on their "embed" dimension (ZeRO-3);
           XLA all-gathers each weight before use and reduce-scatters its gradient.
  expert : MoE experts split (maxlm/model/moe.py moves tokens to them with all_to_all); batch split elsewhere.
  context: every row's sequence split (maxlm/parallel/context.py: load-balanced layout, attention over the shards);
           parameters split on "embed" over fsdp × context, so context shards do not hold replicas.
  tensor : Megatron tensor parallelism: heads, MLP width and vocab split; one all-reduce per block half.

Across TPU slices (or hosts, off TPU) the data-parallel axes may also span the slower data-centre network
(DCN): `mesh.dcn_data` / `mesh.dcn_fsdp` multiply the in-slice (ICI) sizes, and the devices are laid out
with `create_hybrid_device_mesh` so that only those axes cross slices; with both at 1 the mesh is the
plain single-slice one.

Axis types are `Auto` on purpose: we give shardings at `jit` boundaries and constrain a few activations,
and XLA's sharding propagation decides the rest (as MaxText does). `jax.make_mesh` defaults to `Explicit`,
which would make every op's sharding part of its type and rejects gathers such as the embedding lookup.

Unlike Flax NNX's rule lookup (a plain dict where unknown names pass through silently), an unknown
logical name here is an error, so a typo cannot silently replicate a weight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from maxlm.config import DCN_AXES, MESH_AXES

BATCH_AXES = ("data", "fsdp", "expert")

RULES: dict[str, str | tuple[str, ...] | None] = {
  # Parameters.
  "vocab": "tensor",
  "embed": ("fsdp", "context"),
  "heads": "tensor",
  "kv_heads": "tensor",
  "head_dim": None,
  "mlp": "tensor",
  "expert": "expert",
  "norm": None,
  "layers": "stage",
  "replica": "diloco",  # DiLoCo's per-replica copies (maxlm/training/diloco.py)
  # Activations.
  "act_batch": BATCH_AXES,
  "act_seq": "context",
  "act_embed": None,
  "act_heads": "tensor",
  "act_kv_heads": "tensor",
  "act_mlp": "tensor",
  "act_vocab": "tensor",
}


def from_config(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh of a resolved config's `mesh` group (`config.validate` fills the -1 sizes) over `devices`."""
  return build_mesh(mesh_sizes(mesh_cfg), devices, mesh_sizes(mesh_cfg, dcn=True))


def mesh_sizes(mesh_cfg, dcn: bool = False) -> list[int]:
  """Per-slice (ICI) sizes of the mesh axes, or with `dcn` their sizes across slices (1 for `tensor`)."""
  if dcn:
    return [mesh_cfg.get(f"dcn_{a}", 1) if a in DCN_AXES else 1 for a in MESH_AXES]
  return [mesh_cfg.get(a, 1) for a in MESH_AXES]  # An axis missing from an older run's config had size 1.


def axis_sizes(mesh_cfg) -> dict[str, int]:
  """Whole-mesh size of each axis (in-slice size times slices) of a resolved config's `mesh` group."""
  return {a: ici * dcn for a, ici, dcn in zip(MESH_AXES, mesh_sizes(mesh_cfg), mesh_sizes(mesh_cfg, dcn=True))}


def build_mesh(
  sizes: Sequence[int], devices: Sequence[jax.Device] | None = None, dcn_sizes: Sequence[int] | None = None
) -> Mesh:
  """A mesh with axes `MESH_AXES` over `devices` (default: all): axis i has size sizes[i] · dcn_sizes[i],
  where `sizes` are within a slice (ICI) and `dcn_sizes` across slices (default: all 1)."""
  devices = list(jax.devices() if devices is None else devices)
  dcn_sizes = tuple(dcn_sizes or (1,) * len(sizes))
  total = tuple(int(i * d) for i, d in zip(sizes, dcn_sizes))
  if int(np.prod(total)) != len(devices):
    raise ValueError(f"mesh sizes {total} do not multiply to the {len(devices)} devices")
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if int(np.prod(dcn_sizes)) == 1:
    try:
      return jax.make_mesh(total, MESH_AXES, axis_types=axis_types, devices=devices)
    except NotImplementedError:
      # An axis that is no product of physical axes (fsdp 8 x expert 8 on a 4x4x4 slice): split a physical axis.
      grid = mesh_utils.create_device_mesh(total, devices, allow_split_physical_axes=True)
      return Mesh(grid, MESH_AXES, axis_types=axis_types)
  # Granules are TPU slices; elsewhere (GPU nodes, CPU test processes) each process is one.
  grid = mesh_utils.create_hybrid_device_mesh(
    sizes, dcn_sizes, devices, process_is_granule=not _has_slices(devices), allow_split_physical_axes=True
  )
  return Mesh(grid, MESH_AXES, axis_types=axis_types)


def mesh_of(devices: Sequence[jax.Device] | None = None, **sizes: int) -> Mesh:
  """A single-slice mesh with the named axes' sizes (`data=2, tensor=4`) and every other axis 1."""
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise KeyError(f"mesh axes {sorted(unknown)} are not among {MESH_AXES}")
  return build_mesh([sizes.get(a, 1) for a in MESH_AXES], devices)


def _has_slices(devices: Sequence[jax.Device]) -> bool:
  return devices[0].platform == "tpu"  # CPU and GPU devices have a slice_index too, always 0.


def num_granules(devices: Sequence[jax.Device]) -> int:
  """How many groups the DCN mesh axes must split `devices` into: TPU slices, or else processes."""
  if _has_slices(devices):
    return len({getattr(d, "slice_index", 0) for d in devices})
  return len({d.process_index for d in devices})


def logical_to_spec(names: Sequence[str | None]) -> P:
  """PartitionSpec for an array whose dimensions carry these logical names (None = replicated)."""
  unknown = [n for n in names if n is not None and n not in RULES]
  if unknown:
    raise KeyError(f"logical axis names {unknown} have no rule in maxlm.parallel.mesh.RULES")
  return P(*(None if n is None else RULES[n] for n in names))


def tree_shardings(tree, mesh: Mesh):
  """NamedShardings for a pytree of (abstract) arrays; `nnx.Variable`s use their `out_sharding` names."""

  def sharding(leaf):
    if isinstance(leaf, nnx.Variable):
      if not hasattr(leaf.get_value(), "shape"):
        return leaf  # No array inside (an optimizer slot masked out for this parameter, e.g. by optax.partition).
      names = leaf.get_metadata().get("out_sharding") or (None,) * leaf.ndim
      return leaf.replace(NamedSharding(mesh, logical_to_spec(names)))
    return NamedSharding(mesh, P())

  return jax.tree.map(sharding, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of [batch, seq] input arrays: rows split over DiLoCo's replicas, then the data-parallel axes (inside a
  replica the activations' "act_batch" names only the latter)."""
  batch, seq = logical_to_spec(("act_batch", "act_seq"))
  return NamedSharding(mesh, P(("diloco", *batch), seq))


class HostRows:
  """Which rows of a global [B, T] batch this process feeds, given the batch sharding.

  Processes whose devices hold the same rows (a row's sequence split over `context` across hosts, or `tensor`
  spanning hosts) load the same data; the others get disjoint blocks. `shard` and `shards` number the distinct row
  sets in order of their first row, so the global batch is the same whatever the number of processes; `local`
  maps a device's global row slice to the rows of this process's share (the row sets in ascending order)."""

  def __init__(self, sharding: NamedSharding, batch: int, seq_len: int):
    by_process: dict[int, set[tuple[int, int]]] = {}
    for device, index in sharding.devices_indices_map((batch, seq_len)).items():
      rows = index[0].indices(batch)[:2]
      by_process.setdefault(device.process_index, set()).add(rows)
    row_sets = sorted({tuple(sorted(s)) for s in by_process.values()})
    mine = tuple(sorted(by_process[jax.process_index()]))
    sizes = {sum(stop - start for start, stop in s) for s in row_sets}
    if len(sizes) != 1:
      raise ValueError(
        f"processes hold different numbers of batch rows ({sorted(sizes)}): the mesh splits rows unevenly"
      )
    self.batch, self.shard, self.shards, self.rows = batch, row_sets.index(mine), len(row_sets), sizes.pop()
    self._offset, offset = {}, 0
    for start, stop in mine:
      self._offset[start] = offset
      offset += stop - start

  def local(self, rows: slice) -> slice:
    start, stop, _ = rows.indices(self.batch)
    return slice(self._offset[start], self._offset[start] + (stop - start))


def split_count(name: str) -> int:
  """Into how many pieces the mesh being traced under splits a dimension with logical name `name` (1 without one)."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = RULES[name]
  axes = (axes,) if isinstance(axes, str) else axes or ()
  return 1 if mesh.empty else math.prod(mesh.shape[a] for a in axes if a in mesh.axis_names)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Pins an activation's layout inside jit; a no-op when no mesh is set (e.g. plain eager calls)."""
  if jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names))
