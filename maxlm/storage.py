"""Where runs and datasets live: a local directory or a bucket (`gs://bucket/dir`), behind one path type.

The path type is etils `epath.Path`, the one Orbax uses for its own directories, so a workdir and the checkpoints in
it resolve the same way; local paths are ordinary files, `gs://` goes through fsspec/gcsfs (the `gcs` extra:
`pip install 'maxlm[gcs]'`), and Orbax's array data through tensorstore's GCS driver. Chosen over plain fsspec
because Orbax already speaks it, and over tensorstore's kvstore because that has no directories, globs or text.

An object store is not a disk, and the callers of this module rely on three differences it takes care of:
  - objects appear whole when written, so "atomic" writes need no temporary file and rename;
  - there is no append: files that grow (metrics.jsonl, TensorBoard events) are buffered and rewritten;
  - there are no directories, only prefixes: `makedirs` does nothing there, and an empty "directory" does not exist;
  - reading is by request, not by memory map: datasets are copied once into a local cache (`local_copy`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import urllib.parse

from etils import epath

from maxlm.errors import UserError

REMOTE_SCHEMES = ("gs",)


def is_remote(path: str) -> bool:
  """True for an object-store URL (`gs://bucket/dir`); False for a local path."""
  scheme = urllib.parse.urlsplit(str(path)).scheme
  if "://" in str(path) and scheme not in REMOTE_SCHEMES:
    raise UserError(f"{path}: {scheme}:// paths are not supported; use a local path or gs://bucket/dir")
  return scheme in REMOTE_SCHEMES


def resolve(path: str) -> str:
  """`path` made absolute when local; a bucket URL as it is (its trailing slash dropped)."""
  if is_remote(path):
    _check_gcs_installed()
    return str(path).rstrip("/")
  return os.path.abspath(path)


def join(path: str, *parts: str) -> str:
  return str(epath.Path(path).joinpath(*parts)) if is_remote(path) else os.path.join(path, *parts)


def Path(path: str) -> epath.Path:  # noqa: N802  (a constructor)
  return epath.Path(resolve(path))


def exists(path: str) -> bool:
  return Path(path).exists()


def isdir(path: str) -> bool:
  return Path(path).is_dir()


def isfile(path: str) -> bool:
  return Path(path).is_file()


def listdir(path: str) -> list[str]:
  """Names in a directory; [] when it does not exist (on a bucket: no object under the prefix)."""
  try:
    return sorted(p.name for p in Path(path).iterdir())
  except (FileNotFoundError, NotADirectoryError):
    return []


def makedirs(path: str) -> None:
  """Creates a local directory (and its parents); nothing to do on a bucket, where prefixes need no creation."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def read_text(path: str, errors: str = "strict") -> str:
  with Path(path).open("rb") as f:
    return f.read().decode("utf-8", errors=errors)


def write_atomically(path: str, data: str | bytes) -> None:
  """Writes `path` so that a failed write leaves the old content whole: through a temporary file renamed over it
  on a disk; directly on a bucket, where an object replaces the old one only once it is complete."""
  raw = data.encode() if isinstance(data, str) else data
  if is_remote(path):
    Path(path).write_bytes(raw)
    return
  tmp = path + ".tmp"
  try:
    with open(tmp, "wb") as f:
      f.write(raw)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def move_tree(src: str, dst: str) -> None:
  """Moves a directory: a rename on a disk; on a bucket each object copied, then the source deleted (a bucket has
  no directory rename), so an interruption leaves the source whole."""
  if not is_remote(src) and not is_remote(dst):
    shutil.move(src, dst)
    return
  source = Path(src)
  for name in _files(source):
    source.joinpath(name).copy(Path(join(dst, name)), overwrite=True)  # streamed: shards may be gigabytes
  source.rmtree()


def _files(root: epath.Path) -> list[str]:
  """Relative names of every file under `root` (one listing per directory: buckets refuse recursive globs)."""
  found, pending = [], [("", root)]
  while pending:
    prefix, directory = pending.pop()
    try:
      entries = list(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
      continue
    for entry in entries:
      if entry.is_dir():
        pending.append((f"{prefix}{entry.name}/", entry))
      else:
        found.append(prefix + entry.name)
  return sorted(found)


def free_bytes(path: str) -> int | None:
  """Free space of the file system holding `path` (its nearest existing parent); None on a bucket (no limit to
  check)."""
  if is_remote(path):
    return None
  parent = os.path.abspath(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  return shutil.disk_usage(parent).free


def cache_dir() -> str:
  return os.environ.get("MAXLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "maxlm")


def local_copy(path: str, what: str) -> str:
  """A local file or directory with the content of `path`: `path` itself when local; else a copy under the cache
  (`$MAXLM_CACHE/remote/`), made once per source and content (listed names and sizes) and reused after, so that
  readers memory-map local files instead of fetching ranges per step. `what` names the content in messages."""
  if not is_remote(path):
    return path
  source = Path(path)
  single = source.is_file()
  root = source.parent if single else source
  files = [(name, root.joinpath(name).stat().length) for name in ([source.name] if single else _files(source))]
  if not files:
    raise UserError(f"{path}: no such {what} (nothing under that prefix); check the bucket and path")
  key = hashlib.sha256(json.dumps([resolve(path), files]).encode()).hexdigest()[:16]
  local = os.path.join(cache_dir(), "remote", f"{source.name}-{key}")
  found = os.path.join(local, source.name) if single else local
  if os.path.isfile(os.path.join(local, ".complete")):
    return found
  need, free = sum(size for _, size in files), free_bytes(local)
  if free is not None and free < need + (64 << 20):
    raise UserError(
      f"{path}: the {what} needs {need / 1e9:.2f} GB in the local cache {cache_dir()} and {free / 1e9:.2f} GB are "
      "free: point MAXLM_CACHE at a larger disk"
    )
  partial = f"{local}.partial-{os.getpid()}"  # Processes sharing a host may copy at once: each its own.
  shutil.rmtree(partial, ignore_errors=True)
  try:
    for name, size in files:
      out = os.path.join(partial, name)
      os.makedirs(os.path.dirname(out), exist_ok=True)
      with root.joinpath(name).open("rb") as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 16 << 20)
      if os.path.getsize(out) != size:
        raise UserError(f"{path}/{name} changed while it was copied; rerun when nothing writes to it")
    with open(os.path.join(partial, ".complete"), "w") as f:
      f.write(resolve(path) + "\n")
    os.replace(partial, local)
  except OSError:
    if not os.path.isfile(os.path.join(local, ".complete")):  # Else another process finished the same copy first.
      raise
  finally:
    shutil.rmtree(partial, ignore_errors=True)
  return found


def upload_tree(local: str, remote: str, last: tuple[str, ...] = ()) -> None:
  """Copies a local directory's files to `remote` (a bucket prefix), streamed in chunks. The top-level files named
  in `last` go after all others: readers take them as the mark of a complete directory (a dataset's
  manifest.json, a workdir's config.json), so an interrupted upload never looks complete."""
  names = sorted(os.path.relpath(os.path.join(root, n), local) for root, _, files in os.walk(local) for n in files)
  for name in sorted(names, key=lambda n: n in last):
    with open(os.path.join(local, name), "rb") as f, Path(join(remote, name)).open("wb") as out:
      shutil.copyfileobj(f, out, 16 << 20)


def staging_dir(remote: str, what: str) -> str:
  """A local directory (emptied) in which to build `what` (a name: "dataset", "metrics") of `remote` before it is
  uploaded."""
  key = hashlib.sha256(f"{resolve(remote)} {what}".encode()).hexdigest()[:16]
  local = os.path.join(cache_dir(), "staging", f"{epath.Path(remote).name}-{what}-{key}")
  shutil.rmtree(local, ignore_errors=True)
  os.makedirs(local)
  return local


def _check_gcs_installed() -> None:
  try:
    import gcsfs  # noqa: F401, PLC0415
  except ImportError:
    raise UserError("gs:// paths need the gcs extra: pip install 'maxlm[gcs]' (gcsfs)") from None
