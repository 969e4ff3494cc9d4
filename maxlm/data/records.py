"""Training rows straight from text records that other tools wrote: ArrayRecord files (Grain's format) and Parquet
shards, tokenized with a SentencePiece model and packed as the rows are read, so no `maxlm data prepare` pass.

Records: `data.path` names the files (comma-separated paths, directories or globs; `gs://` ones are copied once
into the local cache, see maxlm.storage). A Parquet record is a row's `data.text_field` column (string); an
ArrayRecord record is UTF-8 text, or a JSON object whose `data.text_field` is the text. Empty, null and undecodable
records are skipped (they yield no tokens). Documents are numbered across the files in the order given; the last
`data.eval_fraction` of them are the eval split.

Order: each split's documents are read in an endless sequence of epochs. An epoch shuffles blocks of
BLOCK consecutive documents, then the documents inside each block (so reads stay near each other in a file: a
Parquet row group is decoded once for the rows that use it, not once per row).

Packing into rows without a pass over the data: row r of every global batch (B rows) is its own stream, fed the
documents at positions r, r+B, r+2B, … of the sequence, each followed by EOS, concatenated and cut into rows of
T+1 tokens (consecutive rows share one token, as in a prepared dataset). A process reads the rows it holds
(`rows[shard::shards]` of `maxlm.data.pipeline`: a contiguous range) and so tokenizes only their documents; the
global batch is the same for any number of processes. The iterator's position is, per stream, (document number,
tokens of it already used): a checkpoint holds it, and a resumed run continues with the same rows. Segment ids,
positions and the loss mask follow `PackedSource` (a target that starts a new document does not count).
"""

from __future__ import annotations

import bisect
import collections
import glob
import json
import os
import threading

import ml_collections
import numpy as np

from maxlm import storage
from maxlm.data import tokenizer as tokenizer_lib
from maxlm.errors import UserError

SOURCES = ("array_record", "parquet")
SUFFIXES = {"array_record": (".array_record", ".arrayrecord"), "parquet": (".parquet",)}
BLOCK = 256  # Documents shuffled as a unit (then within): reads stay local in the files.
CACHED_GROUPS = 64  # Parquet row groups kept decoded (streams read near each other in the sequence).


def files(source: str, path: str) -> list[str]:
  """The local files of `path` (comma-separated files, directories or globs; a bucket's copied to the cache)."""
  found = []
  for item in filter(None, (p.strip() for p in path.split(","))):
    if storage.is_remote(item):
      if any(c in item for c in "*?["):
        raise UserError(f"data.path={item}: globs are not supported on a bucket; name files or a directory")
      item = storage.local_copy(item, f"{source} data")
    if os.path.isdir(item):
      names = sorted(os.path.join(d, f) for d, _, fs in os.walk(item) for f in fs if f.endswith(SUFFIXES[source]))
    elif os.path.isfile(item):
      names = [item]
    else:
      names = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p) and p.endswith(SUFFIXES[source]))
    if not names:
      raise UserError(
        f"data.path={item}: matches no {source} file ({'/'.join(SUFFIXES[source])}); check the path or data.source"
      )
    found.extend(names)
  return list(dict.fromkeys(found))


class TextRecords:
  """Random access to the text of every record of a list of files; `text(i)` is None for a record with none."""

  def __init__(self, source: str, paths: list[str], text_field: str):
    self.source, self.paths, self.text_field = source, paths, text_field
    self._lock = threading.Lock()
    self._open()

  def _open(self) -> None:
    if self.source == "parquet":
      import pyarrow as pa  # noqa: PLC0415  Only for Parquet input.
      import pyarrow.parquet as pq  # noqa: PLC0415

      self._files, self._group_starts, counts = [], [], []
      for path in self.paths:
        try:
          f = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
          raise UserError(
            f"data.path: {path} is not a readable Parquet file ({' '.join(str(e).split())[:200]})"
          ) from None
        field = f.schema_arrow.field(self.text_field) if self.text_field in f.schema_arrow.names else None
        if field is None or not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
          raise UserError(
            f"data.path: {path} has no string column {self.text_field!r} (columns: {', '.join(f.schema_arrow.names)}): "
            "set data.text_field"
          )
        rows = [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)]
        self._files.append(f)
        self._group_starts.append(np.concatenate([[0], np.cumsum(rows)]).astype(np.int64))
        counts.append(sum(rows))
      self._groups = collections.OrderedDict()
    else:
      from array_record.python import array_record_data_source  # noqa: PLC0415

      try:
        self._reader = array_record_data_source.ArrayRecordDataSource(self.paths)
        counts = [len(self._reader)]
      except (RuntimeError, ValueError, OSError) as e:
        raise UserError(f"data.path: not readable ArrayRecord files ({' '.join(str(e).split())[:200]})") from None
    self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

  def __len__(self) -> int:
    return int(self.starts[-1])

  def text(self, index: int) -> str | None:
    if self.source == "parquet":
      k = int(np.searchsorted(self.starts, index, side="right")) - 1
      row = index - int(self.starts[k])
      g = int(np.searchsorted(self._group_starts[k], row, side="right")) - 1
      return self._group(k, g)[row - int(self._group_starts[k][g])]
    raw = self._reader[index]
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError:
      return None
    if text.startswith("{"):
      try:
        record = json.loads(text)
      except ValueError:
        return text
      if isinstance(record, dict):
        value = record.get(self.text_field)
        return value if isinstance(value, str) else None
    return text

  def _group(self, k: int, g: int) -> list:
    with self._lock:  # Grain may read from several threads; one decode per row group.
      key = (k, g)
      if key in self._groups:
        self._groups.move_to_end(key)
        return self._groups[key]
      column = self._files[k].read_row_group(g, columns=[self.text_field]).column(0).to_pylist()
      self._groups[key] = column
      if len(self._groups) > CACHED_GROUPS:
        self._groups.popitem(last=False)
      return column

  def __getstate__(self):
    return {"source": self.source, "paths": self.paths, "text_field": self.text_field}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()
    self._open()


class DocumentSequence:
  """The documents of one split, in the endless shuffled order of the module docstring: `tokens(p)` are the ids of
  the p-th document of the sequence, EOS appended (just EOS for a record with no text)."""

  def __init__(self, records: TextRecords, tok: tokenizer_lib.Tokenizer, begin: int, end: int, seed: int, split: int):
    self.records, self.tok, self.begin, self.seed = records, tok, begin, (seed, split)
    self.n = end - begin
    self.blocks = -(-self.n // BLOCK)
    self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None
    self._block: tuple[int, int, np.ndarray] | None = None  # (epoch, block, its order): streams read near each other
    self.eos = tok.sp.eos_id()

  def index(self, position: int) -> int:
    """The record number of sequence position `position`."""
    epoch, p = divmod(position, self.n)
    cache = self._epoch
    if cache is None or cache[0] != epoch:
      rng = np.random.default_rng([*self.seed, 15485863, epoch])
      order = rng.permutation(self.blocks)
      sizes = np.minimum(BLOCK, self.n - order * BLOCK)
      cache = (epoch, order, np.concatenate([[0], np.cumsum(sizes)]))
      self._epoch = cache
    _, order, starts = cache
    k = bisect.bisect_right(starts, p) - 1
    block, within = int(order[k]), p - int(starts[k])
    size = int(starts[k + 1] - starts[k])
    cached = self._block
    if cached is None or cached[:2] != (epoch, block):
      cached = (epoch, block, np.random.default_rng([*self.seed, 32452843, epoch, block]).permutation(size))
      self._block = cached
    return self.begin + block * BLOCK + int(cached[2][within])

  def tokens(self, position: int) -> list[int]:
    text = self.records.text(self.index(position))
    return ([] if not text else self.tok.encode(text)) + [self.eos]


class PackedStreams:
  """The rows `[first, first + count)` of every global batch of `global_rows` rows, packed per stream; an iterator
  of {inputs, targets, positions, segment_ids, loss_mask} batches of `count` rows, checkpointable with
  get_state/set_state (the JSON-able position of every stream)."""

  def __init__(self, docs: DocumentSequence, seq_len: int, global_rows: int, first: int, count: int):
    self.docs, self.seq_len, self.global_rows, self.first, self.count = docs, seq_len, global_rows, first, count
    self.streams = [[0, 0] for _ in range(count)]  # (document number in the stream, tokens of it already used)
    self._docs: list[dict[int, list[int]]] = [{} for _ in range(count)]  # tokenized documents still in use

  def _doc(self, stream: int, j: int) -> list[int]:
    cache = self._docs[stream]
    if j not in cache:
      cache[j] = self.docs.tokens(self.first + stream + j * self.global_rows)
    return cache[j]

  def _row(self, stream: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    j, offset = self.streams[stream]
    tokens, segments, positions, segment, need = [], [], [], 1, self.seq_len + 1
    while True:
      piece = self._doc(stream, j)[offset : offset + need]  # never empty: offset < len, and a document has EOS
      tokens.extend(piece)
      segments.extend([segment] * len(piece))
      positions.extend(range(len(piece)))
      need, offset = need - len(piece), offset + len(piece)
      if need == 0:
        break
      j, offset, segment = j + 1, 0, segment + 1
    # The next row starts at this row's last token (the target that ends it is the next row's first input).
    self.streams[stream] = [j, offset - 1]
    for done in [k for k in self._docs[stream] if k < j]:
      del self._docs[stream][done]
    return np.asarray(tokens, np.int32), np.asarray(segments, np.int32), np.asarray(positions, np.int32)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows = [self._row(s) for s in range(self.count)]
    tokens, segments, positions = (np.stack(x) for x in zip(*rows))
    return {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "positions": positions[:, :-1],
      "segment_ids": segments[:, :-1],
      "loss_mask": (segments[:, 1:] == segments[:, :-1]).astype(np.int32),
    }

  def get_state(self) -> dict:
    return {"rows": [self.first, self.count, self.global_rows], "streams": [list(s) for s in self.streams]}

  def set_state(self, state: dict | bytes) -> None:
    state = json.loads(state) if isinstance(state, (bytes, str)) else state
    if state.get("rows") != [self.first, self.count, self.global_rows]:
      raise UserError(
        f"the checkpoint's data position is for rows {state.get('rows')} (first, count, global batch), this process "
        f"reads {[self.first, self.count, self.global_rows]}: resume {self.docs.records.source} data with the same "
        "train.global_batch and process layout"
      )
    self.streams = [list(s) for s in state["streams"]]
    self._docs = [{} for _ in range(self.count)]

  def fresh(self) -> PackedStreams:
    """The same rows from their start (eval reads the same batches every time)."""
    return PackedStreams(self.docs, self.seq_len, self.global_rows, self.first, self.count)

  def start_prefetch(self) -> None:  # Grain's checkpoint handler calls it after a restore.
    pass


def split_bounds(n: int, eval_fraction: float, split: int) -> tuple[int, int]:
  """[begin, end) of the train (0) or eval (1) documents among n: the last eval_fraction of them are eval."""
  held = min(n - 1, max(1, round(n * eval_fraction))) if eval_fraction > 0 else 0
  return (0, n - held) if split == 0 else (n - held, n)


def streams(cfg: ml_collections.ConfigDict, split: int, shard: int, shards: int) -> PackedStreams:
  """This process's packed rows of `split` (0 train, 1 eval) for a config with data.source in SOURCES."""
  d = cfg.data
  tok = tokenizer_lib.Tokenizer(d.tokenizer)
  if tok.vocab_size > cfg.model.vocab_size:
    raise UserError(
      f"data.tokenizer={d.tokenizer} has a {tok.vocab_size}-token vocabulary but model.vocab_size="
      f"{cfg.model.vocab_size}: set model.vocab_size >= {tok.vocab_size}"
    )
  records = TextRecords(d.source, files(d.source, d.path), d.text_field)
  if len(records) < 2:
    raise UserError(f"data.path={d.path}: {len(records)} record(s); train and eval need at least 2")
  begin, end = split_bounds(len(records), d.eval_fraction, split)
  if begin == end:
    raise UserError("data.eval_fraction=0 leaves no eval documents: raise it, or set train.eval_every=0")
  rows = cfg.train.global_batch // shards
  docs = DocumentSequence(records, tok, begin, end, d.seed, split)
  return PackedStreams(docs, d.seq_len, cfg.train.global_batch, shard * rows, rows)
