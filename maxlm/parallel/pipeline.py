"""Pipeline parallelism: the layers split into stages over the `stage` mesh axis, microbatches flowing through them.

Stages. The blocks' parameters are stacked on a leading "layers" axis of N (the checkpoint layout, whatever the
mesh); with S = mesh.stage and R = model.pipeline_repeats that axis is read as [R, S, L] (L = N / (R·S) layers per
stage per repeat), so stage s runs layers (r·S + s)·L ... (r·S + s + 1)·L - 1 in repeat r: one block of N/S layers
with R = 1 (GPipe), R blocks of L interleaved with the other stages' with R > 1 (circular, as in MaxText). The
"layers" axis is sharded over `stage`, so with R = 1 each stage holds exactly its layers; with R > 1 the [N]
sharding and the [R, S, L] use differ and XLA moves the weights to their stages in every step (an all-to-all of
the block weights, about what FSDP gathers).

Schedule. A batch's rows are cut into M = train.pipeline_microbatches microbatches (strided, so each keeps the
data-parallel split). At iteration k stage s works on microbatch (k - s) mod M in repeat (k - s) // M; a loop over
K = R·M + S - 1 iterations computes every stage at once (`vmap` over the stage axis, `spmd_axis_name="stage"`), then
shifts the stage outputs one stage on (a roll of the stage axis: a collective permute). Stage 0 takes microbatch k
while k < M and afterwards the last stage's output of that microbatch from the previous repeat (R > 1 needs M >= S,
validated, so that output is ready). Stages idle (s > k, or past the end) compute on placeholders that are never
read: the bubble, (S - 1) / K of the stage-iterations, logged at start; MFU counts only the model's FLOPs. Each
stage-iteration is rematerialised (only its input is kept for the backward pass), inside which the blocks keep
`model.remat`'s policy.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

AXIS = "stage"


def size() -> int:
  """The `stage` axis size of the mesh being traced under (1 without a mesh or without that axis)."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty or AXIS not in mesh.axis_names else mesh.shape[AXIS]


def iterations(stages: int, repeats: int, microbatches: int) -> int:
  return repeats * microbatches + stages - 1


def bubble(stages: int, repeats: int, microbatches: int) -> float:
  """The fraction of stage-iterations that compute nothing useful: (S - 1) / (R·M + S - 1)."""
  return (stages - 1) / iterations(stages, repeats, microbatches)


def describe(cfg) -> str:
  """One line on a resolved config's pipeline (empty without one): stages, schedule, microbatches, bubble."""
  S, R, M = cfg.mesh.stage, cfg.model.pipeline_repeats, cfg.train.pipeline_microbatches
  if S == 1:
    return ""
  schedule = "GPipe" if R == 1 else f"circular, {R} repeats"
  layers = cfg.model.num_layers // (S * R)
  return (
    f"{S} stages ({schedule}, {layers} layer(s) per stage per repeat), {M} microbatches, bubble {bubble(S, R, M):.1%}"
  )


def run(
  layer: Callable,
  stacked,
  x_BxTxD: jax.Array,
  positions_BxT: jax.Array,
  segment_ids_BxT: jax.Array,
  *,
  stages: int,
  repeats: int,
  microbatches: int,
) -> jax.Array:
  """x after every layer of `stacked` (parameters with a leading axis of N layers) in order, pipelined over the
  stages; `layer(x, params, positions, segment_ids) -> x` applies one layer."""
  S, R, M = stages, repeats, microbatches
  B, T, D = x_BxTxD.shape
  N = jax.tree.leaves(stacked)[0].shape[0]
  L = N // (R * S)
  # [N, ...] -> [S, R, L, ...]: stage s's layers of every repeat (layer (r·S + s)·L + j at [s, r, j]).
  per_stage = jax.tree.map(lambda a: jnp.swapaxes(a.reshape(R, S, L, *a.shape[1:]), 0, 1), stacked)

  def split(a):
    """[B, ...] -> [M, B/M, ...], row j·M + i in microbatch i (as the train step's gradient accumulation)."""
    return a.reshape(B // M, M, *a.shape[1:]).swapaxes(0, 1)

  inputs_MxbxTxD, positions_MxbxT, segments_MxbxT = split(x_BxTxD), split(positions_BxT), split(segment_ids_BxT)

  def stage_layers(params_RxL, repeat, x_bxTxD, positions_bxT, segment_ids_bxT):
    """One stage's L layers of `repeat` on one microbatch."""
    params_L = jax.tree.map(lambda a: a[repeat], params_RxL)

    def one(x, params):
      return layer(x, params, positions_bxT, segment_ids_bxT), None

    return jax.lax.scan(one, x_bxTxD, params_L)[0]

  all_stages = jax.checkpoint(jax.vmap(stage_layers, spmd_axis_name=AXIS))
  stage_S = jnp.arange(S)

  def iteration(carry, k):
    """Every stage's work of iteration k; the microbatch's positions and segment ids travel with its activations."""
    (x_SxbxTxD, positions_SxbxT, segments_SxbxT), outputs_MxbxTxD = carry
    work_S = k - stage_S  # microbatch-repeat index of each stage's work (< 0 or >= R·M: idle)
    repeat_S = jnp.clip(work_S // M, 0, R - 1)
    m = k % M  # stage 0's microbatch: fresh in the first repeat, the last stage's output of it afterwards
    x_SxbxTxD = x_SxbxTxD.at[0].set(jnp.where(k < M, inputs_MxbxTxD[m], outputs_MxbxTxD[m]))
    positions_SxbxT = positions_SxbxT.at[0].set(positions_MxbxT[m])
    segments_SxbxT = segments_SxbxT.at[0].set(segments_MxbxT[m])
    out_SxbxTxD = all_stages(per_stage, repeat_S, x_SxbxTxD, positions_SxbxT, segments_SxbxT)
    last = work_S[S - 1]  # the last stage's finished microbatch, kept for the next repeat or the output
    done = (last >= 0) & (last < R * M)
    outputs_MxbxTxD = jnp.where(done, outputs_MxbxTxD.at[last % M].set(out_SxbxTxD[S - 1]), outputs_MxbxTxD)
    shift = lambda a: jnp.roll(a, 1, axis=0)  # stage s's input of the next iteration is stage s-1's output
    return (tuple(map(shift, (out_SxbxTxD, positions_SxbxT, segments_SxbxT))), outputs_MxbxTxD), None

  state = tuple(jnp.zeros((S, *a.shape[1:]), a.dtype) for a in (inputs_MxbxTxD, positions_MxbxT, segments_MxbxT))
  (_, outputs_MxbxTxD), _ = jax.lax.scan(
    iteration, (state, jnp.zeros_like(inputs_MxbxTxD)), jnp.arange(iterations(S, R, M))
  )
  return outputs_MxbxTxD.swapaxes(0, 1).reshape(B, T, D)
