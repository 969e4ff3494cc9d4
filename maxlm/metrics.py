"""Run outputs: `metrics.jsonl` (one JSON object per logged step), TensorBoard events, a progress line.

Only process 0 writes; other processes get a writer that does nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys

import tqdm
from tensorboardX import SummaryWriter

log = logging.getLogger("maxlm")


class MetricsWriter:

  def __init__(self, workdir: str, *, tensorboard: bool, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a") if enabled else None
    self._tb = SummaryWriter(os.path.join(workdir, "tb")) if enabled and tensorboard else None

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
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _jsonable(value):
  value = value.item() if hasattr(value, "item") else value
  if isinstance(value, float) and not math.isfinite(value):
    return None  # JSON has no NaN/inf; null marks a non-finite value.
  return value


class Progress:
  """A tqdm bar on a terminal; one log line per update otherwise (CI logs, files)."""

  def __init__(self, total: int, enabled: bool = True):
    self.enabled, self.total = enabled, total
    self.bar = tqdm.tqdm(total=total, unit="step", dynamic_ncols=True) if enabled and sys.stderr.isatty() else None
    self.done = 0

  def update(self, step: int, record: dict) -> None:
    if not self.enabled:
      return
    text = (f"loss {record['loss']:.4f}  {record['tokens_per_sec']:,.0f} tok/s  "
            f"MFU {100 * record['mfu']:.1f}%")
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
