"""Sampling: KV-cache decoding equals full recomputation; greedy is argmax and deterministic; top-k and top-p
never leave their sets; EOS stops a row; prompts of different lengths batch without changing any row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxlm.interop import sample
from maxlm.model import transformer
from maxlm.parallel import mesh as mesh_lib

from conftest import make_config


@pytest.fixture(scope="module")
def m():
  return transformer.create(make_config(**{"model.init_std": 1.0}).model, seed=0)  # peaked logits: distinct tokens


@pytest.fixture(scope="module")
def spread():
  """Logits spread enough that top-k and top-p cut somewhere between 1 token and the whole vocabulary."""
  return transformer.create(make_config(**{"model.init_std": 0.3, "model.tie_embeddings": False}).model, seed=1)


N = 8  # new tokens in every generate call: the tests share compilations
_forward = jax.jit(lambda m, tokens: m(tokens))
_decode = jax.jit(lambda m, tokens, positions, cache: m.decode(tokens, positions, cache))
PAD = 32


def full_logits(m, seq):
  """The full forward pass (no cache) over `seq`, padded at the end to one jitted shape: causal attention
  keeps the padding out of the logits of `seq`."""
  return np.asarray(_forward(m, jnp.array([seq + [0] * (PAD - len(seq))]))[0, : len(seq)], np.float64)


@pytest.mark.parametrize(
  "overrides",
  [
    {},  # GQA 4/2, tied embeddings, scanned layers
    {
      "model.num_kv_heads": 4,
      "model.tie_embeddings": False,
      "model.qk_norm": True,
      "model.scan_layers": False,
      "model.rope_scaling.type": "llama3",
      "model.rope_scaling.original_max_len": 8,
      "model.rope_theta": 50.0,
    },
    # MoE (dropless: a token's output never depends on the others): dense first layer, shared expert
    {"model.num_layers": 3, "model.moe.num_experts": 4, "model.moe.first_dense": 1, "model.moe.shared_experts": 1},
  ],
  ids=["gqa-tied-scan", "mha-qknorm-llama3-unrolled", "moe"],
)
def test_kv_cache_decoding_equals_full_recomputation(overrides):
  m = transformer.create(make_config(**{"model.init_std": 0.5, **overrides}).model, seed=2)
  rng = np.random.default_rng(0)
  rows = [rng.integers(0, 256, 12).tolist(), rng.integers(0, 256, 12).tolist()]
  lengths = [5, 2]  # prompt lengths; the rest of each row is fed one token at a time
  P, S = max(lengths), 12
  prompts = jnp.array([r[:n] + [0] * (P - n) for r, n in zip(rows, lengths)])
  cache = m.init_cache(2, S)
  prefill, cache = _decode(m, prompts, jnp.broadcast_to(jnp.arange(P), (2, P)), cache)
  got = [[np.asarray(prefill[b, t]) for t in range(n)] for b, n in enumerate(lengths)]
  for i in range(S - max(lengths)):
    positions = jnp.array([[n + i] for n in lengths])
    tokens = jnp.array([[r[n + i]] for r, n in zip(rows, lengths)])
    step, cache = _decode(m, tokens, positions, cache)
    for b in range(2):
      got[b].append(np.asarray(step[b, 0]))
  for b, row in enumerate(rows):
    want = full_logits(m, row)[: len(got[b])]
    # f32 with different reduction orders (masked cache slots vs. a causal square): 1e-5 of the logit scale.
    np.testing.assert_allclose(np.stack(got[b]), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_greedy_matches_argmax_recomputation(m):
  prompts = [[5, 9, 13], [7], [1, 2, 3, 4, 5, 6]]
  out = sample.generate(m, prompts, max_new_tokens=N)
  for prompt, new in zip(prompts, out):
    seq = list(prompt)
    for _ in range(N):
      seq.append(int(np.argmax(full_logits(m, seq)[-1])))
    assert new == seq[len(prompt) :]


def test_greedy_is_deterministic_and_independent_of_the_batch(spread):
  prompts = [[5, 9, 13], [7], [200, 3, 3, 3, 3, 3, 3]]
  batched = sample.generate(spread, prompts, max_new_tokens=N)
  assert sample.generate(spread, prompts, max_new_tokens=N) == batched
  assert [sample.generate(spread, [p], max_new_tokens=N)[0] for p in prompts] == batched
  assert len({tuple(r) for r in batched}) == 3


def test_seeded_sampling_is_reproducible(spread):
  kwargs = dict(max_new_tokens=N, temperature=1.0, top_p=0.95)
  a = sample.generate(spread, [[3, 1, 4]], seed=0, **kwargs)
  assert sample.generate(spread, [[3, 1, 4]], seed=0, **kwargs) == a
  assert sample.generate(spread, [[3, 1, 4]], seed=1, **kwargs) != a


def test_top_k_stays_within_the_k_best(spread):
  prompt = [3, 1, 4]
  for seed in range(3):
    seq = prompt + sample.generate(spread, [prompt], max_new_tokens=N, temperature=2.0, top_k=3, seed=seed)[0]
    for t in range(len(prompt), len(seq)):
      assert seq[t] in np.argsort(full_logits(spread, seq[:t])[-1])[-3:]
  assert sample.generate(spread, [prompt], max_new_tokens=N, temperature=1.0, top_k=1, seed=7) == sample.generate(
    spread, [prompt], max_new_tokens=N
  )  # top-1 is greedy


def test_top_p_stays_within_the_nucleus(spread):
  prompt, p, temperature = [3, 1, 4], 0.5, 1.0
  sizes = []
  for seed in range(4):
    seq = prompt + sample.generate(spread, [prompt], max_new_tokens=N, temperature=temperature, top_p=p, seed=seed)[0]
    for t in range(len(prompt), len(seq)):
      logits = full_logits(spread, seq[:t])[-1] / temperature
      probs = np.exp(logits - logits.max())
      probs /= probs.sum()
      order = np.argsort(-probs)
      # The nucleus: the most likely tokens up to and including the first that brings the sum to >= p.
      nucleus = order[: int(np.searchsorted(np.cumsum(probs[order]), p)) + 1]
      sizes.append(len(nucleus))
      assert seq[t] in nucleus
  assert 1 < max(sizes) < 256  # the cut is neither trivial nor absent


def test_filter_logits_by_hand():
  # probs of [2, 1, 0, -1] are 0.644, 0.237, 0.087, 0.032: top-p 0.7 keeps 2 tokens, 0.9 keeps 3.
  logits = jnp.array([[0.0, 2.0, -1.0, 1.0]])
  kept = lambda **kw: np.isfinite(np.asarray(sample.filter_logits(logits, 1.0, kw.get("k", 0), kw.get("p", 1.0))))
  assert kept().tolist() == [[True, True, True, True]]
  assert kept(k=2).tolist() == [[False, True, False, True]]
  assert kept(p=0.6).tolist() == [[False, True, False, False]]
  assert kept(p=0.7).tolist() == [[False, True, False, True]]
  assert kept(p=0.9).tolist() == [[True, True, False, True]]
  assert kept(k=1, p=0.9).tolist() == [[False, True, False, False]]
  # Temperature sharpens before top-p: at T=0.5 the top token alone holds 0.87 of the mass.
  assert np.isfinite(np.asarray(sample.filter_logits(logits, 0.5, 0, 0.8))).tolist() == [[False, True, False, False]]


def test_eos_stops_each_row(m):
  prompts = [[2, 3], [9, 9, 9], [40]]  # batch of 3 as in the greedy test: one compilation for both
  first = sample.generate(m, prompts, max_new_tokens=N)
  eos = first[0][1]
  out = sample.generate(m, prompts, max_new_tokens=N, eos_id=eos)
  for row, new in zip(first, out):
    assert new == (row[: row.index(eos) + 1] if eos in row else row)  # up to and including the first EOS


def test_a_model_sharded_over_a_mesh_samples_as_on_one_device(spread, devices):
  graphdef, params = nnx.split(spread)
  mesh = mesh_lib.mesh_of(devices, data=2, fsdp=2, tensor=2)
  sharded = nnx.merge(graphdef, jax.device_put(params, mesh_lib.tree_shardings(params, mesh)))
  prompts = [[5, 9, 13], [7], [200, 3, 3, 3, 3, 3, 3]]
  assert sample.generate(sharded, prompts, max_new_tokens=N) == sample.generate(spread, prompts, max_new_tokens=N)


def test_ids_past_the_tokenizer_vocabulary_are_never_sampled(spread):
  for temperature in (0.0, 2.0):
    out = sample.generate(spread, [[5, 9, 13], [7], [1]], max_new_tokens=N, temperature=temperature, vocab=10)
    assert all(t < 10 for row in out for t in row)
