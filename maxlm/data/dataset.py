"""The prepared-dataset format that `maxlm data prepare` writes and training reads; NumPy only.

A prepared dataset is a directory:
  manifest.json            format version, tokenizer (path, hash, ids, vocab size), token dtype, per-split and
                           per-source counts, skipped inputs, curation counts (per dedup kind and quality rule)
  {train,val}/tokens.bin   every document's token ids followed by EOS, concatenated (little-endian uint16 or
                           uint32, the narrowest that holds the vocabulary)
  {train,val}/index.npy    int64 offsets: document i is tokens[index[i]:index[i+1]]; index[0] = 0

`load_split` checks that the files agree with each other (the token file holds exactly index[-1] tokens, the
offsets rise from 0), so a truncated or mixed-up dataset is refused in one line instead of training on garbage.
"""

from __future__ import annotations

import json
import os

import numpy as np

from maxlm.errors import UserError

SPLITS = ("train", "val")
FORMAT_VERSION = 3  # 2: exact dedup and its report. 3: near dedup, quality filters, per-rule counts.
TOKEN_DTYPES = ("uint16", "uint32")


def token_dtype(vocab_size: int) -> str:
  return "uint16" if vocab_size <= 2**16 else "uint32"


class SplitWriter:
  """Appends documents to tokens.bin and keeps their offsets for index.npy."""

  def __init__(self, directory: str, dtype: str):
    os.makedirs(directory, exist_ok=True)
    self.directory, self.dtype = directory, dtype
    self.tokens = open(os.path.join(directory, "tokens.bin"), "wb")
    self.offsets = [0]

  def add(self, ids: np.ndarray) -> None:
    self.tokens.write(np.asarray(ids, self.dtype).tobytes())
    self.offsets.append(self.offsets[-1] + len(ids))

  def close(self) -> dict:
    self.tokens.close()
    np.save(os.path.join(self.directory, "index.npy"), np.asarray(self.offsets, np.int64))
    return {"documents": len(self.offsets) - 1, "tokens": self.offsets[-1]}

  def abort(self) -> None:
    self.tokens.close()


def read_manifest(directory: str) -> dict:
  """The manifest of a prepared dataset, checked for the fields readers use."""
  path = os.path.join(directory, "manifest.json")
  if not os.path.isfile(path):
    partial = " (a prepare was interrupted: rerun it)" if os.path.isdir(directory.rstrip("/") + ".partial") else ""
    raise UserError(f"{directory}: no manifest.json, not a prepared dataset{partial}; make one with maxlm data prepare")
  try:
    with open(path, "rb") as f:
      manifest = json.load(f)
    tok = manifest["tokenizer"]
    ok = (
      manifest["token_dtype"] in TOKEN_DTYPES
      and isinstance(tok["vocab_size"], int)
      and isinstance(tok["sha256"], str)
      and isinstance(tok.get("path", ""), str)
    )
  except (ValueError, KeyError, TypeError):
    ok = False
  if not ok:
    raise UserError(
      f"{path}: not a valid dataset manifest (unreadable JSON or missing fields): prepare the dataset "
      "again with maxlm data prepare"
    )
  return manifest


def load_split(directory: str, split: str) -> tuple[np.ndarray, np.ndarray, dict]:
  """(tokens memmap, document offsets, manifest) of one split of a prepared dataset."""
  manifest = read_manifest(directory)
  base = os.path.join(directory, split)
  fix = "prepare the dataset again with maxlm data prepare"
  try:
    index = np.load(os.path.join(base, "index.npy"), allow_pickle=False)
  except (OSError, ValueError) as e:
    raise UserError(f"{base}/index.npy: unreadable ({' '.join(str(e).split())[:120]}): {fix}") from None
  if index.ndim != 1 or index.dtype.kind not in "iu" or len(index) == 0 or index[0] != 0 or np.any(np.diff(index) < 0):
    raise UserError(f"{base}/index.npy: not a list of rising document offsets from 0: {fix}")
  tokens_path = os.path.join(base, "tokens.bin")
  dtype = np.dtype(manifest["token_dtype"])
  size = os.path.getsize(tokens_path) if os.path.isfile(tokens_path) else None
  if size != int(index[-1]) * dtype.itemsize:
    found = "is missing" if size is None else f"holds {size // dtype.itemsize} tokens"
    raise UserError(f"{tokens_path} {found} but index.npy says {int(index[-1])} (truncated or mixed up): {fix}")
  if index[-1] == 0:  # An empty split (e.g. --val_fraction 0): numpy cannot map an empty file.
    return np.zeros(0, dtype), index, manifest
  return np.memmap(tokens_path, dtype=dtype, mode="r"), index, manifest
