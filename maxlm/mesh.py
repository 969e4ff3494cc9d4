"""The device mesh and the logical-axis rules: the one place that decides how arrays are laid out.

Parameters and activations are annotated with *logical* axis names ("embed", "act_batch", ...). `RULES`
maps each name to mesh axes, so DP, FSDP and TP (and mixes) differ only in the mesh sizes of the config:

  data   : batch split, parameters replicated.
  fsdp   : batch split, parameters and optimizer state split on their "embed" dimension (ZeRO-3);
           XLA all-gathers each weight before use and reduce-scatters its gradient.
  tensor : Megatron tensor parallelism: heads, MLP width and vocab split; one all-reduce per block half.

Axis types are `Auto` on purpose: we give shardings at `jit` boundaries and constrain a few activations,
and XLA's sharding propagation decides the rest (as MaxText does). `jax.make_mesh` defaults to `Explicit`,
which would make every op's sharding part of its type and rejects gathers such as the embedding lookup.

Unlike Flax NNX's rule lookup (a plain dict where unknown names pass through silently), an unknown
logical name here is an error, so a typo cannot silently replicate a weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from maxlm.config import MESH_AXES

BATCH_AXES = ("data", "fsdp")

RULES: dict[str, str | tuple[str, ...] | None] = {
    # Parameters.
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "layers": None,
    # Activations.
    "act_batch": BATCH_AXES,
    "act_seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def build_mesh(sizes: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes `MESH_AXES` of the given (already resolved) sizes over `devices` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh sizes {tuple(sizes)} do not multiply to the {len(devices)} devices")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(names: Sequence[str | None]) -> P:
  """PartitionSpec for an array whose dimensions carry these logical names (None = replicated)."""
  unknown = [n for n in names if n is not None and n not in RULES]
  if unknown:
    raise KeyError(f"logical axis names {unknown} have no rule in maxlm.mesh.RULES")
  return P(*(None if n is None else RULES[n] for n in names))


def tree_shardings(tree, mesh: Mesh):
  """NamedShardings for a pytree of (abstract) arrays; `nnx.Variable`s use their `out_sharding` names."""

  def sharding(leaf):
    if isinstance(leaf, nnx.Variable):
      names = leaf.get_metadata().get("out_sharding") or (None,) * leaf.ndim
      return leaf.replace(NamedSharding(mesh, logical_to_spec(names)))
    return NamedSharding(mesh, P())

  return jax.tree.map(sharding, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of [batch, seq] input arrays: rows split over the data-parallel axes."""
  return NamedSharding(mesh, logical_to_spec(("act_batch", "act_seq")))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Pins an activation's layout inside jit; a no-op when no mesh is set (e.g. plain eager calls)."""
  if jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names))
