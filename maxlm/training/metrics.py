"""Run outputs: `metrics.jsonl` (one JSON object per logged step), TensorBoard events, a progress line.

Only process 0 writes; other processes get a writer that does nothing. A bucket workdir (`gs://`) has no append:
the files are written in a local mirror (under `$MAXLM_CACHE/staging/`) and uploaded whole by `sync`, which the
loop calls at every checkpoint (so a resumed run finds the records up to its checkpoint), every `upload_every_s`
seconds, and at `close`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time

import tqdm

from maxlm import storage

log = logging.getLogger("maxlm")


class MetricsWriter:
  def __init__(
    self, workdir: str, *, tensorboard: bool, enabled: bool = True, after_step: int = 0, upload_every_s: float = 30
  ):
    """`after_step`: a resumed run's starting step; records of later steps (from the lost part of the
    interrupted run) are dropped from metrics.jsonl, since this run writes them again."""
    self.enabled, self.workdir, self.upload_every_s = enabled, workdir, upload_every_s
    self.remote = enabled and storage.is_remote(workdir)
    self.local = storage.staging_dir(workdir, "metrics") if self.remote else workdir
    path = os.path.join(self.local, "metrics.jsonl")
    if self.remote and storage.isfile(storage.join(workdir, "metrics.jsonl")):
      with open(path, "wb") as f:
        f.write(storage.Path(storage.join(workdir, "metrics.jsonl")).read_bytes())
    if enabled and os.path.exists(path):
      _drop_records_after(path, after_step)
    self._jsonl = open(path, "a") if enabled else None
    self._tb = None
    if enabled and tensorboard:
      from tensorboardX import SummaryWriter  # noqa: PLC0415  Here: it imports torch when installed (seconds).

      self._tb = SummaryWriter(os.path.join(self.local, "tb"))
    self._synced = time.monotonic()
    if self.remote:
      self.sync()  # The dropped records are dropped there too.

  def sync(self) -> None:
    """Uploads metrics.jsonl and the TensorBoard events of a bucket workdir (nothing to do for a local one)."""
    if not self.remote:
      return
    storage.upload_tree(self.local, self.workdir)
    self._synced = time.monotonic()

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    clean = {k: _jsonable(v) for k, v in record.items()}
    self._jsonl.write(json.dumps(clean) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for key, value in clean.items():
        if key != "step" and isinstance(value, (int, float)):
          self._tb.add_scalar(key, value, clean["step"])
        elif isinstance(value, list):  # per layer: one curve each
          for i, v in enumerate(value):
            if isinstance(v, (int, float)):
              self._tb.add_scalar(f"{key}/{i}", v, clean["step"])
      self._tb.flush()
    if self.remote and time.monotonic() - self._synced > self.upload_every_s:
      self.sync()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
    if self.remote:
      self.sync()
      shutil.rmtree(self.local, ignore_errors=True)


def _drop_records_after(path: str, step: int) -> None:
  with open(path, errors="replace") as f:
    lines = f.readlines()
  kept = [line for line in lines if (s := _step_of(line)) is not None and s <= step]
  if len(kept) != len(lines):
    unreadable = sum(_step_of(line) is None for line in lines)
    if unreadable:  # A line cut short by a hard kill or a full disk, or damaged.
      log.warning("%s: dropped %d unreadable line(s)", path, unreadable)
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)


def _step_of(line: str) -> int | None:
  """The step of a complete metrics.jsonl record, or None for a line that is not one."""
  if not line.endswith("\n"):
    return None
  try:
    step = json.loads(line).get("step")
  except (ValueError, AttributeError):
    return None
  return step if isinstance(step, int) else None


def _jsonable(value):
  if isinstance(value, list):
    return [_jsonable(v) for v in value]
  value = value.item() if hasattr(value, "item") else value
  if isinstance(value, float) and not math.isfinite(value):
    return None  # JSON has no NaN/inf; null marks a non-finite value.
  return value


class Progress:
  """A tqdm bar on a terminal; one log line per update otherwise (CI logs, files)."""

  def __init__(self, total: int, enabled: bool = True, initial: int = 0):
    self.enabled, self.total, self.done = enabled, total, initial
    tty = enabled and sys.stderr.isatty()
    self.bar = tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True) if tty else None

  def update(self, step: int, record: dict) -> None:
    if not self.enabled:
      return
    text = f"loss {record['loss']:.4f}  {record['tokens_per_sec']:,.0f} tok/s  MFU {100 * record['mfu']:.1f}%"
    if "eval_loss" in record:
      text += f"  eval {record['eval_loss']:.4f}"
    if self.bar is not None:
      self.bar.update(step - self.done)
      self.bar.set_postfix_str(text, refresh=True)
    else:
      log.info("step %d/%d  %s", step, self.total, text)
    self.done = step

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
