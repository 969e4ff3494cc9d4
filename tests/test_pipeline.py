"""Pipeline parallelism (maxlm/parallel/pipeline.py): with the layers split over `stage`, GPipe and circular
schedules give the loss and gradients of the unpipelined model; checkpoints move between pipelined and plain runs."""

import json
import os
import re

import jax
import numpy as np
import pytest
from flax import nnx

from maxlm.errors import UserError
from maxlm.model import transformer
from maxlm.parallel import mesh as mesh_lib
from maxlm.parallel import pipeline
from maxlm.training import loop
from maxlm.training import step as step_lib

from conftest import make_config

LAYOUT = {"model.num_layers": 8, "train.global_batch": 16, "data.seq_len": 16}


def _loss_and_grads(cfg, devices, batch):
  mesh = mesh_lib.from_config(cfg.mesh, devices)
  graphdef, params = nnx.split(transformer.create(cfg.model, seed=0))
  params = jax.device_put(params, mesh_lib.tree_shardings(params, mesh))

  def objective(params, batch):
    return step_lib.loss_terms(params, graphdef, batch, 1e-4, 0, pipeline_microbatches=cfg.train.pipeline_microbatches)

  with jax.set_mesh(mesh):
    batch = {k: jax.device_put(v, mesh_lib.batch_sharding(mesh)) for k, v in batch.items()}
    (value, _), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params, batch)
  return value, grads


def _batch(rows, seq_len):
  rng = np.random.default_rng(0)
  batch = {k: rng.integers(0, 256, (rows, seq_len)).astype(np.int32) for k in ("inputs", "targets")}
  segment_ids = np.repeat(np.array([[1] * (seq_len // 2) + [2] * (seq_len - seq_len // 2)]), rows, 0)
  positions = np.concatenate([np.arange(seq_len // 2), np.arange(seq_len - seq_len // 2)])
  batch.update(
    segment_ids=segment_ids.astype(np.int32),
    positions=np.broadcast_to(positions, (rows, seq_len)).astype(np.int32),
    loss_mask=np.ones((rows, seq_len), np.int32),
  )
  return batch


@pytest.mark.parametrize(
  "overrides",
  [
    {"mesh.stage": 4, "mesh.data": 2},  # GPipe, M = S
    {"mesh.stage": 4, "mesh.data": 2, "train.pipeline_microbatches": 8},  # M = 2S
    {"mesh.stage": 4, "mesh.data": 2, "model.pipeline_repeats": 2},  # circular, M = S
    {"mesh.stage": 4, "mesh.data": 2, "model.pipeline_repeats": 2, "train.pipeline_microbatches": 8},
    {"mesh.stage": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "model.remat": "full"},
  ],
  ids=["gpipe-m4", "gpipe-m8", "circular-m4", "circular-m8", "s2-fsdp2-tensor2-remat"],
)
def test_pipelined_loss_and_gradients_equal_the_plain_model(devices, overrides):
  batch = _batch(16, 16)
  want = _loss_and_grads(make_config(**LAYOUT), devices[:1], batch)
  got = _loss_and_grads(make_config(num_devices=8, **LAYOUT, **overrides), devices, batch)
  np.testing.assert_allclose(got[0], want[0], rtol=2e-5)
  for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want[1]), jax.tree.leaves(got[1])):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5 * np.max(np.abs(w)), err_msg=jax.tree_util.keystr(path))


def test_the_stage_axis_splits_the_stacked_layers(devices):
  cfg = make_config(num_devices=8, **LAYOUT, **{"mesh.stage": 4, "mesh.data": 2})
  mesh = mesh_lib.from_config(cfg.mesh, devices)
  _, params = nnx.split(transformer.create(cfg.model, seed=0))
  params = jax.device_put(params, mesh_lib.tree_shardings(params, mesh))
  q = params["blocks"]["attn"]["q_proj"][...]
  assert q.addressable_shards[0].data.shape[0] == 2  # 8 layers over 4 stages


def test_gpipe_step_moves_activations_and_never_gathers_weights(devices):
  """In the compiled GPipe step the stages exchange activations by collective-permute ([1 stage, rows, T, D]) and
  no weight is gathered: each stage computes with the layers it holds."""
  cfg = make_config(num_devices=8, **LAYOUT, **{"mesh.stage": 4, "mesh.data": 2})
  hlo = step_lib.build_step(cfg, devices).lower().compile().as_text()
  permuted = re.findall(r"= (f32\[[0-9,]+\])\S* collective-permute\(", hlo)
  assert "f32[1,2,16,64]" in permuted, permuted  # 16 rows / 2 data / 4 microbatches = 2 rows per stage
  assert " all-gather(" not in hlo


def test_bubble_fraction():
  assert pipeline.bubble(4, 1, 4) == pytest.approx(3 / 7)
  assert pipeline.bubble(4, 2, 8) == pytest.approx(3 / 19)
  assert pipeline.bubble(1, 1, 1) == 0


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_checkpoints_move_between_pipelined_and_plain_runs(tmp_path, devices):
  """A run checkpointed with stage=4 resumes on one device, and one checkpointed on one device resumes with stage=4
  and circular repeats; both continue the uninterrupted run's losses."""
  run = {**LAYOUT, "train.steps": 6, "checkpoint.every_steps": 3, "train.eval_every": 3, "train.log_every": 1}
  pipelined = {"mesh.stage": 4, "mesh.data": 2}
  loop.run(make_config(**run), str(tmp_path / "plain"), devices=devices[:1])
  want = _losses(tmp_path / "plain")
  for name, first, second in [
    ("pipe_then_plain", (pipelined, devices), ({}, devices[:1])),
    ("plain_then_pipe", ({}, devices[:1]), ({**pipelined, "model.pipeline_repeats": 2}, devices)),
  ]:
    workdir = str(tmp_path / name)
    for (overrides, devs), stop in [(first, 3), (second, None)]:
      cfg = make_config(num_devices=len(devs), **run, **overrides)
      loop.run(cfg, workdir, devices=devs, stop_at_step=stop)
    got = _losses(workdir)
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], rtol=2e-5, err_msg=name)


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"mesh.stage": 2, "model.num_layers": 3}, "model.num_layers=3 is not divisible by mesh.stage"),
    (
      {"mesh.stage": 4, "model.num_layers": 8, "model.pipeline_repeats": 2, "train.pipeline_microbatches": 2},
      "train.pipeline_microbatches=2 < mesh.stage=4",
    ),
    ({"mesh.stage": 2, "mesh.data": 4, "train.pipeline_microbatches": 3}, "does not divide the 4 rows"),
    ({"mesh.stage": 2, "model.moe.num_experts": 4}, "does not run MoE models yet"),
    ({"mesh.stage": 2, "mesh.context": 2, "data.seq_len": 16}, "with mesh.context > 1 is not supported yet"),
  ],
)
def test_bad_pipeline_configs_are_named(overrides, message):
  with pytest.raises(UserError, match=message):
    make_config(num_devices=8, **overrides)
