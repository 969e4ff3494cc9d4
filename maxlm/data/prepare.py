"""`maxlm data prepare`: raw text -> curated, tokenized documents in a random-access format, once.

The output is a prepared dataset (the format: maxlm/data/dataset.py) with a `curation_report.md`: what
curation removed and why, with samples.

A document goes to `val` when the first 8 bytes of the SHA-256 of its text, read as a fraction of 2^64,
fall below `val_fraction`: the split depends on the text only, not on input order or process count.

Curation, per document in input order: exact dedup (`dedup="exact"` or `"near"`: the first document with a
given normalized text is kept), quality filters (`filters`, see maxlm/data/quality.py), then near dedup
(`dedup="near"`: dropped when a document kept earlier has estimated Jaccard similarity >= `near_threshold`,
see maxlm/data/dedup.py). So of a cluster of near duplicates the first in input order is kept.

Reading and curation decisions run in this process; tokenization, quality statistics and MinHash signatures
run in `workers` processes on batches of documents, and results are consumed in input order, so the output
is byte-identical for any number of workers. At most 2 batches per worker are in flight: memory is bounded.

The output is written into `<output>.partial` and renamed when complete, so an interrupted prepare never
looks finished; a rerun deletes the partial directory and starts over. The same inputs and arguments give
byte-identical output.
"""

from __future__ import annotations

import array
import collections
import concurrent.futures
import hashlib
import json
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import tqdm

from maxlm import storage
from maxlm.data import corpus, dataset, quality
from maxlm.data import dedup as dedup_lib
from maxlm.data.tokenizer import Tokenizer
from maxlm.errors import UserError
from maxlm.files import partial_directory

log = logging.getLogger("maxlm")

DEDUP = ("exact", "near", "none")
FILTERS = ("default", "prose", "code", "none")
REPORT_SAMPLES = 5  # documents per reason (and near-duplicate clusters) in curation_report.md
CLUSTER_SAMPLES = 3  # dropped members shown per near-duplicate cluster
EXCERPT_CHARS = 200
BATCH_DOCS, BATCH_BYTES = 32, 1 << 20  # one worker task


def default_workers() -> int:
  return max(1, min(len(os.sched_getaffinity(0)), 32))


def in_val(text: str, val_fraction: float) -> bool:
  digest = hashlib.sha256(text.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "little") / 2**64 < val_fraction


def prepare(
  inputs: Sequence[str],
  tokenizer_path: str,
  output: str,
  *,
  val_fraction: float = 0.01,
  text_field: str = "text",
  dedup: str = "exact",
  filters: str = "default",
  near_threshold: float = 0.8,
  shingle_words: int = dedup_lib.SHINGLE_WORDS,
  workers: int = 1,
  progress: bool = False,
) -> dict:
  """Writes the prepared dataset to `output`; returns its manifest. `workers` never changes the output."""
  if not 0 <= val_fraction < 1:
    raise UserError(f"--val_fraction={val_fraction}: use a fraction in [0, 1)")
  if dedup not in DEDUP:
    raise UserError(f"--dedup={dedup}: choose one of {', '.join(DEDUP)}")
  if filters not in FILTERS:
    raise UserError(f"--filters={filters}: choose one of {', '.join(FILTERS)}")
  if not 0 < near_threshold <= 1:
    raise UserError(f"--near_threshold={near_threshold}: use a Jaccard similarity in (0, 1], e.g. 0.8")
  if not 1 <= shingle_words <= 64:
    raise UserError(f"--shingle_words={shingle_words}: use 1..64 words (5 is usual)")
  if workers < 1:
    raise UserError(f"--workers={workers}: use 1 or more processes")
  tok = Tokenizer(tokenizer_path)
  input_files = corpus.expand(inputs)
  arguments = {
    "inputs": list(inputs),
    "files": [_fingerprint(f) for f in input_files],
    "val_fraction": val_fraction,
    "text_field": text_field,
    "dedup": dedup,
    "filters": filters,
    "tokenizer_sha256": tok.info()["sha256"],
  }
  if dedup == "near":
    arguments.update(near_threshold=near_threshold, shingle_words=shingle_words)
  existing = storage.join(output, "manifest.json")
  if storage.exists(existing):
    try:
      manifest = json.loads(storage.read_text(existing))
    except ValueError:
      manifest = None
    if not isinstance(manifest, dict):
      raise UserError(f"--output={output} holds an unreadable manifest.json: choose another --output, or delete it")
    if manifest.get("arguments") == arguments and manifest.get("format_version") == dataset.FORMAT_VERSION:
      log.info("%s already holds this dataset; nothing to do", output)
      return manifest
    raise UserError(
      f"--output={output} holds a different dataset (other inputs, settings or format version): "
      "choose another --output, or delete it"
    )
  if storage.exists(output):
    raise UserError(f"--output={output} exists and is not a prepared dataset: choose another --output")

  dtype = dataset.token_dtype(tok.vocab_size)
  rule_sets = [name for name in quality.RULE_SETS if filters in (name, "default")]
  curator = _Curator(input_files, dedup, near_threshold if dedup == "near" else None, rule_sets)
  # Written into <output>.partial, renamed when complete and deleted on any failure (the space comes back); for a
  # bucket, built locally and uploaded with manifest.json last (readers take it as the mark of a complete dataset).
  with partial_directory(output, last=("manifest.json",)) as partial:
    writers = {split: dataset.SplitWriter(os.path.join(partial, split), dtype) for split in dataset.SPLITS}
    skipped = collections.Counter()
    options = {
      "tokenizer_path": tokenizer_path,
      "dtype": dtype,
      "val_fraction": val_fraction,
      "dedup": dedup,
      "shingle_words": shingle_words,
    }
    bar = _Progress([os.path.getsize(f) for f in input_files], progress)
    for doc, result in _analyzed(_batches(input_files, skipped, text_field, filters), options, workers):
      bar.advance(doc.file, result.bytes)
      split = curator.keep(doc, result)
      if split is not None:
        writers[split].add(result.ids)
    bar.close()
    splits = {split: w.close() for split, w in writers.items()}
    if splits["train"]["documents"] == 0:
      raise UserError(
        f"--input {' '.join(inputs)}: no usable training documents (skipped: {dict(skipped)}, "
        f"curation: {curator.totals()}); see --filters and --dedup"
      )
    curation = curator.summary()
    if dedup == "near":
      bands, rows = dedup_lib.choose_bands(near_threshold)
      curation["near_dedup"] = {
        "threshold": near_threshold,
        "shingle_words": shingle_words,
        "num_perm": dedup_lib.NUM_PERM,
        "bands": bands,
        "rows": rows,
      }
    manifest = {
      "format_version": dataset.FORMAT_VERSION,
      "tokenizer": {**tok.info(), "path": tokenizer_path},
      "token_dtype": dtype,
      "eos_appended": True,
      "arguments": arguments,
      "splits": splits,
      "sources": curator.sources,
      "skipped": dict(sorted(skipped.items())),
      "curation": curation,
    }
    with open(os.path.join(partial, "manifest.json"), "w") as f:
      json.dump(manifest, f, indent=2, sort_keys=True)
    with open(os.path.join(partial, "curation_report.md"), "w") as f:
      f.write(curator.report(dict(skipped)))
  return manifest


class _Doc(NamedTuple):
  file: int  # index in the input file list
  ordinal: int  # document number within that file
  rule_set: str | None  # quality rule set that applies, if any
  text: str


class _Result(NamedTuple):
  bytes: int  # UTF-8 size of the text
  key: bytes | None  # exact-dedup key
  failure: tuple[str, float] | None  # the broken quality rule and the document's value
  signature: np.ndarray | None  # MinHash, for near dedup
  split: str | None
  ids: np.ndarray | None  # token ids + EOS; None when filtered out


class _Analyzer:
  """The per-document work done in worker processes; a pure function of the document and the options."""

  def __init__(self, tokenizer_path: str, dtype: str, val_fraction: float, dedup: str, shingle_words: int):
    self.tok, self.dtype, self.val_fraction = Tokenizer(tokenizer_path), dtype, val_fraction
    self.dedup, self.shingle_words = dedup, shingle_words

  def __call__(self, batch: list[tuple[str | None, str]]) -> list[_Result]:
    return [self.analyze(rule_set, text) for rule_set, text in batch]

  def analyze(self, rule_set: str | None, text: str) -> _Result:
    normal = dedup_lib.words(text) if self.dedup != "none" else None
    key = dedup_lib.exact_key(normal) if normal is not None else None
    if rule_set is not None:
      stats = quality.measure(text)
      rule = quality.first_failure(stats, quality.RULE_SETS[rule_set])
      if rule is not None:
        return _Result(len(text.encode("utf-8")), key, (rule.name, stats[rule.stat]), None, None, None)
    sig = dedup_lib.signature(normal, self.shingle_words) if self.dedup == "near" else None
    ids = np.asarray(self.tok.encode(text) + [self.tok.sp.eos_id()], self.dtype)
    split = "val" if in_val(text, self.val_fraction) else "train"
    return _Result(len(text.encode("utf-8")), key, None, sig, split, ids)


_worker_analyzer: _Analyzer | None = None


def _init_worker(options: dict) -> None:
  global _worker_analyzer
  _worker_analyzer = _Analyzer(**options)


def _run_in_worker(batch: list[tuple[str | None, str]]) -> list[_Result]:
  return _worker_analyzer(batch)


def _batches(files: list[str], skipped: collections.Counter, text_field: str, filters: str) -> Iterator[list[_Doc]]:
  batch, size = [], 0
  for i, path in enumerate(files):
    rule_set = quality.rule_set(path, filters)
    for ordinal, text in enumerate(corpus.documents([path], skipped, text_field)):
      batch.append(_Doc(i, ordinal, rule_set, text))
      size += len(text)
      if len(batch) == BATCH_DOCS or size >= BATCH_BYTES:
        yield batch
        batch, size = [], 0
  if batch:
    yield batch


def _analyzed(batches: Iterator[list[_Doc]], options: dict, workers: int) -> Iterator[tuple[_Doc, _Result]]:
  """(document, result) pairs in input order, computed here (workers=1) or in `workers` processes."""
  if workers == 1:
    analyzer = _Analyzer(**options)
    for batch in batches:
      yield from zip(batch, analyzer([(d.rule_set, d.text) for d in batch]))
    return
  # Spawned, not forked: the caller may hold JAX or other threads that a fork would copy mid-lock.
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(
    workers, mp_context=context, initializer=_init_worker, initargs=(options,)
  ) as pool:
    pending = collections.deque()
    for batch in batches:
      pending.append((batch, pool.submit(_run_in_worker, [(d.rule_set, d.text) for d in batch])))
      if len(pending) >= 2 * workers:
        done, future = pending.popleft()
        yield from zip(done, future.result())
    while pending:
      done, future = pending.popleft()
      yield from zip(done, future.result())


class _Curator:
  """Keeps or drops each document in input order; counts and samples what it drops."""

  def __init__(self, files: list[str], dedup: str, near_threshold: float | None, rule_sets: list[str]):
    self.files, self.dedup = files, dedup
    self.seen: dict[bytes, int] = {}  # exact key -> input file of its first document
    self.near = dedup_lib.NearIndex(near_threshold) if near_threshold is not None else None
    self.near_origin = (array.array("q"), array.array("q"))  # kept document in `near` -> (file, ordinal)
    self.rule_counts = {name: {r.name: 0 for r in quality.RULE_SETS[name]} for name in rule_sets}
    self.sources = {path: {} for path in files}
    self.samples = collections.defaultdict(list)  # reason -> report lines
    self.clusters: dict[int, list[str]] = {}  # near index of the kept document -> report lines of its duplicates

  def keep(self, doc: _Doc, result: _Result) -> str | None:
    """The split `doc` goes to, or None when it is dropped."""
    counts = self.sources[self.files[doc.file]]
    if result.key is not None:
      original = self.seen.get(result.key)
      if original is not None:
        return self._drop(counts, "exact_duplicates", doc, f"repeats a document of `{self.files[original]}`")
      self.seen[result.key] = doc.file
    if result.failure is not None:
      name, value = result.failure
      self.rule_counts[doc.rule_set][name] += 1
      return self._drop(
        counts, "filtered", doc, f"{name.rsplit('_', 1)[0]} = {value:.4g}", reason=f"{doc.rule_set}/{name}"
      )
    if self.near is not None:
      hit = self.near.find(result.signature)
      if hit is not None:
        kept, similarity = hit
        if kept in self.clusters or len(self.clusters) < REPORT_SAMPLES:
          members = self.clusters.setdefault(kept, [])
          if len(members) < CLUSTER_SAMPLES:
            members.append(
              f"  - dropped {self._where(doc.file, doc.ordinal)}, Jaccard ≈ {similarity:.2f}: {_excerpt(doc.text)}"
            )
        counts["near_duplicates"] = counts.get("near_duplicates", 0) + 1
        return None
      self.near.add(result.signature)
      self.near_origin[0].append(doc.file)
      self.near_origin[1].append(doc.ordinal)
    counts[f"{result.split}_documents"] = counts.get(f"{result.split}_documents", 0) + 1
    counts[f"{result.split}_tokens"] = counts.get(f"{result.split}_tokens", 0) + len(result.ids)
    counts["bytes"] = counts.get("bytes", 0) + result.bytes
    return result.split

  def _drop(self, counts: dict, kind: str, doc: _Doc, why: str, reason: str | None = None) -> None:
    counts[kind] = counts.get(kind, 0) + 1
    reason = reason or kind
    if len(self.samples[reason]) < REPORT_SAMPLES:
      self.samples[reason].append(f"- {self._where(doc.file, doc.ordinal)} {why}: {_excerpt(doc.text)}")
    return None

  def _where(self, file: int, ordinal: int) -> str:
    return f"`{self.files[file]}` #{ordinal}"

  def totals(self) -> dict:
    kinds = ("exact_duplicates", "near_duplicates", "filtered")
    return {k: sum(c.get(k, 0) for c in self.sources.values()) for k in kinds}

  def summary(self) -> dict:
    return {
      **self.totals(),
      "filters": self.rule_counts,
      "thresholds": {name: {r.name: r.value for r in quality.RULE_SETS[name]} for name in self.rule_counts},
    }

  def report(self, skipped: dict) -> str:
    totals = self.totals()
    lines = ["# Curation report", "", "| removed | documents |", "| --- | ---: |"]
    lines += [f"| {reason} | {count} |" for reason, count in sorted({**skipped, **totals}.items())]
    for name, counts in self.rule_counts.items():
      lines += [
        "",
        f"## Quality filters: {name} rules (maxlm/data/quality.py)",
        "",
        "| rule | drop when | dropped |",
        "| --- | --- | ---: |",
      ]
      for rule in quality.RULE_SETS[name]:
        lines.append(
          f"| {rule.name} | {rule.stat} {'<' if rule.bound == 'min' else '>'} {rule.value:g} | {counts[rule.name]} |"
        )
    for reason, samples in sorted(self.samples.items()):
      lines += ["", f"## {reason} (first {len(samples)})", "", *samples]
    if self.clusters:
      lines += ["", f"## near_duplicates: clusters (first {len(self.clusters)}; the first document is kept)", ""]
      for kept, members in self.clusters.items():
        lines += [f"- kept {self._where(self.near_origin[0][kept], self.near_origin[1][kept])}", *members]
    return "\n".join(lines) + "\n"


def _excerpt(text: str) -> str:
  return repr(" ".join(text.split())[:EXCERPT_CHARS])


class _Progress:
  """Input bytes done: a tqdm bar on a terminal, a log line every 30 s otherwise (no carriage returns in logs)."""

  def __init__(self, sizes: list[int], enabled: bool):
    self.enabled, self.sizes, self.total, self.done = enabled, sizes, sum(sizes), 0
    self.file, self.file_left = -1, 0
    self.bar = (
      tqdm.tqdm(total=self.total, unit="B", unit_scale=True, desc="prepare", dynamic_ncols=True)
      if enabled and sys.stderr.isatty()
      else None
    )
    self.last_log = time.monotonic()

  def advance(self, file: int, nbytes: int) -> None:
    """Document text of `nbytes` from input file `file` is done."""
    if not self.enabled:
      return
    step = 0
    if file != self.file:  # Credit the rest of the finished file (compressed files hold more text than bytes).
      step, self.file, self.file_left = self.file_left, file, self.sizes[file]
    taken = min(nbytes, self.file_left)
    self.file_left -= taken
    self._update(step + taken)

  def _update(self, step: int) -> None:
    self.done += step
    if self.bar is not None:
      self.bar.update(step)
    elif time.monotonic() - self.last_log > 30:
      self.last_log = time.monotonic()
      log.info("prepare: %.1f of %.1f MB read", self.done / 1e6, self.total / 1e6)

  def close(self) -> None:
    if self.enabled:
      self._update(self.total - self.done)  # Files with no documents, and the last file's rest.
      if self.bar is not None:
        self.bar.close()


def _fingerprint(path: str) -> dict:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return {"path": path, "sha256": h.hexdigest()}
