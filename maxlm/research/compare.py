"""`maxlm compare PATH...`: runs side by side, showing only the config keys that differ, with loss curves.

A PATH is a run's workdir (it has config.json) or a sweep directory (its runs/ are taken in order). The table has a
row per run: its label, the config keys whose values differ between the runs, and its summary.json figures. The
plot (`--plot=FILE.png`) has train loss (top) and eval loss (bottom) against steps, tokens and model FLOPs
(tokens = step × global_batch × seq_len, FLOPs = tokens × training FLOPs per token of the run's model).
"""

from __future__ import annotations

import json
import os

from maxlm import config
from maxlm.errors import UserError
from maxlm.model import flops
from maxlm.research import results
from maxlm.training import summary

SHOWN = ("status", "steps", "final_loss", "final_eval_loss", "best_eval_loss", "time_to_target_s", "tokens_per_sec")


def find_runs(paths: list[str]) -> dict[str, str]:
  """label -> workdir for every run the paths name, in order."""
  runs: dict[str, str] = {}
  for path in paths:
    path = os.path.normpath(path)
    if os.path.isfile(os.path.join(path, "config.json")):
      found = {os.path.basename(path): path}
    elif os.path.isdir(os.path.join(path, "runs")):
      found = {}
      for name in sorted(os.listdir(os.path.join(path, "runs"))):
        workdir = os.path.join(path, "runs", name)
        if os.path.isfile(os.path.join(workdir, "config.json")) or summary.read(workdir):
          found[f"{os.path.basename(path)}/{name}"] = workdir
    else:
      raise UserError(f"{path}: not a maxlm run (no config.json) or sweep directory (no runs/)")
    for label, workdir in found.items():
      while label in runs:
        label += "'"
      runs[label] = workdir
  if not runs:
    raise UserError(f"{' '.join(paths)}: no runs found (a sweep's runs appear once they start)")
  return runs


def table(runs: dict[str, str]) -> tuple[list[str], list[dict]]:
  """(the config keys that differ between the runs, one row per run: label, those keys' values, summary figures)."""
  configs = {label: _flat_config(w) for label, w in runs.items()}
  started = [c for c in configs.values() if c]  # A run that never started has no config to compare.
  keys = sorted({k for c in started for k in c})
  differing = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in started}) > 1]
  rows = []
  for label, workdir in runs.items():
    s = summary.read(workdir) or {"status": "running" if summary.records(workdir) else "pending"}
    rows.append({"run": label, "config": {k: configs[label].get(k) for k in differing}, **s})
  return differing, rows


def markdown(differing: list[str], rows: list[dict]) -> str:
  head = ["run", *differing, *SHOWN]
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for r in rows:
    cells = [
      r["run"],
      *(results.format_cell(r["config"].get(k)) for k in differing),
      *(results.format_cell(r.get(c)) for c in SHOWN),
    ]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def curves(workdir: str) -> dict[str, list[float]]:
  """step, tokens, flops, loss and (where evaluated) eval_step/eval_tokens/eval_flops/eval_loss of a run."""
  saved = config.read_saved(workdir)
  tokens_per_step = saved["train"]["global_batch"] * saved["data"]["seq_len"]
  cfg = config.load_workdir(workdir)
  flops_per_step = flops.training_flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step
  out = {k: [] for k in ("step", "tokens", "flops", "loss", "eval_step", "eval_tokens", "eval_flops", "eval_loss")}
  for r in summary.records(workdir):
    step = r["step"]
    if r.get("loss") is not None:
      out["step"].append(step)
      out["tokens"].append(step * tokens_per_step)
      out["flops"].append(step * flops_per_step)
      out["loss"].append(r["loss"])
    if r.get("eval_loss") is not None:
      out["eval_step"].append(step)
      out["eval_tokens"].append(step * tokens_per_step)
      out["eval_flops"].append(step * flops_per_step)
      out["eval_loss"].append(r["eval_loss"])
  return out


def plot(runs: dict[str, str], path: str):
  """Writes the PNG of the module docstring; returns the matplotlib Figure (2 x 3 axes, a line per run and curve)."""
  from matplotlib.figure import Figure  # No pyplot: no display backend, no global state.

  if not path.endswith(".png"):
    raise UserError(f"--plot={path}: name a .png file")
  fig = Figure(figsize=(15, 8), layout="constrained")
  axes = fig.subplots(2, 3)
  for label, workdir in runs.items():
    if not os.path.isfile(os.path.join(workdir, "config.json")):
      continue  # A run that never started has no curves.
    c = curves(workdir)
    for col, x in enumerate(("step", "tokens", "flops")):
      if c["loss"]:
        axes[0, col].plot(c[x], c["loss"], label=label)
      if c["eval_loss"]:
        axes[1, col].plot(c[f"eval_{x}"], c["eval_loss"], marker=".", label=label)
  for col, x in enumerate(("steps", "tokens", "model FLOPs")):
    for row, y in enumerate(("train loss", "eval loss")):
      axes[row, col].set_xlabel(x)
      axes[row, col].set_ylabel(y)
      axes[row, col].grid(alpha=0.3)
  axes[0, 0].legend(fontsize="small")
  fig.savefig(path, dpi=100)
  return fig


def _flat_config(workdir: str) -> dict:
  try:
    return config.flat_keys(config.read_saved(workdir))
  except UserError:
    return {}
