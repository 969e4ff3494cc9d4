"""Autoregressive sampling: greedy (temperature 0) or temperature + top-k.

Each new token re-runs the model over a fixed [B, T] buffer (static shapes: one compilation), which is
O(T²) per sequence: fine for short demos and tests. A KV-cache decoder replaces it for real use.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


@functools.partial(jax.jit, static_argnames=("graphdef", "length", "top_k", "eos_id"))
def _generate(params, prompt_BxT, prompt_len_B, key, *, graphdef, length: int, temperature, top_k: int, eos_id: int):
  model = nnx.merge(graphdef, params)
  B = prompt_BxT.shape[0]

  def step(t, carry):
    tokens_BxT, done_B, key = carry
    logits_BxV = model(tokens_BxT)[:, t - 1].astype(jnp.float32)
    if top_k > 0:  # Keep the k largest logits (ties at the k-th may keep a few more).
      kth_B1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
      logits_BxV = jnp.where(logits_BxV < kth_B1, -jnp.inf, logits_BxV)
    key, sub = jax.random.split(key)
    sampled_B = jax.random.categorical(sub, logits_BxV / jnp.maximum(temperature, 1e-6))
    next_B = jnp.where(temperature > 0, sampled_B, jnp.argmax(logits_BxV, -1))
    write_B = (t >= prompt_len_B) & ~done_B  # Positions inside the prompt keep the prompt's token.
    tokens_BxT = tokens_BxT.at[:, t].set(jnp.where(write_B, next_B, tokens_BxT[:, t]))
    done_B = done_B | (write_B & (next_B == eos_id))
    return tokens_BxT, done_B, key

  start = jnp.min(prompt_len_B)
  tokens, _, _ = jax.lax.fori_loop(start, length, step, (prompt_BxT, jnp.zeros(B, bool), key))
  return tokens


def generate(model: nnx.Module, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, seed: int = 0, eos_id: int = -1, pad_id: int = 0) -> list[list[int]]:
  """Continues each prompt by up to `max_new_tokens` tokens, stopping at `eos_id`; returns the new tokens."""
  graphdef, params = nnx.split(model)
  lengths = [len(p) for p in prompts]
  if min(lengths) < 1:
    raise ValueError("every prompt needs at least one token")
  length = max(lengths) + max_new_tokens
  buffer = jnp.array([p + [pad_id] * (length - len(p)) for p in prompts], jnp.int32)
  out = _generate(params, buffer, jnp.array(lengths), jax.random.key(seed), graphdef=graphdef, length=length,
                  temperature=jnp.float32(temperature), top_k=top_k, eos_id=eos_id)
  continuations = []
  for row, n in zip(out.tolist(), lengths):
    new = row[n:n + max_new_tokens]
    continuations.append(new[:new.index(eos_id) + 1] if eos_id in new else new)
  return continuations
