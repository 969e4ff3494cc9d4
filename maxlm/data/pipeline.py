"""Grain input pipelines: random-access sources -> examples -> per-process batches.

Every example is a dict of int32 [T] arrays: `inputs`, `targets`, `positions`, `segment_ids`, and a
`loss_mask` (1 where the target counts). The synthetic and token-file sources give one unpacked window per
row (segment 1, positions 0..T-1); `PackedSource` packs the documents of a prepared dataset.

Determinism and sharding: record i of a source depends only on (seed, i). Records are batched into
row shards of the global batch: global step k holds records [k·B, (k+1)·B), and row shard s of n holds the s-th
contiguous B/n of them, so the global batch at step k is the same for any number of processes. A process reads
the shard its devices hold (maxlm.parallel.mesh.HostRows): its own one, or, where a mesh axis that does not split
rows spans processes (context, tensor), the same one as the processes it shares rows with.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import grain
import ml_collections
import numpy as np
from absl import flags

from maxlm import storage
from maxlm.data import dataset, records
from maxlm.errors import UserError

TRAIN, EVAL = 0, 1
ENDLESS = 2**40  # Length of every source: indices never wrap, so no epoch replays an earlier one's order.


class SyntheticSource:
  """A learnable token stream: a walk along a fixed random cycle through the vocabulary, with noise.

  Clean token t is cycle[(start + t) mod V] for a random start; each observed token is replaced by a
  uniform random one with probability `noise`. A model that has learned the cycle predicts the next
  token, so the loss falls from ln V towards `entropy_floor()`.
  """

  def __init__(self, vocab_size: int, seq_len: int, seed: int, split: int, noise: float = 0.1):
    self.vocab_size, self.seq_len, self.seed, self.split, self.noise = vocab_size, seq_len, seed, split, noise
    self.cycle = np.random.default_rng([seed, 7919]).permutation(vocab_size).astype(np.int32)

  def __len__(self) -> int:
    return ENDLESS

  def __getitem__(self, index: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, self.split, index])
    start = rng.integers(self.vocab_size)
    tokens = self.cycle[(start + np.arange(self.seq_len + 1)) % self.vocab_size]
    noisy = rng.random(self.seq_len + 1) < self.noise
    return np.where(noisy, rng.integers(0, self.vocab_size, self.seq_len + 1), tokens).astype(np.int32)

  def entropy_floor(self) -> float:
    """Cross-entropy (nats) of the best predictor that knows the clean next token."""
    v, p = self.vocab_size, self.noise
    hit = 1 - p + p / v
    return float(-(hit * np.log(hit) + (v - 1) * (p / v) * np.log(p / v)))

  def __repr__(self) -> str:
    return f"SyntheticSource(vocab={self.vocab_size}, seq_len={self.seq_len}, seed={self.seed}, split={self.split})"


class TokenFileSource:
  """Windows of seq_len+1 tokens at random offsets of a flat token file (memory-mapped, opened lazily).

  The file is split by position: the last `eval_fraction` of its tokens are the eval split. Window i's
  offset depends only on (seed, i); the index space is endless (no epoch replays the same windows).
  """

  def __init__(self, path: str, dtype: str, seq_len: int, seed: int, split: int, eval_fraction: float):
    path = storage.local_copy(path, "token file")  # A bucket's file is read from a local copy (a memory map).
    self.path, self.dtype, self.seq_len, self.seed, self.split = os.path.abspath(path), dtype, seq_len, seed, split
    n = os.path.getsize(path) // np.dtype(dtype).itemsize
    cut = int(n * (1 - eval_fraction))
    self.start, self.stop = (0, cut) if split == TRAIN else (cut, n)
    if self.stop - self.start < seq_len + 1:
      raise UserError(
        f"data.path={path!r}: the {'train' if split == TRAIN else 'eval'} split has {self.stop - self.start} "
        f"tokens, fewer than data.seq_len+1={seq_len + 1}"
      )
    self._tokens = None

  def __len__(self) -> int:
    return ENDLESS

  def __getitem__(self, index: int) -> np.ndarray:
    if self._tokens is None:
      self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
    rng = np.random.default_rng([self.seed, self.split, index])
    offset = self.start + rng.integers(self.stop - self.start - self.seq_len)
    return np.asarray(self._tokens[offset : offset + self.seq_len + 1], dtype=np.int32)

  def __getstate__(self):  # Worker processes reopen the memmap.
    return {**self.__dict__, "_tokens": None}

  def __repr__(self) -> str:
    return f"TokenFileSource({self.path!r}, {self.dtype}, seq_len={self.seq_len}, seed={self.seed}, split={self.split})"


class PackedSource:
  """Rows of a prepared dataset (`maxlm data prepare`): documents shuffled per epoch, concatenated, cut into
  rows of seq_len+1 tokens, with `segment_ids` numbering the documents in a row (from 1) and `positions`
  counting from 0 in each document's piece of the row (RoPE scores depend only on position differences,
  so a piece cut from the middle of a document loses nothing by starting at 0). The rows themselves are
  then read in a shuffled order too (`grain.experimental.index_shuffle`, a bijection with O(1) memory):
  otherwise a long document fills many consecutive batches (a 700 KB file of the demo corpus was ~100
  steps of one file). Row i depends only on (seed, i): random access, so resuming and per-process slicing
  work as for the other sources. Indices run on through later epochs (`rows_per_epoch` rows each, in a
  new order each epoch); rows do not cross epochs.

  The loss mask drops targets that start a new document (the token after an EOS is not predictable from
  the previous document, which is all the masked attention lets the model see).
  """

  def __init__(self, directory: str, split: str, seq_len: int, seed: int):
    directory = storage.local_copy(directory, "prepared dataset")  # A bucket's dataset: a local copy, made once.
    self.directory, self.split, self.seq_len, self.seed = os.path.abspath(directory), split, seq_len, seed
    self._tokens, self.offsets, self.manifest = dataset.load_split(directory, split)
    self.lengths = np.diff(self.offsets)
    total = int(self.offsets[-1])
    if total < seq_len + 1:
      raise UserError(
        f"data.path={directory!r}: the {split} split has {total} tokens, fewer than data.seq_len+1={seq_len + 1}"
      )
    self.rows_per_epoch = (total - 1) // seq_len
    self._layout_cache = None  # (epoch, document order, document-start offsets, row-shuffle seed) of the last epoch

  def __len__(self) -> int:
    return ENDLESS

  def _layout(self, epoch: int):
    # Grain reads records from several threads: the cache is replaced by one assignment, never updated field
    # by field, so a reader sees either the old epoch's complete layout or the new one's.
    cache = self._layout_cache
    if cache is None or cache[0] != epoch:
      rng = np.random.default_rng([self.seed, 104729, epoch])
      order = rng.permutation(len(self.lengths))
      cache = (epoch, order, np.concatenate([[0], np.cumsum(self.lengths[order])]), int(rng.integers(2**31)))
      self._layout_cache = cache
    return cache[1:]

  def row_position(self, index: int) -> int:
    """Which row of its epoch's packed stream record `index` is (a per-epoch permutation of the rows)."""
    return self._shuffled_row(index, self._layout(index // self.rows_per_epoch)[2])

  def _shuffled_row(self, index: int, row_seed: int) -> int:
    return grain.experimental.index_shuffle(
      index % self.rows_per_epoch, max_index=self.rows_per_epoch - 1, seed=row_seed, rounds=4
    )

  def tokens(self) -> np.ndarray:
    if self._tokens is None:  # After unpickling in a worker process.
      self._tokens = dataset.load_split(self.directory, self.split)[0]
    return self._tokens

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    order, starts, row_seed = self._layout(index // self.rows_per_epoch)  # One lookup: the epoch's layout.
    begin = self._shuffled_row(index, row_seed) * self.seq_len
    k = int(np.searchsorted(starts, begin, side="right")) - 1
    tokens, segments, positions, pos, segment = [], [], [], begin - starts[k], 1
    need = self.seq_len + 1
    while need > 0:
      doc = order[k]
      piece = self.tokens()[self.offsets[doc] + pos : self.offsets[doc + 1]][:need]
      tokens.append(piece)
      segments.append(np.full(len(piece), segment, np.int32))
      positions.append(np.arange(len(piece), dtype=np.int32))
      need, k, pos, segment = need - len(piece), k + 1, 0, segment + 1
    tokens, segments, positions = (np.concatenate(x) for x in (tokens, segments, positions))
    return {
      "inputs": tokens[:-1].astype(np.int32),
      "targets": tokens[1:].astype(np.int32),
      "positions": positions[:-1],
      "segment_ids": segments[:-1],
      "loss_mask": (segments[1:] == segments[:-1]).astype(np.int32),
    }

  def __getstate__(self):  # Worker processes reopen the memmap.
    return {**self.__dict__, "_tokens": None, "_layout_cache": None}

  def __repr__(self) -> str:
    return f"PackedSource({self.directory!r}, {self.split}, seq_len={self.seq_len}, seed={self.seed})"


def window_to_example(window_T1: np.ndarray) -> dict[str, np.ndarray]:
  T = window_T1.shape[0] - 1
  return {
    "inputs": window_T1[:-1],
    "targets": window_T1[1:],
    "positions": np.arange(T, dtype=np.int32),
    "segment_ids": np.ones(T, np.int32),
    "loss_mask": np.ones(T, np.int32),
  }


def examples(cfg: ml_collections.ConfigDict, split: int) -> grain.MapDataset:
  """Random-access examples of one split. For `prepared` data, `data.path` may name several datasets,
  comma-separated, mixed in the proportions of `data.weights` (default: equal)."""
  d = cfg.data
  if d.source == "synthetic":
    return grain.MapDataset.source(SyntheticSource(cfg.model.vocab_size, d.seq_len, d.seed, split)).map(
      window_to_example
    )
  if d.source == "tokens":
    source = TokenFileSource(d.path, d.token_dtype, d.seq_len, d.seed, split, d.eval_fraction)
    _check_token_ids(source, cfg.model.vocab_size)
    return grain.MapDataset.source(source).map(window_to_example)
  paths = [p for p in d.path.split(",") if p]
  sources = [PackedSource(p, "train" if split == TRAIN else "val", d.seq_len, d.seed + i) for i, p in enumerate(paths)]
  _check_prepared(sources, cfg.model.vocab_size)
  if len(sources) == 1:
    return grain.MapDataset.source(sources[0])
  weights = [float(w) for w in d.weights.split(",")] if d.weights else [1.0] * len(sources)
  return grain.MapDataset.mix([grain.MapDataset.source(s) for s in sources], weights)


def _check_prepared(sources: list[PackedSource], vocab_size: int) -> None:
  tokenizers = {s.manifest["tokenizer"]["sha256"] for s in sources}
  if len(tokenizers) > 1:
    raise UserError(
      f"data.path: the datasets {[s.directory for s in sources]} were made with different "
      "tokenizers: prepare them with the same one"
    )
  data_vocab = sources[0].manifest["tokenizer"]["vocab_size"]
  if data_vocab > vocab_size:
    raise UserError(
      f"data.path={sources[0].directory!r} was tokenized with a {data_vocab}-token vocabulary but "
      f"model.vocab_size={vocab_size}: set model.vocab_size >= {data_vocab}"
    )


def _check_token_ids(source: TokenFileSource, vocab_size: int) -> None:
  """Fails fast when the token file holds ids the model cannot embed (checks a sample of windows)."""
  sample = np.concatenate([source[i] for i in range(64)])
  if sample.max() >= vocab_size:
    raise UserError(
      f"data.path={source.path!r} holds token id {int(sample.max())} >= model.vocab_size="
      f"{vocab_size}: set model.vocab_size to the tokenizer's vocabulary size"
    )


def batches(
  ds: grain.MapDataset, global_batch: int, shard: int, shards: int, num_workers: int = 0
) -> grain.IterDataset:
  """Row shard `shard` of `shards` of each global batch of `ds`, as a resumable Grain iterator dataset."""
  ds = ds.batch(global_batch // shards, drop_remainder=True)[shard::shards]
  it = ds.to_iter_dataset()
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()  # Grain reads its absl flags in the spawned workers.
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return it


def train_and_eval(
  cfg: ml_collections.ConfigDict, shard: int = 0, shards: int = 1
) -> tuple[Iterator, Callable[[], Iterator]]:
  """The training iterator and a factory of fresh eval iterators (the same eval batches every time)."""
  if cfg.data.source in records.SOURCES:  # Tokenized and packed as read (maxlm/data/records.py).
    evals = records.streams(cfg, EVAL, shard, shards)
    return records.streams(cfg, TRAIN, shard, shards), evals.fresh
  train = iter(batches(examples(cfg, TRAIN), cfg.train.global_batch, shard, shards, cfg.data.num_workers))
  eval_examples = examples(cfg, EVAL)

  def eval_batches() -> Iterator:
    return iter(batches(eval_examples, cfg.train.global_batch, shard, shards))

  return train, eval_batches
