"""Training invariants: sharding and gradient accumulation do not change the math; the loss falls."""

import json
import os
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from maxlm.parallel import mesh as mesh_lib
from maxlm.training import loop, optim
from maxlm.training import step as step_lib

from conftest import cli_env, make_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = {
  "train.steps": 6,
  "train.log_every": 1,
  "train.eval_every": 0,
  "metrics.tensorboard": False,
  "metrics.peak_tflops": 1.0,
  "checkpoint.every_steps": 0,
}


def losses(records):
  return np.array([r["loss"] for r in records])


def run(tmp_path, name, devices, **overrides):
  cfg = make_config(num_devices=len(devices), **{**STEPS, **overrides})
  return loop.run(cfg, str(tmp_path / name), devices=devices)


@pytest.fixture(scope="module")
def single_device_losses(tmp_path_factory):
  return losses(run(tmp_path_factory.mktemp("one"), "run", jax.devices()[:1]))


@pytest.mark.parametrize(
  "mesh",
  [
    {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2},
    {"mesh.data": 1, "mesh.fsdp": 8, "mesh.tensor": 1, "train.microbatches": 2},
  ],
)
def test_sharded_run_matches_single_device(tmp_path, devices, single_device_losses, mesh):
  sharded = losses(run(tmp_path, "sharded", devices, **mesh))
  np.testing.assert_allclose(sharded, single_device_losses, rtol=1e-5)
  assert single_device_losses[-1] < single_device_losses[0]  # The runs trained, not just matched.


def test_gradient_accumulation_equals_full_batch(tmp_path, single_device_losses):
  accumulated = losses(run(tmp_path, "accum", jax.devices()[:1], **{"train.microbatches": 4}))
  np.testing.assert_allclose(accumulated, single_device_losses, rtol=1e-5)


def test_parameters_and_optimizer_state_follow_the_rules(devices):
  cfg = make_config(num_devices=8, **{"mesh.data": 1, "mesh.fsdp": 2, "mesh.context": 2, "mesh.tensor": 2})
  mesh = mesh_lib.from_config(cfg.mesh, devices)
  tx, _ = optim.make(cfg.optim, cfg.train.steps)
  _, abstract, init = step_lib.init_state(cfg.model, tx, mesh, seed=0)
  state = init()
  assert jax.tree.map(lambda a: a.sharding, abstract) == jax.tree.map(lambda a: a.sharding, state)
  q = state.params["blocks"]["attn"]["q_proj"]
  fsdp = ("fsdp", "context")  # Context shards split the parameters too.
  assert q.sharding.spec == P("stage", fsdp, "tensor", None)  # layers over pipeline stages
  assert q.addressable_shards[0].data.shape == (2, 16, 2, 16)  # [N, D/(fsdp·context), H/tensor, Dh]
  assert state.params["embed"].sharding.spec == P("tensor", fsdp)
  mu = state.opt_state[1][0].mu["blocks"]["mlp"]["down_proj"]
  assert mu.sharding.spec == P("stage", "tensor", fsdp)


def test_loss_falls_on_the_synthetic_task(tmp_path):
  records = run(
    tmp_path, "learn", jax.devices()[:1], **{"train.steps": 80, "train.log_every": 10, "train.eval_every": 80}
  )
  first, last = records[0]["loss"], records[-1]["loss"]
  assert first > 5.0  # ~ln(256) = 5.55 at init
  assert last < 4.0 and records[-1]["eval_loss"] < 4.0


def read_tensorboard_scalars(directory):
  """Tags in TFRecord-framed TensorBoard event files (length, crc, payload, crc)."""
  from tensorboardX.proto import event_pb2

  tags = set()
  for name in os.listdir(directory):
    with open(os.path.join(directory, name), "rb") as f:
      buf = f.read()
    pos = 0
    while pos < len(buf):
      (length,) = struct.unpack("<Q", buf[pos : pos + 8])
      event = event_pb2.Event.FromString(buf[pos + 12 : pos + 12 + length])
      tags.update(v.tag for v in event.summary.value)
      pos += 12 + length + 4
  return tags


def test_cli_writes_config_metrics_and_tensorboard(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "maxlm",
      "train",
      "--config=configs/tiny.py",
      f"--workdir={workdir}",
      "--config.train.steps=12",
      "--config.train.log_every=4",
      "--config.train.eval_every=6",
      "--config.train.eval_batches=2",
      "--config.optim.schedule=wsd",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=cli_env(2),
  )
  assert proc.returncode == 0, proc.stderr
  assert "MEASURED peak" in proc.stderr and "final loss" in proc.stderr

  cfg = json.loads((workdir / "config.json").read_text())
  assert cfg["mesh"] == {
    "diloco": 1,
    "stage": 1,
    "data": 2,
    "fsdp": 1,
    "expert": 1,
    "context": 1,
    "tensor": 1,
    "dcn_data": 1,
    "dcn_fsdp": 1,
    "dcn_diloco": 1,
  }
  assert cfg["model"]["compute_dtype"] == "float32"
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [4, 6, 8, 12]
  for r in records:
    for key in ("step", "loss", "grad_norm", "lr", "tokens_per_sec", "step_time_s", "tflops_per_device", "mfu"):
      assert isinstance(r[key], (int, float)) and np.isfinite(r[key]), (key, r)
  assert [r["step"] for r in records if "eval_loss" in r] == [6, 12]
  assert {"loss", "grad_norm", "lr", "mfu", "eval_loss"} <= read_tensorboard_scalars(workdir / "tb")


def random_batch(B, T, *, keep, seed, V=256):
  """Random tokens and targets in one segment, a `keep` fraction of the targets counted."""
  import jax.numpy as jnp

  rng = np.random.default_rng(seed)
  batch = {
    "inputs": rng.integers(0, V, (B, T)),
    "targets": rng.integers(0, V, (B, T)),
    "positions": np.tile(np.arange(T), (B, 1)),
    "segment_ids": np.ones((B, T), np.int32),
    "loss_mask": (rng.random((B, T)) < keep).astype(np.int32),
  }
  return {k: jnp.asarray(v) for k, v in batch.items()}


def test_masked_cross_entropy_and_z_loss_match_numpy():
  from flax import nnx

  from maxlm.model import transformer

  cfg = make_config().model
  graphdef, params = nnx.split(transformer.create(cfg, 0))
  batch = random_batch(2, 8, keep=0.5, seed=0)
  objective, sums = step_lib.loss_terms(params, graphdef, batch, z_loss=0.01)

  logits = np.asarray(nnx.merge(graphdef, params)(batch["inputs"]), np.float64)
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  nll = lse - np.take_along_axis(logits, np.asarray(batch["targets"])[..., None], -1)[..., 0]
  mask = np.asarray(batch["loss_mask"], bool)
  np.testing.assert_allclose(sums["nll_sum"], nll[mask].sum(), rtol=1e-5)
  np.testing.assert_allclose(sums["z_sum"], (lse[mask] ** 2).sum(), rtol=1e-5)
  assert sums["tokens"] == mask.sum()
  np.testing.assert_allclose(objective, nll[mask].sum() + 0.01 * (lse[mask] ** 2).sum(), rtol=1e-5)


@pytest.mark.parametrize("z_loss, chunk, tied", [(0.0, 0, True), (0.01, 4, True), (0.01, 4, False)])
def test_fused_cross_entropy_matches_autodiff_of_the_full_logits(z_loss, chunk, tied):
  """maxlm/model/loss.py writes the gradient by hand; plain jax.grad through the full logits is the reference."""
  import jax.numpy as jnp
  from flax import nnx

  from maxlm.model import transformer

  cfg = make_config(**{"data.seq_len": 16, "model.tie_embeddings": tied}).model
  graphdef, params = nnx.split(transformer.create(cfg, 0))
  batch = random_batch(4, 16, keep=0.7, seed=1)

  def reference(params):
    logits = nnx.merge(graphdef, params)(batch["inputs"]).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, -1)
    nll = lse - jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll * mask) + z_loss * jnp.sum(lse**2 * mask), jnp.sum(nll * mask)

  (want, want_nll), want_grads = jax.jit(jax.value_and_grad(reference, has_aux=True))(params)
  fused = jax.jit(jax.value_and_grad(step_lib.loss_terms, has_aux=True), static_argnums=(1, 3, 4))
  (got, sums), got_grads = fused(params, graphdef, batch, z_loss, chunk)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(sums["nll_sum"], want_nll, rtol=1e-6)
  # f32 sums of 64 per-token terms in another order: errors scale with the largest term, so the absolute
  # tolerance is 1e-5 of each gradient's largest entry.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max()), got_grads, want_grads
  )


def test_chunked_cross_entropy_needs_less_memory():
  """With V=8192 and T=256 the f32 logits and their gradient dominate the step's temporaries."""

  def temp_bytes(chunk):
    cfg = make_config(
      **{
        "model.vocab_size": 8192,
        "data.seq_len": 256,
        "train.global_batch": 4,
        "train.loss_chunk": chunk,
        "metrics.peak_tflops": 1.0,
      }
    )
    return loop.setup(cfg, jax.devices()[:1]).step.memory_analysis().temp_size_in_bytes

  full_logits = 4 * 256 * 8192 * 4
  assert temp_bytes(0) > 2 * full_logits  # logits and their cotangent, at least
  assert temp_bytes(32) < temp_bytes(0) - full_logits


def test_profile_steps_write_a_trace(tmp_path):
  cfg = make_config(
    **{
      "train.steps": 4,
      "train.eval_every": 0,
      "checkpoint.every_steps": 0,
      "metrics.tensorboard": False,
      "metrics.peak_tflops": 1.0,
      "metrics.profile_steps": "2-3",
    }
  )
  loop.run(cfg, str(tmp_path), devices=jax.devices()[:1])
  traces = [f for d, _, fs in os.walk(tmp_path / "profile") for f in fs if f.endswith(".xplane.pb")]
  assert len(traces) == 1


@pytest.mark.parametrize("spec", ["3-2", "x", "0", "2-"])
def test_bad_profile_steps(spec):
  from maxlm.errors import UserError

  with pytest.raises(UserError, match="metrics.profile_steps"):
    make_config(**{"metrics.profile_steps": spec})
