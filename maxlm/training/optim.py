"""Optax optimizers: global-norm clipping, then AdamW (with a weight-decay mask) or Muon, on a learning-rate schedule.

muon (Jordan et al. 2024; as in the modded-nanogpt speedrun records): the blocks' projection matrices get Muon
(Nesterov momentum orthogonalised by Newton-Schulz, per layer and per matrix as `transformer.MATRIX_AXES` lays them
out, scaled by sqrt(max(1, fan_out/fan_in))) at peak `optim.muon_lr`; embeddings, norm scales and the output head get
AdamW at `optim.lr`. Both follow the same schedule shape, and weight decay applies as `decay_mask` says.

muP (`model.parametrization="mup"`): the blocks' projection matrices take AdamW at learning rate lr/m (m the width
multiplier, `transformer.width_multiplier`), everything else (embeddings, norms, the head) lr: `lr_multipliers`
names each parameter's factor. Under muon the matrices take Muon, whose own shape scaling handles width.
"""

from __future__ import annotations

import jax
import ml_collections
import optax

from maxlm.model.transformer import MATRIX_AXES


def _cosine(cfg: ml_collections.ConfigDict, total_steps: int, warmup: int) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
    0.0, cfg.lr, warmup, max(total_steps, warmup + 1), cfg.lr * cfg.min_lr_ratio
  )


def _constant(cfg: ml_collections.ConfigDict, total_steps: int, warmup: int) -> optax.Schedule:
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), optax.constant_schedule(cfg.lr)], [warmup])


def _wsd(cfg: ml_collections.ConfigDict, total_steps: int, warmup: int) -> optax.Schedule:
  """Warmup-stable-decay (Hu et al. 2024 "MiniCPM"): flat at `lr` until the last `decay_fraction` of the run, then
  linear to `min_lr_ratio·lr`. Its stable phase lets one run branch into several decay lengths."""
  peak, final = cfg.lr, cfg.lr * cfg.min_lr_ratio
  decay_steps = int(round(cfg.decay_fraction * total_steps))
  stable_steps = max(total_steps - warmup - decay_steps, 0)
  return optax.join_schedules(
    [
      optax.linear_schedule(0.0, peak, warmup),
      optax.constant_schedule(peak),
      optax.linear_schedule(peak, final, max(decay_steps, 1)),
    ],
    [warmup, warmup + stable_steps],
  )


# `optim.schedule` -> builder; the names are configs/base.py SCHEDULES.
SCHEDULES = {"cosine": _cosine, "wsd": _wsd, "constant": _constant}


def schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr` over `warmup_steps`, then the `schedule` of the config (see `SCHEDULES`)."""
  return SCHEDULES[cfg.schedule](cfg, total_steps, min(cfg.warmup_steps, total_steps))


def decay_mask(params, decay_embeddings: bool):
  """True for leaves that get weight decay: every projection matrix, the embedding only if configured.

  Norm scales never decay (decaying them pulls the normalised activations towards zero), nor do the MoE routers'
  balancing biases (no gradient reaches them; maxlm/model/moe.py moves them).
  """

  def wants_decay(path, _):
    names = jax.tree_util.keystr(path, simple=True, separator="/").split("/")
    if any("norm" in n for n in names) or "router_bias" in names:
      return False
    if "embed" in names:
      return decay_embeddings
    return True

  return jax.tree_util.tree_map_with_path(wants_decay, params)


def _names(path) -> list[str]:
  return jax.tree_util.keystr(path, simple=True, separator="/").split("/")


def matrix_dimensions(params):
  """Muon's dimension numbers for each block projection matrix of a parameter tree (None for the rest)."""

  def dims(path, x):
    names = _names(path)
    axes = next((MATRIX_AXES[n] for n in names if n in MATRIX_AXES), None)
    if axes is None or names[0] not in ("blocks", "moe_blocks"):
      return None
    layers = x.ndim - 1 - max(max(a) for a in axes)  # the stacked "layers" axis in front
    return optax.contrib.MuonDimensionNumbers(tuple(a + layers for a in axes[0]), tuple(a + layers for a in axes[1]))

  return jax.tree_util.tree_map_with_path(dims, params)


def labels(params):
  """ "muon" for the block projection matrices, "adamw" for everything else (see the module docstring)."""
  return jax.tree.map(
    lambda d: "adamw" if d is None else "muon",
    matrix_dimensions(params),
    is_leaf=lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers),
  )


def lr_multipliers(params, width_multiplier: float = 1.0):
  """Each parameter's AdamW learning-rate factor: 1/m for the block projection matrices under muP, else 1."""
  return jax.tree.map(
    lambda d: 1.0 if d is None else 1.0 / width_multiplier,
    matrix_dimensions(params),
    is_leaf=lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers),
  )


def _adamw(
  cfg: ml_collections.ConfigDict, total_steps: int, width_multiplier: float = 1.0
) -> optax.GradientTransformation:
  mask = lambda p: decay_mask(p, cfg.decay_embeddings)
  adamw = lambda lr: optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
  lr = schedule(cfg, total_steps)
  if width_multiplier == 1.0:
    return adamw(lr)
  hidden = adamw(lambda step: lr(step) / width_multiplier)
  return optax.partition(
    {"hidden": hidden, "other": adamw(lr)},
    lambda p: jax.tree.map(lambda k: "other" if k == 1.0 else "hidden", lr_multipliers(p, width_multiplier)),
  )


def _muon(
  cfg: ml_collections.ConfigDict, total_steps: int, width_multiplier: float = 1.0
) -> optax.GradientTransformation:
  matrices_cfg = ml_collections.ConfigDict({**cfg.to_dict(), "lr": cfg.muon_lr})
  matrices = optax.contrib.muon(
    schedule(matrices_cfg, total_steps),
    beta=cfg.muon_momentum,
    weight_decay=cfg.weight_decay,
    muon_weight_dimension_numbers=matrix_dimensions,
  )
  return optax.partition({"muon": matrices, "adamw": _adamw(cfg, total_steps)}, labels)


# `optim.name` -> builder; the names are configs/base.py OPTIMIZERS.
OPTIMIZERS = {"adamw": _adamw, "muon": _muon}


def make(
  cfg: ml_collections.ConfigDict, total_steps: int, width_multiplier: float = 1.0
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(the optimizer of `cfg`, its learning-rate schedule: optim.lr's, which metrics report); `width_multiplier` is
  muP's m (1 under sp)."""
  tx = OPTIMIZERS[cfg.name](cfg, total_steps, width_multiplier)
  tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx) if cfg.clip_norm > 0 else tx
  return tx, schedule(cfg, total_steps)
