"""Autoregressive sampling with a KV cache: prefill the prompts once, then one token per step.

Prompts of different lengths share a batch right-padded to the longest, P tokens. Cache slot s of a row holds
its token at position s, and a query at position p attends slots 0..p, so the padding a prefill writes
after a short prompt is overwritten by that row's generated tokens before any query can see it
(`maxlm.model.attention.cached_attention`). Row b's first new token comes from the prefill logits at position
len_b - 1; each later one from a one-token decode step at position len_b + i. Everything runs in one jitted
function with static shapes: it compiles once per (batch size, P rounded up to a multiple of 32,
max_new_tokens); temperature, top-k, top-p, EOS and the seed are traced values and never recompile. The
loop stops early once every row has emitted EOS.

Token choice, as in Hugging Face's `generate`: temperature 0 is greedy (argmax of the raw logits); otherwise
the logits are divided by the temperature, then cut to the `top_k` largest (0 = all), then to the smallest
set whose probabilities sum to at least `top_p` (1 = all), renormalised and sampled. Ties at a cut-off
keep every tied token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from maxlm.data.tokenizer import Tokenizer
from maxlm.errors import UserError

PROMPT_BUCKET = 32  # Prompt buffers are padded to a multiple of this: fewer compilations, same tokens.


def filter_logits(logits_BxV: jax.Array, temperature, top_k, top_p) -> jax.Array:
  """Temperature-scaled logits with everything outside the top-k / top-p set at -inf (f32)."""
  logits_BxV = logits_BxV.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
  V = logits_BxV.shape[-1]
  sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]  # One sort serves both cut-offs, with k and p traced.
  k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
  kth_Bx1 = jnp.take(sorted_BxV, k - 1, axis=-1)[:, None]
  sorted_BxV = jnp.where(sorted_BxV >= kth_Bx1, sorted_BxV, -jnp.inf)
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  # Keep the i-th largest while the ones before it sum to less than top_p: the first always stays.
  before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
  kept_BxV = ((before_BxV < top_p) | (top_p >= 1)) & (sorted_BxV > -jnp.inf)  # Rounding never cuts at p = 1.
  cutoff_Bx1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_BxV >= cutoff_Bx1, logits_BxV, -jnp.inf)


def _choose(logits_BxV, key, temperature, top_k, top_p):
  sampled_B = jax.random.categorical(key, filter_logits(logits_BxV, temperature, top_k, top_p))
  return jnp.where(temperature > 0, sampled_B, jnp.argmax(logits_BxV, axis=-1))


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _generate(
  params, prompt_BxP, prompt_len_B, key, temperature, top_k, top_p, eos_id, vocab, *, graphdef, max_new_tokens: int
):
  """[B, max_new_tokens] new tokens (eos_id after a row's EOS; -1 there when eos_id is -1) and the count
  of tokens each row produced. Only ids below `vocab` are ever chosen."""
  model = nnx.merge(graphdef, params)

  def choose(logits_BxV, key):
    # Rows of the embedding past the tokenizer's vocabulary (padding) never become tokens.
    logits_BxV = jnp.where(jnp.arange(logits_BxV.shape[-1]) < vocab, logits_BxV, -jnp.inf)
    return _choose(logits_BxV, key, temperature, top_k, top_p)

  B, P = prompt_BxP.shape
  cache = model.init_cache(B, P + max_new_tokens)
  positions_BxP = jnp.broadcast_to(jnp.arange(P), (B, P))
  logits_BxPxV, cache = model.decode(prompt_BxP, positions_BxP, cache)
  last_BxV = jnp.take_along_axis(logits_BxPxV, (prompt_len_B - 1)[:, None, None], axis=1)[:, 0]
  key, sub = jax.random.split(key)
  token_B = choose(last_BxV, sub)
  out_BxN = jnp.full((B, max_new_tokens), eos_id).at[:, 0].set(token_B)
  done_B = token_B == eos_id
  count_B = jnp.ones(B, jnp.int32)

  def cond(carry):
    i, _, done_B, *_ = carry
    return (i < max_new_tokens) & ~jnp.all(done_B)

  def step(carry):
    i, token_B, done_B, count_B, out_BxN, cache, key = carry
    # Feed the previous new token at its row's position; rows that are done keep computing, unused.
    logits_Bx1xV, cache = model.decode(token_B[:, None], (prompt_len_B + i - 1)[:, None], cache)
    key, sub = jax.random.split(key)
    next_B = choose(logits_Bx1xV[:, 0], sub)
    next_B = jnp.where(done_B, eos_id, next_B)
    out_BxN = out_BxN.at[:, i].set(next_B)
    count_B = count_B + ~done_B
    return i + 1, next_B, done_B | (next_B == eos_id), count_B, out_BxN, cache, key

  carry = (jnp.int32(1), token_B, done_B, count_B, out_BxN, cache, key)
  _, _, _, count_B, out_BxN, _, _ = jax.lax.while_loop(cond, step, carry)
  return out_BxN, count_B


def generate(
  model: nnx.Module,
  prompts: list[list[int]],
  *,
  max_new_tokens: int,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  eos_id: int = -1,
  pad_id: int = 0,
  vocab: int | None = None,
) -> list[list[int]]:
  """Continues each prompt by up to `max_new_tokens` tokens, stopping after `eos_id` (included); returns the
  new tokens, all below `vocab` (default: the model's vocabulary). The model's parameters may live on any
  device or mesh; the arrays are used where they are."""
  lengths = [len(p) for p in prompts]
  if not prompts or min(lengths) < 1:
    raise ValueError("every prompt needs at least one token")
  if max_new_tokens < 1:
    raise ValueError("max_new_tokens must be at least 1")
  graphdef, params = nnx.split(model)
  P = -(-max(lengths) // PROMPT_BUCKET) * PROMPT_BUCKET
  buffer = jnp.array([p + [pad_id] * (P - len(p)) for p in prompts], jnp.int32)
  out, counts = _generate(
    params,
    buffer,
    jnp.array(lengths, jnp.int32),
    jax.random.key(seed),
    jnp.float32(temperature),
    jnp.int32(top_k),
    jnp.float32(top_p),
    jnp.int32(eos_id),
    jnp.int32(2**31 - 1 if vocab is None else vocab),
    graphdef=graphdef,
    max_new_tokens=max_new_tokens,
  )
  return [row[:n] for row, n in zip(out.tolist(), counts.tolist())]


def complete(
  model: nnx.Module,
  tok: Tokenizer,
  prompts: list[str],
  *,
  add_bos: bool = False,
  max_new_tokens: int,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
) -> list[dict]:
  """Text in, text out (`maxlm sample` and the demo): per prompt {prompt, completion, tokens, eos}, where
  `tokens` are the new ids (EOS included when it ended the row) and `completion` their text without EOS."""
  ids = [([tok.sp.bos_id()] if add_bos else []) + tok.encode(p) for p in prompts]
  if min(map(len, ids)) == 0:
    raise UserError("--prompt: an empty prompt gives the model nothing to continue")
  eos = tok.sp.eos_id()
  outputs = generate(
    model,
    ids,
    max_new_tokens=max_new_tokens,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    seed=seed,
    eos_id=eos,
    vocab=tok.vocab_size,
  )
  results = []
  for prompt, new in zip(prompts, outputs):
    ended = bool(new) and new[-1] == eos
    results.append(
      {"prompt": prompt, "completion": tok.decode(new[:-1] if ended else new), "tokens": new, "eos": ended}
    )
  return results
