"""Sampling: greedy equals step-by-step argmax; top-k never leaves the k best; EOS stops a sequence."""

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_config
from maxlm import model, sample


@pytest.fixture(scope="module")
def m():
  return model.create(make_config(**{"model.init_std": 1.0}).model, seed=0)  # peaked logits: distinct tokens


def test_greedy_matches_argmax_recomputation(m):
  prompts = [[5, 9, 13], [7]]
  out = sample.generate(m, prompts, max_new_tokens=6)
  for prompt, new in zip(prompts, out):
    seq = list(prompt)
    for _ in range(6):
      seq.append(int(jnp.argmax(m(jnp.array([seq]))[0, -1])))
    assert new == seq[len(prompt):]


def test_top_k_stays_within_the_k_best(m):
  prompt = [3, 1, 4]
  for seed in range(3):
    new = sample.generate(m, [prompt], max_new_tokens=8, temperature=2.0, top_k=3, seed=seed)[0]
    seq = prompt + new
    logits = np.asarray(m(jnp.array([seq]))[0])
    for t in range(len(prompt), len(seq)):
      assert seq[t] in np.argsort(logits[t - 1])[-3:]
  assert sample.generate(m, [prompt], max_new_tokens=8, temperature=1.0, top_k=1, seed=7) == \
      sample.generate(m, [prompt], max_new_tokens=8)  # top-1 is greedy


def test_eos_stops_generation(m):
  first = sample.generate(m, [[2, 3]], max_new_tokens=5)[0]
  eos = first[1]
  out = sample.generate(m, [[2, 3]], max_new_tokens=5, eos_id=eos)[0]
  assert out == first[:first.index(eos) + 1]  # up to and including the first EOS
