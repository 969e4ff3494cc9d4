"""optim.name='muon': Muon for the block projection matrices (per layer), AdamW for the rest; its updates are
orthogonalised matrices; sharded training matches one device; it learns."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from maxlm.model import transformer
from maxlm.parallel import mesh as mesh_lib
from maxlm.training import loop, optim
from maxlm.training import step as step_lib

from conftest import make_config

RUN = {
  "optim.name": "muon",
  "train.steps": 6,
  "train.log_every": 1,
  "train.eval_every": 0,
  "metrics.tensorboard": False,
  "metrics.peak_tflops": 1.0,
  "checkpoint.every_steps": 0,
}


def test_which_parameters_get_muon():
  cfg = make_config(**{"model.tie_embeddings": False, "model.qk_norm": True})
  _, params = nnx.split(transformer.create(cfg.model, 0))
  labels = {
    jax.tree_util.keystr(p, simple=True, separator="/").removesuffix("/value"): label
    for p, label in jax.tree_util.tree_leaves_with_path(optim.labels(params))
  }
  muon = {k for k, v in labels.items() if v == "muon"}
  assert muon == {f"blocks/attn/{n}_proj" for n in "qkvo"} | {f"blocks/mlp/{n}_proj" for n in ("gate", "up", "down")}
  assert {k for k, v in labels.items() if v == "adamw"} == {
    "embed",
    "lm_head",
    "final_norm/scale",
    "blocks/attn_norm/scale",
    "blocks/mlp_norm/scale",
    "blocks/attn/q_norm/scale",
    "blocks/attn/k_norm/scale",
  }
  dims = optim.matrix_dimensions(params)
  assert dims["blocks"]["attn"]["q_proj"].get_value() == optax_dims((1,), (2, 3))  # [N, D, H, Dh]: D in, H·Dh out
  assert dims["blocks"]["attn"]["o_proj"].get_value() == optax_dims((1, 2), (3,))  # [N, H, Dh, D]: H·Dh in, D out


def optax_dims(reduction, output):
  import optax

  return optax.contrib.MuonDimensionNumbers(reduction, output)


def test_a_muon_update_is_an_orthogonal_matrix_per_layer():
  """One step from zero momentum: each layer's q_proj update, as a [D, H·Dh] matrix, has (nearly) equal singular
  values (Newton-Schulz orthogonalisation), unlike the gradient; AdamW parameters move by about lr."""
  cfg = make_config(**{"optim.name": "muon", "optim.weight_decay": 0.0, "optim.warmup_steps": 0, "optim.clip_norm": 0})
  _, params = nnx.split(transformer.create(cfg.model, 0))
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
  tx, _ = optim.make(cfg.optim, 10)
  updates, _ = tx.update(grads, tx.init(params), params)

  def spread(matrix):  # singular values: the fraction within [0.6, 1.4] x the median
    s = np.linalg.svd(matrix.reshape(matrix.shape[0], -1), compute_uv=False)
    return np.mean((s > 0.6 * np.median(s)) & (s < 1.4 * np.median(s)))

  # Muon's 5 quintic Newton-Schulz steps bring singular values to about [0.7, 1.2]; only the few smallest of a
  # random square matrix stay below.
  for layer in np.asarray(updates["blocks"]["attn"]["q_proj"][...]):  # [N, D, H, Dh]
    assert spread(layer) > 0.9
  assert spread(np.asarray(grads["blocks"]["attn"]["q_proj"][...])[0]) < 0.6
  embed = np.asarray(updates["embed"][...])
  assert np.abs(embed).max() == pytest.approx(cfg.optim.lr, rel=0.05)  # Adam's first step: lr · sign(g)


def test_muon_sharded_over_8_devices_matches_one_device(tmp_path, devices):
  one = loop.run(make_config(**RUN), str(tmp_path / "one"), devices=devices[:1])
  sharded_cfg = make_config(num_devices=8, **{**RUN, "mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2})
  sharded = loop.run(sharded_cfg, str(tmp_path / "eight"), devices=devices)
  np.testing.assert_allclose([r["loss"] for r in sharded], [r["loss"] for r in one], rtol=2e-5)
  assert one[-1]["loss"] < one[0]["loss"]


def test_muon_state_is_sharded_like_the_parameters(devices):
  cfg = make_config(num_devices=8, **{"optim.name": "muon", "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  mesh = mesh_lib.from_config(cfg.mesh, devices)
  tx, _ = optim.make(cfg.optim, cfg.train.steps)
  _, abstract, init = step_lib.init_state(cfg.model, tx, mesh, seed=0)
  state = init()
  specs = {
    jax.tree_util.keystr(p, simple=True, separator="/"): x.sharding.spec
    for p, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
    if isinstance(x, jax.Array) and x.ndim == 4
  }
  momentum = [s for k, s in specs.items() if "q_proj" in k]
  assert momentum and all(s == P("stage", ("fsdp", "context"), "tensor", None) for s in momentum), specs
  assert jnp.isfinite(jax.tree.leaves(state.opt_state)[0]).all()
