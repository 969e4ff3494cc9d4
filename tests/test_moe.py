"""Mixture of Experts: the routed layer against a dense one-hot reference, expert parallelism against one device,
capacity drops by hand, the balancing terms, the layer layout, and training (resume, sharding) with MoE."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxlm import config
from maxlm.errors import UserError
from maxlm.model import flops, moe, transformer
from maxlm.parallel import mesh as mesh_lib
from maxlm.training import loop

from conftest import make_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOE = {
  "model.moe.num_experts": 4,
  "model.moe.top_k": 2,
  "model.moe.mlp_dim": 32,
  "model.num_layers": 2,
}


def layer(**overrides):
  cfg = make_config(**{**MOE, **overrides})
  with nnx.use_eager_sharding(False):
    return moe.MoE(cfg.model, nnx.Rngs(params=0)), cfg


def inputs(shape=(4, 8, 64), seed=1):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def reference(x_BxTxD, m: moe.MoE):
  """Every expert on every token, combined with one-hot routing weights: no sorting, no dispatch."""
  D = x_BxTxD.shape[-1]
  x_XxD = x_BxTxD.reshape(-1, D)
  logits_XxE = x_XxD @ m.router[...]
  scores_XxE = jax.nn.softmax(logits_XxE) if m.router_fn == "softmax" else jax.nn.sigmoid(logits_XxE)
  _, chosen_XxA = jax.lax.top_k(scores_XxE + m.router_bias[...], m.top_k)
  weights_XxA = jnp.take_along_axis(scores_XxE, chosen_XxA, axis=-1)
  if m.renormalize:
    weights_XxA = weights_XxA / weights_XxA.sum(-1, keepdims=True)
  gates_XxE = jnp.sum(jax.nn.one_hot(chosen_XxA, logits_XxE.shape[-1]) * weights_XxA[..., None], axis=1)
  h = jax.nn.silu(jnp.einsum("xd,edf->xef", x_XxD, m.w_gate[...])) * jnp.einsum("xd,edf->xef", x_XxD, m.w_up[...])
  y_XxExD = jnp.einsum("xef,efd->xed", h, m.w_down[...])
  return jnp.einsum("xed,xe->xd", y_XxExD, gates_XxE).reshape(x_BxTxD.shape)


def _grads(fn, m, x):
  """Gradients of sum(fn(m, x)²) with respect to the layer's parameters and its input."""
  graphdef, params = nnx.split(m)

  def objective(params, x):
    return jnp.sum(jnp.square(fn(nnx.merge(graphdef, params), x)))

  return jax.grad(objective, argnums=(0, 1))(params, x)


@pytest.mark.parametrize(
  "router, kernel", [("softmax", "ragged_dot"), ("sigmoid", "ragged_dot"), ("softmax", "megablox")]
)
def test_dropless_matches_the_dense_one_hot_reference(router, kernel):
  """ragged_dot, and the Megablox TPU kernel (in the Pallas interpreter here), against every expert on every token."""
  m, _ = layer(**{"model.moe.router": router, "model.moe.grouped_matmul": kernel})
  x = inputs()
  y, aux = m(x)
  np.testing.assert_allclose(y, reference(x, m), rtol=1e-5, atol=1e-5)
  assert float(aux["dropped"]) == 0.0 and float(aux["counts"].sum()) == x.shape[0] * x.shape[1] * 2
  got = _grads(lambda net, x: net(x)[0], m, x)
  want = _grads(reference_of, m, x)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def reference_of(net, x):
  return reference(x, net)


def test_capacity_drops_later_choices_first_as_computed_by_hand():
  """4 tokens, 2 experts, top_k 1 and capacity_factor 1: Cap = ceil(1 · 4 · 1 / 2) = 2 slots per expert. Tokens 0, 1
  and 3 choose expert 0, token 2 expert 1: token 3 finds expert 0 full and is dropped (output 0); the others get
  their expert's SwiGLU times a weight of 1 (renormalised top-1)."""
  m, _ = layer(**{"model.moe.num_experts": 2, "model.moe.top_k": 1, "model.moe.capacity_factor": 1.0})
  D = 64
  assert moe.capacity(4, 1, 2, 1.0) == 2
  router = np.zeros((D, 2), np.float32)
  router[0] = [1.0, -1.0]  # feature 0 > 0 sends a token to expert 0, < 0 to expert 1
  m.router[...] = jnp.asarray(router)
  x = np.array(inputs((1, 4, D)))
  x[0, :, 0] = [3.0, 2.0, -2.0, 1.0]
  x = jnp.asarray(x)
  y, aux = m(x)

  def expert(e, v):
    return (jax.nn.silu(v @ m.w_gate[e]) * (v @ m.w_up[e])) @ m.w_down[e]

  want = np.stack([expert(0, x[0, 0]), expert(0, x[0, 1]), expert(1, x[0, 2]), np.zeros(D)])
  np.testing.assert_allclose(y[0], want, rtol=1e-5, atol=1e-6)
  assert float(aux["dropped"]) == pytest.approx(0.25)
  np.testing.assert_array_equal(aux["counts"], [3, 1])  # counted as chosen, before the drop


def test_capacity_with_room_for_every_copy_equals_dropless():
  m, _ = layer(**{"model.moe.capacity_factor": 2.0})  # 4 experts: Cap = X·A/2, enough unless very unbalanced
  x = inputs()
  y, aux = m(x)
  if float(aux["dropped"]) == 0.0:
    np.testing.assert_allclose(y, reference(x, m), rtol=1e-5, atol=1e-5)
  m.capacity_factor = 4.0  # = E / top_k · 2: room for all copies whatever the routing
  y, aux = m(x)
  assert float(aux["dropped"]) == 0.0
  np.testing.assert_allclose(y, reference(x, m), rtol=1e-5, atol=1e-5)


def test_balance_loss_is_one_for_uniform_probabilities_and_larger_when_skewed():
  m, _ = layer()
  m.router[...] = jnp.zeros_like(m.router[...])  # every probability 1/E
  _, aux = m(inputs())
  assert float(aux["balance_loss"]) == pytest.approx(1.0)
  assert float(aux["router_z_loss"]) == pytest.approx(np.log(4.0) ** 2, rel=1e-6)  # logsumexp(0, 0, 0, 0) = log 4
  router = np.zeros((64, 4), np.float32)
  router[:, 0] = 1.0  # expert 0 preferred by tokens with a positive feature sum
  m.router[...] = jnp.asarray(router) * 3
  _, skewed = m(jnp.abs(inputs()))
  assert float(skewed["balance_loss"]) > 1.5


def test_expert_bias_steers_the_choice_and_moves_against_the_load():
  m, _ = layer()
  x = inputs()
  m.router_bias[...] = jnp.array([0.0, 0.0, 10.0, 10.0])  # experts 2 and 3 always win the top-2
  y, aux = m(x)
  np.testing.assert_array_equal(aux["counts"], [0, 0, 32, 32])
  np.testing.assert_allclose(y, reference(x, m), rtol=1e-5, atol=1e-5)  # weights from the scores, not the bias
  params = {"moe_blocks": {"mlp": {"router_bias": moe.RouterBias(jnp.zeros((1, 4)))}}}
  moved = moe.update_router_bias(params, aux["counts"][None], 0.01)
  np.testing.assert_allclose(moved["moe_blocks"]["mlp"]["router_bias"][...], [[0.01, 0.01, -0.01, -0.01]])


def _loss_and_grads(cfg, devices, tokens):
  """A loss of the whole model's output and MoE terms, and its gradients, on `devices` with the config's mesh."""
  mesh = mesh_lib.from_config(cfg.mesh, devices)
  graphdef, params = nnx.split(transformer.create(cfg.model, seed=0))
  params = jax.device_put(params, mesh_lib.tree_shardings(params, mesh))

  def objective(params, tokens):
    x, aux = nnx.merge(graphdef, params).forward(tokens)
    return jnp.mean(jnp.square(x)) + jnp.mean(aux["balance_loss"]) + jnp.mean(aux["router_z_loss"]), aux

  with jax.set_mesh(mesh):
    tokens = jax.device_put(tokens, mesh_lib.batch_sharding(mesh))
    (value, aux), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params, tokens)
  return value, aux, grads


@pytest.mark.parametrize(
  "overrides, reference_mesh",
  [
    ({}, None),
    ({"model.moe.router": "sigmoid", "model.moe.shared_experts": 1}, None),
    ({"model.moe.grouped_matmul": "megablox"}, None),
    # Capacity is per device, so the reference splits the rows the same way, over the data axis.
    ({"model.moe.capacity_factor": 1.0}, {"mesh.data": 4, "mesh.tensor": 2}),
  ],
  ids=["dropless", "sigmoid-shared", "megablox", "capacity"],
)
def test_expert_parallel_over_4_devices_equals_the_reference(devices, overrides, reference_mesh):
  """Loss and gradients of the whole model on mesh expert=4 x tensor=2 equal those on one device (dropless), or on
  data=4 x tensor=2 without expert parallelism (capacity, which drops per device)."""
  layout = {**MOE, **overrides, "model.num_layers": 3, "model.moe.first_dense": 1}
  tokens = jax.random.randint(jax.random.key(0), (8, 16), 0, 256)
  if reference_mesh is None:
    want = _loss_and_grads(make_config(**layout), devices[:1], tokens)
  else:
    want = _loss_and_grads(make_config(num_devices=8, **layout, **reference_mesh), devices, tokens)
  got = _loss_and_grads(make_config(num_devices=8, **layout, **{"mesh.expert": 4, "mesh.tensor": 2}), devices, tokens)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for k in moe.AUX_KEYS:
    np.testing.assert_allclose(got[1][k], want[1][k], rtol=1e-5, err_msg=k)
  if "model.moe.capacity_factor" in overrides:
    assert float(jnp.max(got[1]["dropped"])) > 0  # the comparison covers drops
  for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want[2]), jax.tree.leaves(got[2])):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_ragged_all_to_all_on_cpu_follows_the_documented_example(devices):
  """XLA:CPU lacks ragged_all_to_all; its stand-in gives the result of the example in jax.lax.ragged_all_to_all's
  docstring (an axis of 2), which is what the real collective computes on GPU and TPU."""
  mesh = jax.make_mesh((2,), ("expert",), devices=devices[:2])
  per_device = {
    "operand": [[1, 2, 2], [3, 4, 0]],
    "output": [[0, 0, 0, 0], [0, 0, 0, 0]],
    "input_offsets": [[0, 1], [0, 1]],
    "send_sizes": [[1, 2], [1, 1]],
    "output_offsets": [[0, 0], [1, 2]],
    "recv_sizes": [[1, 1], [2, 1]],
  }
  args = [
    jnp.asarray(np.concatenate(v), jnp.float32 if k in ("operand", "output") else jnp.int32)
    for k, v in per_device.items()
  ]
  args[0], args[1] = args[0][:, None], args[1][:, None]  # rows of one feature

  def local(*args):
    return moe._ragged_all_to_all(*args, axis="expert")

  spec = jax.sharding.PartitionSpec("expert")
  args = [jax.device_put(a, jax.sharding.NamedSharding(mesh, spec)) for a in args]
  result = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 6, out_specs=spec))(*args)
  np.testing.assert_array_equal(result[:, 0], [1, 3, 0, 0, 2, 2, 4, 0])


def test_scan_and_unrolled_layers_agree():
  overrides = {**MOE, "model.num_layers": 5, "model.moe.first_dense": 1, "model.moe.every": 2}
  cfg = make_config(**overrides)
  assert moe.is_moe_layer(cfg.model) == [False, False, True, False, True]
  net = transformer.create(cfg.model, seed=0)
  assert jax.tree.leaves(nnx.state(net.blocks))[0].shape[0] == 3
  assert jax.tree.leaves(nnx.state(net.moe_blocks))[0].shape[0] == 2
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, cfg.model.vocab_size)
  x_scan, aux_scan = net.forward(tokens)
  net.scan_layers = False
  x_loop, aux_loop = net.forward(tokens)
  np.testing.assert_allclose(x_loop, x_scan, rtol=1e-5, atol=1e-5)
  for k in moe.AUX_KEYS:
    np.testing.assert_allclose(aux_loop[k], aux_scan[k], rtol=1e-5)
  residuals = net.residuals(tokens)  # layer by layer, through `Transformer.layer`
  assert len(residuals) == 6
  np.testing.assert_allclose(net.final_norm(residuals[-1]), x_scan, rtol=1e-5, atol=1e-5)


def test_flops_count_active_parameters():
  cfg = make_config(**{**MOE, "model.moe.shared_experts": 1})
  m = cfg.model
  D, Fe = m.d_model, 32
  dense = make_config().model
  attention_and_head = flops.matmul_params(dense) - 2 * 3 * D * m.mlp_dim
  per_layer_active = D * 4 + 2 * 3 * D * Fe + 3 * D * Fe  # router + top-2 experts + 1 shared
  assert flops.matmul_params(m) == attention_and_head + 2 * per_layer_active
  per_layer_all = D * 4 + 4 * 3 * D * Fe + 3 * D * Fe
  assert flops.matmul_params(m, active=False) == attention_and_head + 2 * per_layer_all
  net = transformer.create(m, seed=0)
  trained = sum(
    x.size for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(net, nnx.Param)) if "norm" not in str(p)
  )
  assert trained == flops.matmul_params(m, active=False)  # tied: the embedding is the output projection


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"model.moe.top_k": 5}, "model.moe.top_k=5 exceeds model.moe.num_experts=4"),
    ({"model.moe.every": 3}, "must be a positive multiple of model.moe.every=3"),
    ({"model.moe.first_dense": 2}, "must be a positive multiple"),
    ({"model.moe.router": "relu"}, "model.moe.router='relu' is not one of softmax, sigmoid"),
    ({"model.moe.capacity_factor": -1.0}, "model.moe.capacity_factor=-1.0 must be >= 0.0"),
  ],
)
def test_bad_moe_configs_are_named(overrides, message):
  with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
    make_config(**{**MOE, **overrides})


def test_expert_axis_must_divide_the_experts():
  with pytest.raises(UserError, match="model.moe.num_experts=4 is not divisible by mesh.expert=8"):
    make_config(num_devices=8, **{**MOE, "mesh.expert": 8, "mesh.data": 1})


RUN = {
  **MOE,
  "train.steps": 6,
  "train.log_every": 1,
  "train.eval_every": 0,
  "metrics.tensorboard": False,
  "metrics.peak_tflops": 1.0,
  "checkpoint.every_steps": 3,
  "model.moe.bias_update_rate": 0.001,
}


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


def test_training_logs_the_moe_terms_and_resumes_bitwise(tmp_path, devices):
  cfg = make_config(**RUN)
  loop.run(cfg, str(tmp_path / "whole"), devices=devices[:1])
  loop.run(cfg, str(tmp_path / "resumed"), devices=devices[:1], stop_at_step=3)
  loop.run(cfg, str(tmp_path / "resumed"), devices=devices[:1])
  whole, resumed = _losses(tmp_path / "whole"), _losses(tmp_path / "resumed")
  assert [whole[s]["loss"] for s in range(1, 7)] == [resumed[s]["loss"] for s in range(1, 7)]
  record = whole[6]
  assert record["moe_balance_loss"] >= 1.0 - 1e-6 and record["moe_router_z_loss"] > 0
  assert record["moe_dropped"] == 0.0 and len(record["moe_layer_load"]) == 2
  assert all(load >= 1.0 for load in record["moe_layer_load"])


def test_moe_training_on_8_devices_matches_one(tmp_path, devices):
  loop.run(make_config(**RUN), str(tmp_path / "one"), devices=devices[:1])
  one = _losses(tmp_path / "one")
  sharded_cfg = make_config(num_devices=8, **{**RUN, "mesh.expert": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  loop.run(sharded_cfg, str(tmp_path / "eight"), devices=devices)
  eight = _losses(tmp_path / "eight")
  np.testing.assert_allclose([eight[s]["loss"] for s in range(1, 7)], [one[s]["loss"] for s in range(1, 7)], rtol=2e-5)


@pytest.mark.parametrize(
  "name, total, active",
  [("mixtral_8x7b", 46.70e9, 12.75e9), ("deepseek_moe_16b", 16.38e9, 2.62e9), ("moe_tiny", 436_288, 214_528)],
)
def test_shipped_moe_configs_have_their_published_sizes(name, total, active):
  """Mixtral 8x7B: 46.7B parameters; DeepSeek-MoE 16B: 16.4B (their model cards); active = matmul weights per token."""
  c = config.load_python(os.path.join(REPO, "configs", f"{name}.py"), "--config").get_config()
  cfg = config.validate(c, num_devices=64 if name != "moe_tiny" else 1, check_paths=False)
  assert flops.param_count(cfg.model) == pytest.approx(total, rel=2e-3)
  assert flops.matmul_params(cfg.model) == pytest.approx(active, rel=2e-3)


@pytest.mark.parametrize("rows, groups", [(64, [10, 0, 30, 24]), (50, [0, 7, 0, 20]), (8, [8, 0, 0, 0])])
def test_tiled_grouped_matmul_equals_ragged_dot(rows, groups):
  """The CPU grouped matmul (segments of tiles) against jax.lax.ragged_dot's own CPU expansion: empty groups, rows
  past the groups (zero), values and gradients."""
  x = jax.random.normal(jax.random.key(0), (rows, 16))
  w = jax.random.normal(jax.random.key(1), (4, 16, 24))
  g = jnp.asarray(groups, jnp.int32)
  np.testing.assert_allclose(moe._grouped_matmul_tiled(x, w, g), jax.lax.ragged_dot(x, w, g), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w, g)))
  got = jax.grad(loss(moe._grouped_matmul_tiled), argnums=(0, 1))(x, w)
  want = jax.grad(loss(jax.lax.ragged_dot), argnums=(0, 1))(x, w)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
