"""Input pipelines: determinism, the same global batch for any process count, exact resume, token files."""

import grain
import numpy as np
import pytest

from maxlm.data import pipeline
from maxlm.errors import UserError

from conftest import make_config


def windows(src):
  return grain.MapDataset.source(src).map(pipeline.window_to_example)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_synthetic_is_deterministic_and_learnable():
  src = pipeline.SyntheticSource(256, 32, seed=3, split=pipeline.TRAIN)
  np.testing.assert_array_equal(src[5], pipeline.SyntheticSource(256, 32, seed=3, split=pipeline.TRAIN)[5])
  assert not np.array_equal(src[5], pipeline.SyntheticSource(256, 32, seed=3, split=pipeline.EVAL)[5])
  rows = np.stack([src[i] for i in range(200)])
  successor = np.empty(256, np.int32)
  successor[src.cycle] = np.roll(src.cycle, -1)
  follows = np.mean(successor[rows[:, :-1]] == rows[:, 1:])
  assert 0.75 < follows < 0.9  # ≈ (1-p)² + small: both tokens clean, the pattern holds
  assert 0.8 < src.entropy_floor() < 1.0


def test_examples_shift_targets():
  ex = pipeline.window_to_example(np.arange(9, dtype=np.int32))
  np.testing.assert_array_equal(ex["inputs"], np.arange(8))
  np.testing.assert_array_equal(ex["targets"], np.arange(1, 9))
  np.testing.assert_array_equal(ex["positions"], np.arange(8))
  assert ex["segment_ids"].tolist() == [1] * 8 and ex["loss_mask"].tolist() == [1] * 8


@pytest.mark.parametrize("processes", [2, 4])
def test_global_batch_is_the_same_for_any_process_count(processes):
  src = pipeline.SyntheticSource(256, 16, seed=0, split=pipeline.TRAIN)
  one = take(iter(pipeline.batches(windows(src), 8, 0, 1)), 5)
  shards = [take(iter(pipeline.batches(windows(src), 8, p, processes)), 5) for p in range(processes)]
  joined = [{k: np.concatenate([s[step][k] for s in shards]) for k in one[0]} for step in range(5)]
  assert_batches_equal(joined, one)
  assert one[0]["inputs"].shape == (8, 16)


def test_resume_from_iterator_state_gives_the_same_next_batches():
  src = pipeline.SyntheticSource(256, 16, seed=0, split=pipeline.TRAIN)
  it = iter(pipeline.batches(windows(src), 4, 0, 1))
  take(it, 3)
  state = it.get_state()
  expected = take(it, 4)
  resumed = iter(pipeline.batches(windows(src), 4, 0, 1))
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 4), expected)


def test_worker_processes_give_the_same_batches():
  src = pipeline.SyntheticSource(256, 16, seed=0, split=pipeline.TRAIN)
  assert_batches_equal(
    take(iter(pipeline.batches(windows(src), 4, 0, 1, num_workers=1)), 3),
    take(iter(pipeline.batches(windows(src), 4, 0, 1)), 3),
  )


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_file_windows(tmp_path, dtype):
  tokens = np.arange(10_000).astype(dtype)  # unique ids: a window's first token locates it
  path = tmp_path / "tokens.bin"
  tokens.tofile(path)
  cfg = make_config(
    **{
      "data.source": "tokens",
      "data.path": str(path),
      "data.token_dtype": dtype,
      "data.seq_len": 32,
      "data.eval_fraction": 0.1,
      "model.vocab_size": 10_000,
    }
  )
  train_src, eval_src = (
    pipeline.TokenFileSource(str(path), dtype, 32, 0, split, 0.1) for split in (pipeline.TRAIN, pipeline.EVAL)
  )
  for src, lo, hi in [(train_src, 0, 9000), (eval_src, 9000, 10_000)]:
    for i in range(50):
      w = src[i]
      assert w.shape == (33,) and w.dtype == np.int32
      start = int(w[0])
      np.testing.assert_array_equal(w, tokens[start : start + 33])  # contiguous window
      assert lo <= start and start + 33 <= hi  # inside its split
  train, _ = pipeline.train_and_eval(cfg)
  assert next(train)["inputs"].shape == (cfg.train.global_batch, 32)


def test_token_file_errors(tmp_path):
  path = tmp_path / "small.bin"
  np.arange(40, dtype=np.uint16).tofile(path)
  cfg = make_config(**{"data.source": "tokens", "data.path": str(path), "data.seq_len": 32})
  with pytest.raises(UserError, match="eval split has 1 tokens, fewer than data.seq_len"):
    pipeline.examples(cfg, pipeline.EVAL)
  big = tmp_path / "big.bin"
  (np.arange(5000, dtype=np.uint16) % 300).tofile(big)
  cfg = make_config(**{"data.source": "tokens", "data.path": str(big), "data.seq_len": 32})
  with pytest.raises(UserError, match="token id 299 >= model.vocab_size=256"):
    pipeline.train_and_eval(cfg)
