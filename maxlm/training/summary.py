"""`<workdir>/summary.json`: what a run ended as, in one machine-readable file that sweeps, `maxlm compare` and
scripts read instead of logs. Written by every run when it ends (finished, stopped, diverged or failed), and by a
sweep for a run that could not start or was pruned.

Figures come from the run's whole `metrics.jsonl` (all resumed segments), so a resumed run's summary covers the
entire run:
  train_time_s      Σ over logged windows of step_time_s × steps in the window: time spent in train steps,
                    without compilation, evaluation or start-up
  wall_time_s       the summed wall time of every segment of the run (start-up and compilation included)
  tokens            steps × global_batch × seq_len;  model_flops: steps × training FLOPs per step (maxlm/model/flops.py)
  tokens_per_sec    tokens trained in this run's steps ÷ train_time_s;  mfu: model FLOP/s per device ÷ device peak
  time_to_target_s  train_time_s up to the first eval at or below train.target_eval_loss (likewise tokens_ and
                    step_to_target); null when not reached or no target is set
"""

from __future__ import annotations

import hashlib
import json
import math
import time

from maxlm import provenance, storage

STATUSES = ("finished", "stopped", "diverged", "failed", "pruned")
FILE = "summary.json"


def read(workdir: str) -> dict | None:
  try:
    data = json.loads(storage.read_text(storage.join(workdir, FILE)))
  except (OSError, ValueError):
    return None
  return data if isinstance(data, dict) and data.get("status") in STATUSES else None


def records(workdir: str) -> list[dict]:
  """The step records of `metrics.jsonl` (guard events and unreadable lines left out), in order."""
  out = []
  try:
    lines = storage.read_text(storage.join(workdir, "metrics.jsonl"), errors="replace").splitlines()
  except OSError:
    return out
  for line in lines:
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if isinstance(record, dict) and isinstance(record.get("step"), int) and "loss" in record:
      out.append(record)
  return out


def target_step(history: list[dict], target: float) -> int | None:
  """The first step whose eval loss is at or below `target` (> 0), or None."""
  if target <= 0:
    return None
  return next((r["step"] for r in history if r.get("eval_loss") is not None and r["eval_loss"] <= target), None)


def config_hash(cfg: dict) -> str:
  return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def summarize(
  history: list[dict],
  *,
  status: str,
  tokens_per_step: int,
  flops_per_step: float,
  num_devices: int,
  peak_tflops: float | None,
  target: float = 0.0,
) -> dict:
  """The figures of the module docstring from a run's step records (pure: tests feed it records directly)."""
  if status not in STATUSES:
    raise ValueError(f"status {status!r} is not one of {STATUSES}")
  steps = history[-1]["step"] if history else 0
  train_time, previous, to_target = 0.0, 0, None
  reached = target_step(history, target)
  for r in history:
    train_time += (r.get("step_time_s") or 0.0) * (r["step"] - previous)
    previous = r["step"]
    if reached is not None and r["step"] == reached:
      to_target = train_time
  losses = [r["loss"] for r in history if r.get("loss") is not None]
  evals = [r["eval_loss"] for r in history if r.get("eval_loss") is not None]
  tokens = steps * tokens_per_step
  flops = steps * flops_per_step
  mfu = None
  if train_time > 0 and peak_tflops:
    mfu = flops / train_time / num_devices / (peak_tflops * 1e12)
  return {
    "status": status,
    "steps": steps,
    "tokens": tokens,
    "model_flops": flops,
    "final_loss": losses[-1] if losses else None,
    "best_loss": min(losses) if losses else None,
    "final_eval_loss": evals[-1] if evals else None,
    "best_eval_loss": min(evals) if evals else None,
    "train_time_s": train_time,
    "tokens_per_sec": tokens / train_time if train_time > 0 else None,
    "mfu": mfu,
    "target_eval_loss": target or None,
    "step_to_target": reached,
    "tokens_to_target": None if reached is None else reached * tokens_per_step,
    "time_to_target_s": to_target,
  }


def write(workdir: str, cfg: dict, figures: dict, *, wall_time_s: float, reason: str | None = None, **extra) -> dict:
  """Writes summary.json: `figures` (see `summarize`), the wall time (added to that of earlier segments of a resumed
  run), why it ended, the config hash and where it ran."""
  earlier = read(workdir)
  if earlier and earlier.get("status") == "stopped":
    wall_time_s += earlier.get("wall_time_s") or 0.0
  data = {
    **figures,
    "reason": reason,
    "wall_time_s": wall_time_s,
    "config_hash": config_hash(cfg),
    "maxlm": provenance.version(),
    "host": provenance.host_description(),
    "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    **extra,
  }
  data = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in data.items()}
  storage.write_atomically(storage.join(workdir, FILE), json.dumps(data, indent=2) + "\n")
  return data
