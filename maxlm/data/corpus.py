"""Reading raw text: files, directories and globs of .txt/.md/.py, .jsonl(.gz) and .parquet, as documents (gs://
files and directories through a local copy).

Bad input is skipped and counted, never fatal: empty files, binary files (a NUL byte), invalid UTF-8,
JSONL lines that are not JSON or lack the text field, Parquet files without a string text column (the
whole file counts once), Parquet rows whose text is null, and files that cannot be read to their end (a
truncated or corrupt .gz or Parquet file, a read error): those are checked whole before their first document is
used, so a damaged file is skipped entirely, never half-used. A path that matches nothing is an error.
Parquet is read one batch of rows at a time (at most a row group), and only the text column, so memory
stays bounded whatever the file size.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterator, Sequence

from maxlm import storage
from maxlm.errors import UserError

TEXT_SUFFIXES = (".txt", ".md", ".py")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
PARQUET_BATCH_ROWS = 1024


def expand(paths: Sequence[str]) -> list[str]:
  """Input files in a stable order: each path as a file, a directory (recursive) or a glob."""
  files = []
  for path in paths:
    if storage.is_remote(path):  # A bucket's file or directory: read from a local copy (no globs on a bucket).
      path = storage.local_copy(path, "input")
    if os.path.isdir(path):
      found = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(SUFFIXES))
    elif os.path.isfile(path):
      if not path.endswith(SUFFIXES):
        raise UserError(f"--input {path}: unsupported file type; use {', '.join(SUFFIXES)}")
      found = [path]
    else:
      found = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p) and p.endswith(SUFFIXES))
    if not found:
      raise UserError(f"--input {path}: matches no {'/'.join(SUFFIXES)} file")
    files.extend(found)
  return list(dict.fromkeys(files))  # A file named twice is read once.


def documents(files: Sequence[str], skipped: collections.Counter, text_field: str = "text") -> Iterator[str]:
  """The documents of `files`; each skip is counted in `skipped` under its reason."""
  for path in files:
    if path.endswith(PARQUET_SUFFIXES):
      yield from _parquet(path, skipped, text_field)
      continue
    if path.endswith(".gz") and not _decompresses(path):
      skipped["unreadable .gz file (truncated or corrupt)"] += 1
      continue
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
    try:
      with open(path, "rb") as f:
        raw = f.read()
    except OSError:
      skipped["unreadable file"] += 1
      continue
    if b"\0" in raw:
      skipped["binary file"] += 1
    elif not raw.strip():
      skipped["empty document"] += 1
    else:
      try:
        yield raw.decode("utf-8")
      except UnicodeDecodeError:
        skipped["invalid UTF-8"] += 1


def _decompresses(path: str) -> bool:
  """Whether a .gz file decompresses to its end without an error; read in blocks, nothing kept."""
  try:
    with gzip.open(path, "rb") as f:
      while f.read(1 << 20):
        pass
  except (OSError, EOFError, zlib.error):
    return False
  return True


def _parquet(path: str, skipped: collections.Counter, text_field: str) -> Iterator[str]:
  try:
    import pyarrow as pa
    import pyarrow.parquet as pq
  except ImportError:
    raise UserError(f"--input {path}: reading Parquet needs pyarrow; pip install 'pyarrow>=16'") from None
  try:
    parquet = pq.ParquetFile(path)
  except (pa.ArrowException, OSError):
    skipped["unreadable parquet file"] += 1
    return
  field = parquet.schema_arrow.field(text_field) if text_field in parquet.schema_arrow.names else None
  if field is None or not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
    skipped[f"parquet file without a string '{text_field}' column"] += 1
    return
  try:  # Every row group decodes: a file corrupt half-way is skipped whole (a second, streaming read follows).
    for _ in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
      pass
  except (pa.ArrowException, OSError):
    skipped["unreadable parquet file"] += 1
    return
  for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
    for text in batch.column(0).to_pylist():
      if text is None:
        skipped[f"parquet row with a null '{text_field}'"] += 1
      elif text.strip():
        yield text
      else:
        skipped["empty document"] += 1
