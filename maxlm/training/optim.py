"""Optax optimizer: global-norm clipping, then AdamW with a weight-decay mask, on a learning-rate schedule."""

from __future__ import annotations

import jax
import ml_collections
import optax


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

  Norm scales never decay (decaying them pulls the normalised activations towards zero).
  """

  def wants_decay(path, _):
    names = jax.tree_util.keystr(path, simple=True, separator="/").split("/")
    if any("norm" in n for n in names):
      return False
    if "embed" in names:
      return decay_embeddings
    return True

  return jax.tree_util.tree_map_with_path(wants_decay, params)


def make(cfg: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  lr = schedule(cfg, total_steps)
  adamw = optax.adamw(
    lr,
    b1=cfg.b1,
    b2=cfg.b2,
    eps=cfg.eps,
    weight_decay=cfg.weight_decay,
    mask=lambda p: decay_mask(p, cfg.decay_embeddings),
  )
  tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw) if cfg.clip_norm > 0 else adamw
  return tx, lr
