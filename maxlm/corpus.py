"""Reading raw text: files, directories and globs of .txt/.md/.py and .jsonl(.gz), as documents.

Bad input is skipped and counted, never fatal: empty files, binary files (a NUL byte), invalid UTF-8,
JSONL lines that are not JSON or lack the text field. A path that matches nothing is an error.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
from collections.abc import Iterator, Sequence

from maxlm.config import ConfigError

TEXT_SUFFIXES = (".txt", ".md", ".py")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


def expand(paths: Sequence[str]) -> list[str]:
  """Input files in a stable order: each path as a file, a directory (recursive) or a glob."""
  files = []
  for path in paths:
    if os.path.isdir(path):
      found = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(TEXT_SUFFIXES +
                                                                                                  JSONL_SUFFIXES))
    elif os.path.isfile(path):
      if not path.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES):
        raise ConfigError(f"--input {path}: unsupported file type; use {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}")
      found = [path]
    else:
      found = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p) and p.endswith(
          TEXT_SUFFIXES + JSONL_SUFFIXES))
    if not found:
      raise ConfigError(f"--input {path}: matches no {'/'.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} file")
    files.extend(found)
  return list(dict.fromkeys(files))  # A file named twice is read once.


def documents(files: Sequence[str], skipped: collections.Counter, text_field: str = "text") -> Iterator[str]:
  """The documents of `files`; each skip is counted in `skipped` under its reason."""
  for path in files:
    if path.endswith(JSONL_SUFFIXES):
      opener = gzip.open if path.endswith(".gz") else open
      with opener(path, "rb") as f:
        for line in f:
          if not line.strip():
            continue
          try:
            record = json.loads(line)
          except ValueError:
            skipped["jsonl line is not JSON"] += 1
            continue
          text = record.get(text_field) if isinstance(record, dict) else None
          if not isinstance(text, str):
            skipped[f"jsonl line without a string '{text_field}' field"] += 1
          elif text.strip():
            yield text
          else:
            skipped["empty document"] += 1
      continue
    with open(path, "rb") as f:
      raw = f.read()
    if b"\0" in raw:
      skipped["binary file"] += 1
    elif not raw.strip():
      skipped["empty document"] += 1
    else:
      try:
        yield raw.decode("utf-8")
      except UnicodeDecodeError:
        skipped["invalid UTF-8"] += 1
