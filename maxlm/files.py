"""Writing outputs so that a failure (a full disk, a crash, Ctrl-C) never leaves something that looks complete, and
never damages what was there before."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator

from maxlm import storage
from maxlm.errors import UserError


@contextlib.contextmanager
def partial_directory(final: str, last: tuple[str, ...] = ()) -> Iterator[str]:
  """Yields `<final>.partial` (emptied first: an interrupted earlier attempt) to write into; renames it to `final`
  when the block succeeds, and deletes it when the block fails (giving the space back).

  For a bucket `final` (`gs://`) the block writes into a local staging directory instead, uploaded when it
  succeeds with the top-level files in `last` (the marks of completeness readers check) uploaded after the rest."""
  if storage.is_remote(final):
    staging = storage.staging_dir(final, "output")
    try:
      yield staging
      storage.upload_tree(staging, final, last)
    finally:
      shutil.rmtree(staging, ignore_errors=True)
    return
  partial = final.rstrip("/") + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  try:
    yield partial
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  os.replace(partial, final)


def reserve(path: str, nbytes: int) -> None:
  """Allocates the blocks of an existing file up to `nbytes`, so that running out of space is an OSError now, not a
  SIGBUS later when the file is written through a memory map."""
  fd = os.open(path, os.O_RDWR)
  try:
    os.posix_fallocate(fd, 0, nbytes)
  finally:
    os.close(fd)


def read_json_object(path: str, fix: str) -> dict:
  """The JSON object in `path`; a file that is not one is a UserError ending with `fix` (what the user should do)."""
  try:
    data = json.loads(storage.read_text(path))
  except ValueError as e:
    raise UserError(f"{path} is not valid JSON ({' '.join(str(e).split())}): {fix}") from None
  if not isinstance(data, dict):
    raise UserError(f"{path} is not a JSON object: {fix}")
  return data
