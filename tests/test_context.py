"""Context parallelism (maxlm/parallel/context.py): the balanced layout, and the model's loss and gradients with the
sequence split over `context` equal one device's, on packed rows, for both ways of reaching the other shards' keys."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxlm.errors import UserError
from maxlm.model import transformer
from maxlm.parallel import context
from maxlm.parallel import mesh as mesh_lib
from maxlm.training import loop
from maxlm.training import step as step_lib

from conftest import make_config


def test_balanced_layout_round_trips_and_pairs_chunk_i_with_its_mirror():
  order = context.order(16, 2)  # 4 chunks of 4: shard 0 holds chunks 0 and 3, shard 1 chunks 1 and 2
  np.testing.assert_array_equal(order, [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11])
  x = np.arange(3 * 48).reshape(3, 48)
  for c in (1, 2, 3, 4, 6):
    balanced = context.balance({"a": x}, c)["a"]
    np.testing.assert_array_equal(context.restore(balanced, c), x)
    assert sorted(balanced[0]) == list(range(48))
  with pytest.raises(ValueError, match="divisible by 8"):
    context.order(20, 4)


@pytest.mark.parametrize("c", [2, 4, 8])
def test_every_shard_gets_the_same_number_of_causal_pairs(c):
  """Under a causal mask the balanced layout gives each shard the same count of visible (query, key) pairs, where
  contiguous shards would range from t·(2t+1) to (4c-1)·t·2t."""
  T = 2 * c * 8
  index = context.order(T, c).reshape(c, T // c)  # each shard's queries, by original position
  pairs = [int(np.sum(q + 1)) for q in index]  # a query at position p sees keys 0..p
  assert len(set(pairs)) == 1 and sum(pairs) == T * (T + 1) // 2


def _packed_batch(rows: int, seq_len: int, seed: int = 0):
  """Rows packed with documents of random lengths: segment ids change and positions restart at each border."""
  rng = np.random.default_rng(seed)
  batch = {k: np.zeros((rows, seq_len), np.int32) for k in step_lib.BATCH_KEYS}
  for r in range(rows):
    start, segment = 0, 1
    while start < seq_len:
      length = min(int(rng.integers(3, seq_len // 2)), seq_len - start)
      batch["segment_ids"][r, start : start + length] = segment
      batch["positions"][r, start : start + length] = np.arange(length)
      start, segment = start + length, segment + 1
    batch["segment_ids"][r, -3:] = 0  # a padded tail: its own segment, out of the loss
  batch["inputs"] = rng.integers(0, 256, (rows, seq_len)).astype(np.int32)
  batch["targets"] = rng.integers(0, 256, (rows, seq_len)).astype(np.int32)
  batch["loss_mask"] = (batch["segment_ids"] > 0).astype(np.int32)
  return batch


def _loss_and_grads(cfg, devices, batch):
  """The training objective (summed cross-entropy, + MoE terms) and its gradients on the config's mesh, the batch
  put in the context layout on the host as the training loop does."""
  mesh = mesh_lib.from_config(cfg.mesh, devices)
  graphdef, params = nnx.split(transformer.create(cfg.model, seed=0))
  params = jax.device_put(params, mesh_lib.tree_shardings(params, mesh))
  batch = context.balance(batch, cfg.mesh.context)

  def objective(params, batch):
    return step_lib.loss_terms(params, graphdef, batch, 1e-4, cfg.train.loss_chunk, (0.01, 0.001))

  with jax.set_mesh(mesh):
    batch = {k: jax.device_put(v, mesh_lib.batch_sharding(mesh)) for k, v in batch.items()}
    (value, sums), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params, batch)
  return value, sums, grads


@pytest.mark.parametrize(
  "mesh, overrides",
  [
    ({"mesh.context": 4, "mesh.data": 2}, {}),
    ({"mesh.context": 4, "mesh.data": 2}, {"model.context_attention": "ring"}),
    ({"mesh.data": 2, "mesh.context": 2, "mesh.tensor": 2}, {}),
    ({"mesh.data": 2, "mesh.context": 2, "mesh.tensor": 2}, {"model.context_attention": "ring", "train.loss_chunk": 8}),
    ({"mesh.fsdp": 2, "mesh.context": 4}, {"model.num_kv_heads": 1, "model.remat": "full"}),
    (
      {"mesh.expert": 2, "mesh.context": 2, "mesh.tensor": 2},
      {"model.moe.num_experts": 4, "model.moe.mlp_dim": 32, "model.context_attention": "ring"},
    ),
  ],
  ids=["c4-gather", "c4-ring", "d2c2t2-gather", "d2c2t2-ring-chunked", "f2c4-mqa-remat", "moe-e2c2t2-ring"],
)
def test_loss_and_gradients_with_the_sequence_split_equal_one_device(devices, mesh, overrides):
  layout = {"model.num_layers": 2, "data.seq_len": 32, "train.global_batch": 4, **overrides}
  batch = _packed_batch(4, 32)
  want = _loss_and_grads(make_config(**layout), devices[:1], batch)
  got = _loss_and_grads(make_config(num_devices=8, **layout, **mesh), devices, batch)
  np.testing.assert_allclose(got[0], want[0], rtol=2e-5)
  np.testing.assert_allclose(got[1]["tokens"], want[1]["tokens"])
  for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want[2]), jax.tree.leaves(got[2])):
    # Gradients of a sum over ~100 tokens: float32 summation order alone moves the small entries by ~1e-5 of the
    # largest.
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5 * np.max(np.abs(w)), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("query_block", [512, 2])
def test_context_attention_equals_full_attention_for_both_variants(devices, monkeypatch, query_block):
  """The attention output and its gradients, restored to the original order, against the einsum path on one device;
  with query_block=2 each key block is scored two queries at a time."""
  from maxlm.model import attention

  monkeypatch.setattr(context, "QUERY_BLOCK", query_block)
  B, T, H, K, Dh = 2, 32, 4, 2, 8
  q, k, v = (jax.random.normal(jax.random.key(i), (B, T, n, Dh)) for i, n in enumerate((H, K, K)))
  segments = jnp.asarray(_packed_batch(B, T)["segment_ids"])
  cotangent = jax.random.normal(jax.random.key(3), q.shape)
  want, vjp = jax.vjp(lambda q, k, v: attention.xla_attention(q, k, v, segments), q, k, v)
  want_grads = vjp(cotangent)
  mesh = mesh_lib.mesh_of(devices, context=8)
  order = context.order(T, 8)
  for variant in context.VARIANTS:
    with jax.set_mesh(mesh):

      def run(q, k, v, cotangent, variant=variant):
        out, vjp = jax.vjp(lambda q, k, v: context.attention(q, k, v, segments[:, order], variant=variant), q, k, v)
        return out, vjp(cotangent)

      got, grads = jax.jit(run)(q[:, order], k[:, order], v[:, order], cotangent[:, order])
    np.testing.assert_allclose(context.restore(np.asarray(got), 8), want, rtol=1e-5, atol=1e-6, err_msg=variant)
    for g, w in zip(grads, want_grads):
      np.testing.assert_allclose(context.restore(np.asarray(g), 8), w, rtol=1e-4, atol=1e-5, err_msg=variant)


def test_splash_context_attention_equals_full_attention(devices):
  """The splash kernel (interpreted on CPU; its tiles need 128 positions per shard) on each shard's queries against
  the gathered keys, with data 2 × context 2 × tensor 2: values and gradients against the einsum path."""
  from maxlm.model import attention, kernels

  B, T, H, K, Dh = 2, 256, 4, 2, 8
  q, k, v = (jax.random.normal(jax.random.key(i), (B, T, n, Dh)) for i, n in enumerate((H, K, K)))
  segments = jnp.asarray(_packed_batch(B, T)["segment_ids"])
  cotangent = jax.random.normal(jax.random.key(3), q.shape)
  want, vjp = jax.vjp(lambda q, k, v: attention.xla_attention(q, k, v, segments), q, k, v)
  want_grads = vjp(cotangent)
  order = context.order(T, 2)
  with jax.set_mesh(mesh_lib.mesh_of(devices, data=2, context=2, tensor=2)):

    def run(q, k, v, cotangent):
      out, vjp = jax.vjp(lambda q, k, v: kernels.splash_context_attention(q, k, v, segments[:, order]), q, k, v)
      return out, vjp(cotangent)

    got, grads = jax.jit(run)(q[:, order], k[:, order], v[:, order], cotangent[:, order])
  np.testing.assert_allclose(context.restore(np.asarray(got), 2), want, rtol=1e-5, atol=1e-5)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(context.restore(np.asarray(g), 2), w, rtol=1e-4, atol=1e-4)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def test_training_with_context_parallelism_matches_one_device(tmp_path, devices):
  """The whole loop (host-side layout, eval, checkpoint) with data 2 × context 4 against one device."""
  run = {"data.seq_len": 64, "train.steps": 4, "train.eval_every": 2, "train.global_batch": 4}
  loop.run(make_config(**run), str(tmp_path / "one"), devices=devices[:1])
  loop.run(make_config(num_devices=8, **run, **{"mesh.data": 2, "mesh.context": 4}), str(tmp_path / "cp"), devices)
  np.testing.assert_allclose(_losses(tmp_path / "cp"), _losses(tmp_path / "one"), rtol=2e-5)


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"mesh.context": 4, "data.seq_len": 36}, "data.seq_len=36 is not divisible by 2\\*mesh.context=8"),
    ({"mesh.context": 4, "train.loss_chunk": 6, "data.seq_len": 48}, "train.loss_chunk=6 is not divisible by"),
    ({"model.context_attention": "ulysses"}, "model.context_attention='ulysses' is not one of all_gather, ring"),
  ],
)
def test_bad_context_configs_are_named(overrides, message):
  with pytest.raises(UserError, match=message):
    make_config(num_devices=8, **overrides)
