"""Optimizer: schedules hit their defining points; weight decay skips norms and (by default) embeddings."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from maxlm.model import transformer
from maxlm.training import optim

from conftest import make_config


def test_cosine_schedule():
  o = make_config(**{"optim.lr": 1.0, "optim.warmup_steps": 10, "optim.min_lr_ratio": 0.1}).optim
  lr = optim.schedule(o, 110)
  np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(60), lr(110)], [0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)


def test_wsd_schedule():
  o = make_config(
    **{
      "optim.lr": 1.0,
      "optim.warmup_steps": 10,
      "optim.schedule": "wsd",
      "optim.decay_fraction": 0.2,
      "optim.min_lr_ratio": 0.0,
    }
  ).optim
  lr = optim.schedule(o, 100)  # warmup 0-10, stable 10-80, linear decay 80-100
  np.testing.assert_allclose([lr(5), lr(10), lr(50), lr(80), lr(90), lr(100)], [0.5, 1, 1, 1, 0.5, 0], atol=1e-6)


def test_constant_schedule():
  o = make_config(**{"optim.lr": 2.0, "optim.warmup_steps": 4, "optim.schedule": "constant"}).optim
  lr = optim.schedule(o, 100)
  np.testing.assert_allclose([lr(2), lr(4), lr(99)], [1.0, 2.0, 2.0], atol=1e-6)


def _decayed(params, mask):
  return {
    jax.tree_util.keystr(path, simple=True, separator="/"): bool(v)
    for path, v in jax.tree_util.tree_leaves_with_path(mask)
  }


def test_weight_decay_mask():
  cfg = make_config(**{"model.tie_embeddings": False, "model.qk_norm": True}).model
  _, params = nnx.split(transformer.create(cfg, 0))
  decayed = _decayed(params, optim.decay_mask(params, decay_embeddings=False))
  assert decayed["blocks/attn/q_proj/value"] and decayed["blocks/mlp/down_proj/value"] and decayed["lm_head/value"]
  assert not decayed["embed/value"]
  assert not any(v for k, v in decayed.items() if "norm" in k)
  assert _decayed(params, optim.decay_mask(params, decay_embeddings=True))["embed/value"]


def test_weight_decay_applies_only_to_masked_leaves():
  o = make_config(
    **{
      "optim.weight_decay": 0.5,
      "optim.warmup_steps": 0,
      "optim.schedule": "constant",
      "optim.lr": 0.1,
      "optim.clip_norm": 0.0,
    }
  ).optim
  _, params = nnx.split(transformer.create(make_config().model, 0))
  tx, _ = optim.make(o, 10)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  # With zero gradients, AdamW's update is -lr·wd·p on decayed leaves and exactly 0 elsewhere.
  np.testing.assert_allclose(
    updates["blocks"]["attn"]["q_proj"][...], -0.05 * params["blocks"]["attn"]["q_proj"][...], rtol=1e-6
  )
  assert not np.any(updates["embed"][...]) and not np.any(updates["final_norm"]["scale"][...])
  new = optax.apply_updates(params, updates)
  assert new["embed"][...].dtype == jnp.float32
