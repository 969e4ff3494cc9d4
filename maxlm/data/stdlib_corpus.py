"""The demo corpus every Python install carries: the standard library's .py files (test folders left out), with a
4096-token tokenizer trained on them and a prepared dataset (exact and near dedup, code quality rules), built once
and cached. `make demo`, the speedrun config and the example sweeps train on it, offline.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import sysconfig

from maxlm import provenance
from maxlm.data import corpus, dataset, prepare, tokenizer

log = logging.getLogger("maxlm")

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
VOCAB_SIZE = 4096


def default_cache() -> str:
  """`<repo>/.cache/demo` when maxlm runs from a checkout, else `~/.cache/maxlm/demo` ($MAXLM_CACHE overrides)."""
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if not os.environ.get("MAXLM_CACHE") and os.path.isfile(os.path.join(repo, "pyproject.toml")):
    return os.path.join(repo, ".cache", "demo")
  return os.path.join(provenance.cache_root(), "demo")


def files(limit: int = 0) -> list[str]:
  """The standard library's .py files in a stable order (the first `limit` of them, if given)."""
  root = sysconfig.get_paths()["stdlib"]
  out = []
  for directory, subdirs, names in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if d not in SKIP_DIRS)
    out.extend(os.path.join(directory, n) for n in sorted(names) if n.endswith(".py"))
  return out[:limit] if limit else out


def prepared(
  cache: str | None = None,
  max_files: int = 0,
  val_fraction: float = 0.02,
  progress: bool = False,
  vocab_size: int = VOCAB_SIZE,
) -> tuple[str, str, dict]:
  """(prepared dataset directory, tokenizer path, the dataset's manifest), built on the first call and checked
  (not rebuilt) after."""
  vocab = "" if vocab_size == VOCAB_SIZE else f"-vocab{vocab_size}"
  name = (
    f"py{sys.version_info.major}.{sys.version_info.minor}-{max_files or 'all'}-val{val_fraction}"
    f"-v{dataset.FORMAT_VERSION}{vocab}"
  )
  directory = os.path.join(cache or default_cache(), name)
  os.makedirs(directory, exist_ok=True)
  inputs = files(max_files)
  tok_path = os.path.join(directory, "tokenizer.model")
  if not os.path.exists(tok_path):
    log.info("training a tokenizer on %d standard-library files", len(inputs))
    tokenizer.train(corpus.documents(inputs, collections.Counter()), vocab_size=vocab_size, output=tok_path)
  data_dir = os.path.join(directory, "stdlib")
  manifest = prepare.prepare(
    inputs,
    tok_path,
    data_dir,
    val_fraction=val_fraction,
    dedup="near",
    workers=prepare.default_workers(),
    progress=progress,
  )
  return data_dir, tok_path, manifest
