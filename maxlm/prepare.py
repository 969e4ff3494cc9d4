"""`maxlm data prepare`: raw text -> tokenized documents in a random-access format, once.

Output directory:
  manifest.json        tokenizer (hash, ids, vocab), per-split and per-source counts, skipped inputs, curation
  curation_report.md   what curation removed and why, with samples
  {train,val}/tokens.bin   every document's token ids followed by EOS, concatenated (uint16 or uint32)
  {train,val}/index.npy    int64 offsets: document i is tokens[index[i]:index[i+1]]

A document goes to `val` when the first 8 bytes of the SHA-256 of its text, read as a fraction of 2^64,
fall below `val_fraction`: the split depends on the text only, not on input order or process count.
Exact dedup (`dedup="exact"`, the default) keeps the first occurrence of each document whose normalized text
(Unicode NFKC, lowercased, whitespace runs collapsed) hashes the same, in input order.

The output is written into `<output>.partial` and renamed when complete, so an interrupted prepare never
looks finished; a rerun deletes the partial directory and starts over. The same inputs and arguments give
byte-identical output.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import shutil
import unicodedata
from collections.abc import Sequence

import numpy as np

from maxlm import corpus
from maxlm.config import ConfigError
from maxlm.tokenizer import Tokenizer

log = logging.getLogger("maxlm")

SPLITS = ("train", "val")
FORMAT_VERSION = 2  # 2: curation (exact dedup) and its report.
DEDUP = ("exact", "none")
REPORT_SAMPLES = 5


def normalized_hash(text: str) -> bytes:
  normal = " ".join(unicodedata.normalize("NFKC", text).lower().split())
  return hashlib.sha256(normal.encode("utf-8")).digest()


def token_dtype(vocab_size: int) -> str:
  return "uint16" if vocab_size <= 2**16 else "uint32"


def in_val(text: str, val_fraction: float) -> bool:
  digest = hashlib.sha256(text.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "little") / 2**64 < val_fraction


def prepare(inputs: Sequence[str], tokenizer_path: str, output: str, *, val_fraction: float = 0.01,
            text_field: str = "text", dedup: str = "exact") -> dict:
  """Writes the prepared dataset to `output`; returns its manifest."""
  if not 0 <= val_fraction < 1:
    raise ConfigError(f"--val-fraction={val_fraction}: use a fraction in [0, 1)")
  if dedup not in DEDUP:
    raise ConfigError(f"--dedup={dedup}: choose one of {', '.join(DEDUP)}")
  tok = Tokenizer(tokenizer_path)
  files = corpus.expand(inputs)
  arguments = {"inputs": list(inputs), "files": [_fingerprint(f) for f in files], "val_fraction": val_fraction,
               "text_field": text_field, "dedup": dedup, "tokenizer_sha256": tok.info()["sha256"]}
  existing = os.path.join(output, "manifest.json")
  if os.path.exists(existing):
    with open(existing) as f:
      manifest = json.load(f)
    if manifest.get("arguments") == arguments:
      log.info("%s already holds this dataset; nothing to do", output)
      return manifest
    raise ConfigError(f"--output={output} holds a different dataset (other inputs or settings): choose another "
                      "--output, or delete it")
  if os.path.exists(output):
    raise ConfigError(f"--output={output} exists and is not a prepared dataset: choose another --output")

  partial = output.rstrip("/") + ".partial"
  shutil.rmtree(partial, ignore_errors=True)  # Left by an interrupted run.
  dtype = token_dtype(tok.vocab_size)
  writers = {split: _SplitWriter(os.path.join(partial, split), dtype) for split in SPLITS}
  skipped, sources, seen, dropped = collections.Counter(), {}, {}, []
  for path in files:
    counts = collections.Counter()
    for text in corpus.documents([path], skipped, text_field):
      if dedup == "exact":
        key = normalized_hash(text)
        if key in seen:
          counts["exact_duplicates"] += 1
          if len(dropped) < REPORT_SAMPLES:
            dropped.append((path, seen[key], text))
          continue
        seen[key] = path
      split = "val" if in_val(text, val_fraction) else "train"
      ids = tok.encode(text) + [tok.sp.eos_id()]
      writers[split].add(ids)
      counts[f"{split}_documents"] += 1
      counts[f"{split}_tokens"] += len(ids)
      counts["bytes"] += len(text.encode("utf-8"))
    sources[path] = dict(counts)
  splits = {split: w.close() for split, w in writers.items()}
  if splits["train"]["documents"] == 0:
    shutil.rmtree(partial)
    raise ConfigError(f"--input {' '.join(inputs)}: no usable training documents (skipped: {dict(skipped)})")
  curation = {"exact_duplicates": sum(c.get("exact_duplicates", 0) for c in sources.values())}
  manifest = {"format_version": FORMAT_VERSION, "tokenizer": {**tok.info(), "path": tokenizer_path},
              "token_dtype": dtype, "eos_appended": True, "arguments": arguments, "splits": splits,
              "sources": sources, "skipped": dict(sorted(skipped.items())), "curation": curation}
  with open(os.path.join(partial, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
  with open(os.path.join(partial, "curation_report.md"), "w") as f:
    f.write(_report(curation, dict(skipped), dropped))
  os.replace(partial, output)
  return manifest


def _report(curation: dict, skipped: dict, dropped: list[tuple[str, str, str]]) -> str:
  lines = ["# Curation report", "", "| removed | documents |", "| --- | ---: |"]
  lines += [f"| {reason} | {count} |" for reason, count in sorted({**skipped, **curation}.items())]
  if dropped:
    lines += ["", f"## Exact duplicates (first {len(dropped)})", ""]
    for path, original, text in dropped:
      excerpt = " ".join(text.split())[:200]
      lines.append(f"- `{path}` repeats a document of `{original}`: {excerpt!r}")
  return "\n".join(lines) + "\n"


def _fingerprint(path: str) -> dict:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return {"path": path, "sha256": h.hexdigest()}


class _SplitWriter:
  """Appends documents to tokens.bin and keeps their offsets for index.npy."""

  def __init__(self, directory: str, dtype: str):
    os.makedirs(directory, exist_ok=True)
    self.directory, self.dtype = directory, dtype
    self.tokens = open(os.path.join(directory, "tokens.bin"), "wb")
    self.offsets = [0]

  def add(self, ids: list[int]) -> None:
    self.tokens.write(np.asarray(ids, self.dtype).tobytes())
    self.offsets.append(self.offsets[-1] + len(ids))

  def close(self) -> dict:
    self.tokens.close()
    np.save(os.path.join(self.directory, "index.npy"), np.asarray(self.offsets, np.int64))
    return {"documents": len(self.offsets) - 1, "tokens": self.offsets[-1]}


def load_split(directory: str, split: str) -> tuple[np.memmap, np.ndarray, dict]:
  """(tokens memmap, document offsets, manifest) of one split of a prepared dataset."""
  path = os.path.join(directory, "manifest.json")
  if not os.path.exists(path):
    partial = " (a prepare was interrupted: rerun it)" if os.path.isdir(directory.rstrip("/") + ".partial") else ""
    raise ConfigError(f"{directory}: no manifest.json, not a prepared dataset{partial}; make one with maxlm data "
                      "prepare")
  with open(path) as f:
    manifest = json.load(f)
  base = os.path.join(directory, split)
  index = np.load(os.path.join(base, "index.npy"))
  if index[-1] == 0:  # An empty split (e.g. --val-fraction 0): numpy cannot map an empty file.
    return np.zeros(0, manifest["token_dtype"]), index, manifest
  tokens = np.memmap(os.path.join(base, "tokens.bin"), dtype=manifest["token_dtype"], mode="r")
  return tokens, index, manifest
