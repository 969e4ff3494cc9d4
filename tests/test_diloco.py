"""DiLoCo and streaming DiLoCo (maxlm/training/diloco.py) on 8 fake CPU devices: exact reduction to data-parallel SGD,
replicas that drift apart and meet at each sync, staggered fragments, resume mid-period."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maxlm import config
from maxlm.errors import UserError
from maxlm.parallel import mesh as mesh_lib
from maxlm.training import checkpoint, diloco, loop
from maxlm.training import step as step_lib

from conftest import make_config

RUN = {
  "train.steps": 6,
  "train.log_every": 1,
  "train.eval_every": 0,
  "metrics.tensorboard": False,
  "optim.warmup_steps": 0,
}


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


def _sgd(**overrides):
  """Plain SGD at a constant rate, no clipping or weight decay: DiLoCo with H=1, outer lr 1, no momentum is then
  data-parallel SGD exactly."""
  base = {
    "optim.schedule": "constant",
    "optim.warmup_steps": 0,
    "optim.lr": 0.1,
    "optim.weight_decay": 0.0,
    "optim.clip_norm": 0.0,
  }
  return {**RUN, **base, **overrides}


def _states(cfg, devices, steps):
  """The state after each of `steps` steps of the real train step on synthetic batches."""
  session = loop.setup(cfg, devices)
  state, out = session.program.init(), []
  with jax.set_mesh(session.mesh):
    for _ in range(steps):
      state, _ = session.step(state, session.next_batch(), step_lib.controls())
      out.append(jax.device_get(state))
  return out


def test_with_h1_outer_lr_1_and_no_momentum_diloco_is_data_parallel_sgd(devices, monkeypatch):
  monkeypatch.setattr(
    "maxlm.training.optim.make",
    lambda optim, steps, width=1.0: (optax.sgd(optim.lr), lambda step: optim.lr),
  )
  dp = _states(make_config(num_devices=8, **_sgd(**{"mesh.data": 8})), devices, 3)
  dl = _states(
    make_config(
      num_devices=8,
      **_sgd(
        **{
          "mesh.data": 4,
          "train.diloco.replicas": 2,
          "train.diloco.sync_every": 1,
          "train.diloco.outer_lr": 1.0,
          "train.diloco.outer_momentum": 0.0,
        }
      ),
    ),
    devices,
    3,
  )
  for a, b in zip(dp, dl):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a.params), jax.tree.leaves(b.params)):
      np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    for x, r in zip(jax.tree.leaves(b.params), jax.tree.leaves(b.replicas.params)):
      np.testing.assert_array_equal(r, np.broadcast_to(x, r.shape))  # every replica restarts from the outer model


def test_replicas_drift_apart_between_syncs_and_meet_at_each(devices):
  cfg = make_config(num_devices=8, **{**RUN, "mesh.data": 2, "train.diloco.replicas": 4, "train.diloco.sync_every": 3})
  states = _states(cfg, devices, 6)
  for step, state in enumerate(states, start=1):
    q = state.replicas.params["blocks"]["attn"]["q_proj"][...]
    outer = state.params["blocks"]["attn"]["q_proj"][...]
    spread = float(np.max(np.abs(q - q[:1])))
    if step % 3:
      assert spread > 0, step  # each replica trained on its own rows
    else:
      assert spread == 0 and np.array_equal(q[0], outer), step  # synced: all equal the new outer model
      assert float(state.replicas.outer_update_norm) > 0
  # Between syncs the outer model does not move.
  np.testing.assert_array_equal(states[3].params["embed"][...], states[4].params["embed"][...])


def test_streaming_syncs_each_fragment_once_per_period_staggered(devices):
  """F=2 fragments over 2 layers, H=4: fragment 0 (layer 0 and the non-block parameters) syncs at steps 2 and 6,
  fragment 1 (layer 1) at steps 4 and 8; the bytes logged match the fragment's size."""
  cfg = make_config(
    num_devices=8,
    **{
      **RUN,
      "train.steps": 8,
      "mesh.data": 4,
      "train.diloco.replicas": 2,
      "train.diloco.sync_every": 4,
      "train.diloco.fragments": 2,
    },
  )
  states = _states(cfg, devices, 8)

  def synced(state, select):
    return all(np.array_equal(r, np.broadcast_to(o, r.shape)) for o, r in select(state))

  layer = lambda i: (
    lambda s: [
      (o[i], r[:, i]) for o, r in zip(jax.tree.leaves(s.params["blocks"]), jax.tree.leaves(s.replicas.params["blocks"]))
    ]
  )
  embed = lambda s: [(s.params["embed"][...], s.replicas.params["embed"][...])]
  schedule = {step: (synced(s, layer(0)) and synced(s, embed), synced(s, layer(1))) for step, s in enumerate(states, 1)}
  assert schedule == {
    1: (False, False),
    2: (True, False),
    3: (False, False),
    4: (False, True),
    5: (False, False),
    6: (True, False),
    7: (False, False),
    8: (False, True),
  }
  assert diloco.due_fragment(np.arange(1, 9), 4, 2).tolist() == [2, 0, 2, 1, 2, 0, 2, 1]


def test_streaming_training_resumes_mid_period_bitwise_and_logs_the_traffic(tmp_path, devices):
  run = {**RUN, "train.steps": 8, "checkpoint.every_steps": 3, "mesh.data": 4}
  run.update({"train.diloco.replicas": 2, "train.diloco.sync_every": 4, "train.diloco.comm_dtype": "bfloat16"})
  run["train.diloco.fragments"] = 2  # the checkpoints hold two outer states (one has placeholder rows)
  cfg = make_config(num_devices=8, **run)
  loop.run(cfg, str(tmp_path / "whole"), devices=devices)
  loop.run(cfg, str(tmp_path / "resumed"), devices=devices, stop_at_step=3)  # step 3: mid-period
  loop.run(cfg, str(tmp_path / "resumed"), devices=devices)
  whole, resumed = _losses(tmp_path / "whole"), _losses(tmp_path / "resumed")
  assert [whole[s]["loss"] for s in range(1, 9)] == [resumed[s]["loss"] for s in range(1, 9)]
  params = sum(np.prod(x.shape) for x in jax.tree.leaves(_states(cfg, devices, 1)[0].params))
  sent = [whole[s]["diloco_sent_bytes"] for s in range(1, 9)]
  assert [b > 0 for b in sent] == [False, True] * 4  # a fragment at steps 2, 4, 6, 8
  assert sent[1] + sent[3] == 2 * params and sent[:4] == sent[4:]  # the whole model in bf16 once per period
  assert whole[1]["outer_update_norm"] == 0 and whole[2]["outer_update_norm"] > 0
  # eval, sample and export read the outer model (the run's final one) on one replica
  saved = config.load_workdir(str(tmp_path / "whole"))
  assert saved.train.diloco.replicas == 1 and saved.mesh.diloco == 1
  model = checkpoint.restore_model(saved, str(tmp_path / "whole"), devices[:1])
  np.testing.assert_array_equal(model.embed[...], _states(cfg, devices, 8)[-1].params["embed"][...])


@pytest.mark.parametrize("comm_dtype", ["float32", "bfloat16", "int8"])
def test_the_drift_mean_over_replicas_in_each_comm_dtype(devices, comm_dtype):
  """The outer step's mean of the replicas' drifts, in shard_map over diloco 2 x data 2 x tensor 2 with the
  parameters sharded over tensor: float32 exact, bfloat16 within its roundings, int8 within two quantization steps (a
  row's absmax / 127) and not exact; the same without a mesh."""
  mesh = mesh_lib.mesh_of(devices, diloco=2, data=2, tensor=2)
  rng = np.random.default_rng(0)
  outer = rng.normal(size=(6, 64, 4)).astype(np.float32)
  inner = (outer[None] - rng.normal(scale=1e-3, size=(2, 6, 64, 4)) * [[[[1]]], [[[3]]]]).astype(np.float32)
  spec = jax.sharding.PartitionSpec("diloco", None, "tensor", None)
  exact = np.mean(outer[None] - inner, axis=0)
  with jax.set_mesh(mesh):
    sharded = jax.jit(lambda o, i: diloco.mean_drift(o, i, spec, jnp.dtype(comm_dtype)))(
      jax.device_put(outer, jax.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "tensor"))),
      jax.device_put(inner, jax.NamedSharding(mesh, spec)),
    )
  plain = diloco.mean_drift(jnp.asarray(outer), jnp.asarray(inner), None, jnp.dtype(comm_dtype))
  step = np.abs(outer[None] - inner).max() / 127
  for got in (np.asarray(sharded), np.asarray(plain)):
    err = np.abs(got - exact)
    if comm_dtype == "float32":
      np.testing.assert_allclose(got, exact, rtol=1e-6, atol=1e-9)
    elif comm_dtype == "bfloat16":
      assert err.max() <= 2**-7 * np.abs(outer[None] - inner).max() and err.max() > 0  # 3 roundings of 2^-9
    else:
      assert err.max() <= 2 * step and err.max() > 0.01 * step
  assert diloco.payload_bytes((6, 64, 4), jnp.int8) == 1536 + 4 * 6


def test_int8_communication_trains_like_float32(tmp_path, devices):
  """DiLoCo with H=2 for 8 steps: the losses with int8 drifts stay within 1% of the float32 run's, and each sync
  logs about a quarter of the float32 bytes (the int8 values and a float32 scale per 256)."""
  run = {**RUN, "train.steps": 8, "mesh.data": 4, "train.diloco.replicas": 2, "train.diloco.sync_every": 2}
  logs = {}
  for dtype in ("float32", "int8"):
    loop.run(make_config(num_devices=8, **run, **{"train.diloco.comm_dtype": dtype}), str(tmp_path / dtype), devices)
    logs[dtype] = _losses(tmp_path / dtype)
  f32, int8 = ([logs[d][s]["loss"] for s in range(1, 9)] for d in ("float32", "int8"))
  np.testing.assert_allclose(int8, f32, rtol=0.01)
  assert int8 != f32
  ratio = logs["int8"][2]["diloco_sent_bytes"] / logs["float32"][2]["diloco_sent_bytes"]
  assert 0.25 < ratio < 0.26


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"train.diloco.replicas": 2, "train.diloco.sync_every": 5, "train.diloco.fragments": 2}, "not divisible by"),
    (
      {"train.diloco.replicas": 2, "model.num_layers": 3, "train.diloco.fragments": 3, "train.diloco.sync_every": 3},
      None,
    ),
    ({"train.diloco.replicas": 2, "train.diloco.fragments": 3, "train.diloco.sync_every": 3}, "do not split into"),
    ({"train.diloco.replicas": 2, "mesh.diloco": 4}, "set the replicas with train.diloco.replicas only"),
    ({"train.diloco.replicas": 2, "mesh.stage": 2}, "with mesh.stage > 1 is not supported yet"),
    ({"train.diloco.replicas": 3}, "cannot fill 8 devices"),
    ({"train.diloco.outer_optimizer": "adam"}, "is not one of nesterov, sgd"),
    ({"train.diloco.comm_dtype": "int4"}, "is not one of float32, bfloat16, int8"),
    ({"train.diloco.replicas": 3, "mesh.dcn_diloco": 2}, "replicas=3 is not divisible by mesh.dcn_diloco=2"),
    ({"mesh.dcn_diloco": 2}, "replicas=1 is not divisible by mesh.dcn_diloco=2"),
  ],
)
def test_diloco_configs_are_checked(overrides, message):
  if message is None:
    make_config(num_devices=8, **overrides)
    return
  with pytest.raises(UserError, match=message):
    make_config(num_devices=8, **overrides)


def test_replicas_spread_over_slices():
  """On 2 slices (processes off TPU) with every dcn_* at 1, 4 replicas go 2 per slice across the slices."""
  cfg = make_config(num_devices=8, num_slices=2, **{"train.diloco.replicas": 4, "mesh.data": 2})
  assert (cfg.mesh.dcn_diloco, cfg.mesh.diloco, cfg.mesh.data) == (2, 2, 2)
  assert mesh_lib.axis_sizes(cfg.mesh)["diloco"] == 4
  # a DCN axis chosen by hand is kept: here the replicas sit inside each slice and data spans the slices
  cfg = make_config(num_devices=8, num_slices=2, **{"train.diloco.replicas": 2, "mesh.dcn_data": 2})
  assert (cfg.mesh.dcn_diloco, cfg.mesh.diloco, cfg.mesh.data, cfg.mesh.dcn_data) == (1, 2, 2, 2)
