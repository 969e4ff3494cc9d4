"""Model numerics: a float64 NumPy reference, masks, scan vs. unrolled, remat vs. none."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxlm.model import attention, transformer

from conftest import make_config


def params_np(m):
  """Model parameters as a nested dict of float64 arrays."""
  return jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.split(m)[1]))


def reference_logits(p, cfg, tokens, positions, segment_ids):
  """Independent float64 forward pass written from the Llama paper's equations."""

  def rms(x, scale):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * scale

  def rope(x, pos):  # x: [T, N, Dh], half-split pairs (i, i + Dh/2)
    half = x.shape[-1] // 2
    freq = cfg.rope_theta ** (-np.arange(half) / half)
    ang = pos[:, None, None] * freq
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)

  H, K = cfg.num_heads, cfg.num_kv_heads
  out = []
  for b in range(tokens.shape[0]):
    x = p["embed"][tokens[b]]
    T = x.shape[0]
    allowed = np.tril(np.ones((T, T), bool)) & (segment_ids[b][:, None] == segment_ids[b][None, :])
    for layer in range(cfg.num_layers):
      lp = jax.tree.map(lambda a, layer=layer: a[layer], p["blocks"])
      a = lp["attn"]
      h = rms(x, lp["attn_norm"]["scale"])
      q = np.einsum("td,dhk->thk", h, a["q_proj"])
      k = np.einsum("td,dhk->thk", h, a["k_proj"])
      v = np.einsum("td,dhk->thk", h, a["v_proj"])
      if cfg.qk_norm:
        q, k = rms(q, a["q_norm"]["scale"]), rms(k, a["k_norm"]["scale"])
      q, k = rope(q, positions[b]), rope(k, positions[b])
      heads = []
      for i in range(H):
        kv = i // (H // K)  # Query head i reads kv head i // G.
        s = q[:, i] @ k[:, kv].T / np.sqrt(q.shape[-1])
        s = np.where(allowed, s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        heads.append((w / w.sum(-1, keepdims=True)) @ v[:, kv])
      x = x + np.einsum("thk,hkd->td", np.stack(heads, 1), a["o_proj"])
      m = lp["mlp"]
      h = rms(x, lp["mlp_norm"]["scale"])
      g = h @ m["gate_proj"]
      x = x + ((g / (1 + np.exp(-g))) * (h @ m["up_proj"])) @ m["down_proj"]
    x = rms(x, p["final_norm"]["scale"])
    out.append(x @ (p["embed"].T if cfg.tie_embeddings else p["lm_head"]))
  return np.stack(out)


def packed_batch(B=2, T=16, V=256, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, V, (B, T))
  # Row 0: one document; row 1: documents of 5, 7 and 4 tokens with restarting positions.
  segment_ids = np.array([[1] * T, [1] * 5 + [2] * 7 + [3] * 4])
  positions = np.array([np.arange(T), np.r_[np.arange(5), np.arange(7), np.arange(4)]])
  return tokens, positions, segment_ids


@pytest.mark.parametrize(
  "overrides",
  [
    {},
    {"model.tie_embeddings": False, "model.qk_norm": True, "model.num_kv_heads": 1},
    {"model.num_heads": 2, "model.num_kv_heads": 2, "model.rope_theta": 500_000.0},
  ],
)
def test_matches_float64_reference(overrides):
  cfg = make_config(**overrides).model
  m = transformer.create(cfg, seed=3)
  tokens, positions, segment_ids = packed_batch(V=cfg.vocab_size)
  got = np.asarray(m(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segment_ids)))
  want = reference_logits(params_np(m), cfg, tokens, positions, segment_ids)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_causal_future_tokens_do_not_change_past_logits():
  m = transformer.create(make_config().model, seed=0)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
  changed = tokens.at[:, 9:].set((tokens[:, 9:] + 17) % 256)
  a, b = m(tokens), m(changed)
  np.testing.assert_array_equal(np.asarray(a[:, :9]), np.asarray(b[:, :9]))
  assert np.abs(np.asarray(a[:, 9:] - b[:, 9:])).max() > 1e-3  # The change is visible where it may be.


def test_packed_documents_do_not_attend_across_segments():
  m = transformer.create(make_config().model, seed=0)
  tokens, positions, segment_ids = map(jnp.asarray, packed_batch())
  packed = m(tokens[1:], positions[1:], segment_ids[1:])[0]
  # Each document alone, at its own positions, gives the same logits as inside the packed row.
  for start, stop in [(0, 5), (5, 12), (12, 16)]:
    alone = m(tokens[1:, start:stop])[0]
    np.testing.assert_allclose(np.asarray(packed[start:stop]), np.asarray(alone), rtol=1e-5, atol=1e-5)
  # Changing document 1 leaves documents 2 and 3 untouched.
  other = m(tokens[1:].at[0, :5].set(7), positions[1:], segment_ids[1:])[0]
  np.testing.assert_array_equal(np.asarray(packed[5:]), np.asarray(other[5:]))


@functools.cache
def _loss_and_grads(overrides: tuple):
  cfg = make_config(**{"model.num_layers": 3, **dict(overrides)}).model
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
  m = transformer.create(cfg, seed=1)
  graphdef, params = nnx.split(m)

  def loss(p):
    logits = nnx.merge(graphdef, p)(tokens)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize(
  "variant",
  [
    {"model.scan_layers": False},
    {"model.remat": "full"},
    {"model.remat": "dots"},
    {"model.remat": "dots_no_batch", "model.scan_layers": False},
  ],
)
def test_scan_and_remat_give_the_same_loss_and_gradients(variant):
  base_loss, base_grads = _loss_and_grads(())
  loss, grads = _loss_and_grads(tuple(variant.items()))
  np.testing.assert_allclose(loss, base_loss, rtol=1e-6)
  for g, b in zip(jax.tree.leaves(grads), jax.tree.leaves(base_grads)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_keeps_float32_params():
  cfg = make_config(**{"model.compute_dtype": "bfloat16"}).model
  m = transformer.create(cfg, seed=0)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.split(m)[1]))
  logits = m(jnp.zeros((1, 8), jnp.int32))
  assert logits.dtype == jnp.bfloat16


def test_block_causal_attention_equals_the_full_masked_softmax():
  """T=512 runs as 4 query blocks of 128 that skip keys past their end; the reference scores all T×T."""
  B, T, H, K, Dh = 2, 512, 4, 2, 16
  q, k, v = (
    jax.random.normal(key, shape)
    for key, shape in zip(jax.random.split(jax.random.key(0), 3), [(B, T, H, Dh), (B, T, K, Dh), (B, T, K, Dh)])
  )
  segments = jnp.asarray(np.stack([np.ones(T, np.int32), np.repeat([1, 2, 3], [100, 250, 162])]))

  def full(q, k, v):
    kk, vv = jnp.repeat(k, H // K, axis=2), jnp.repeat(v, H // K, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q, kk) / np.sqrt(Dh)
    allowed = jnp.tril(jnp.ones((T, T), bool)) & (segments[:, :, None] == segments[:, None, :])
    p = jax.nn.softmax(jnp.where(allowed[:, None], s, -jnp.inf), axis=-1)
    return jnp.einsum("bhts,bshd->bthd", p, vv)

  def loss_and_grads(attention):
    loss = lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v)))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

  got, want = loss_and_grads(lambda q, k, v: attention.xla_attention(q, k, v, segments)), loss_and_grads(full)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, w in zip(got[1], want[1]):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
