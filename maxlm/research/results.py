"""A sweep's results: one row per run from its summary.json, written as `results.csv` and `results.md`.

Rows are sorted by the sweep's metric (lower is better; runs without it last, then by name) and the best run is
marked. When runs differ only in their seeds (`train.seed`, `data.seed`), `results.md` adds one row per group of
seeds with the mean and spread (sample standard deviation) of the metric and of the time to the target.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics

from maxlm.storage import write_atomically
from maxlm.training import summary

METRICS = (
  "final_eval_loss",
  "best_eval_loss",
  "final_loss",
  "best_loss",
  "time_to_target_s",
  "tokens_to_target",
  "step_to_target",
  "train_time_s",
  "wall_time_s",
)
COLUMNS = (
  "status",
  "steps",
  "final_loss",
  "final_eval_loss",
  "best_eval_loss",
  "tokens",
  "time_to_target_s",
  "tokens_to_target",
  "tokens_per_sec",
  "mfu",
  "train_time_s",
  "wall_time_s",
  "reason",
)
SEEDS = ("train.seed", "data.seed")


def collect(workdirs: dict[str, str], overrides: dict[str, dict]) -> list[dict]:
  """One row per run: its name, its overrides and its summary (status "pending" before it has one)."""
  rows = []
  for name, workdir in workdirs.items():
    s = summary.read(workdir) or {"status": "pending"}
    rows.append({"run": name, "overrides": overrides.get(name, {}), **{c: s.get(c) for c in COLUMNS}, **s})
  return rows


def sort(rows: list[dict], metric: str) -> list[dict]:
  def key(row):
    value = row.get(metric)
    missing = not isinstance(value, (int, float)) or not math.isfinite(value)
    return (missing, 0.0 if missing else value, row["run"])

  return sorted(rows, key=key)


def write(directory: str, rows: list[dict], metric: str) -> None:
  ordered = sort(rows, metric)
  keys = list(dict.fromkeys(k for r in ordered for k in r["overrides"]))
  best = ordered[0]["run"] if ordered and isinstance(ordered[0].get(metric), (int, float)) else None
  buffer = io.StringIO()
  table = csv.writer(buffer)
  table.writerow(["run", "best", *keys, *COLUMNS])
  for r in ordered:
    table.writerow(
      [r["run"], int(r["run"] == best), *[r["overrides"].get(k, "") for k in keys], *(_csv(r.get(c)) for c in COLUMNS)]
    )
  write_atomically(os.path.join(directory, "results.csv"), buffer.getvalue())
  write_atomically(os.path.join(directory, "results.md"), markdown(ordered, keys, metric, best))


def markdown(rows: list[dict], keys: list[str], metric: str, best: str | None) -> str:
  shown = [c for c in COLUMNS if c != "reason"]
  lines = [f"# Sweep results, sorted by {metric} (lower is better)", ""]
  lines += ["| run | " + " | ".join([*keys, *shown]) + " | reason |", "|" + " --- |" * (len(keys) + len(shown) + 2)]
  for r in rows:
    mark = "**best** " if r["run"] == best else ""
    cells = [
      *(str(r["overrides"].get(k, "")) for k in keys),
      *(format_cell(r.get(c)) for c in shown),
      r.get("reason") or "",
    ]
    lines.append(f"| {mark}{r['run']} | " + " | ".join(cells) + " |")
  groups = seed_groups(rows)
  if any(len(g) > 1 for g in groups.values()):
    varied = [k for k in keys if k not in SEEDS]
    figures = list(dict.fromkeys([metric, "time_to_target_s", "tokens_to_target"]))
    lines += ["", f"## Over seeds ({', '.join(SEEDS)}): mean ± standard deviation", ""]
    lines += ["| runs | " + " | ".join([*varied, "n", *figures, "reached target"]) + " |"]
    lines += ["|" + " --- |" * (len(varied) + len(figures) + 3)]
    for label, group in groups.items():
      cells = [str(dict(label).get(k, "")) for k in varied]
      spreads = [_spread([r[f] for r in group if isinstance(r.get(f), (int, float))]) for f in figures]
      reached = sum(isinstance(r.get("step_to_target"), int) for r in group)
      lines.append(
        f"| {', '.join(r['run'] for r in group)} | " + " | ".join([*cells, str(len(group)), *spreads]) + f" | "
        f"{reached}/{len(group)} |"
      )
  return "\n".join(lines) + "\n"


def seed_groups(rows: list[dict]) -> dict[tuple, list[dict]]:
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    label = tuple(sorted((k, json.dumps(v)) for k, v in r["overrides"].items() if k not in SEEDS))
    groups.setdefault(tuple((k, json.loads(v)) for k, v in label), []).append(r)
  return groups


def _spread(values: list[float]) -> str:
  if not values:
    return "—"
  if len(values) == 1:
    return format_cell(values[0])
  return f"{format_cell(statistics.mean(values))} ± {format_cell(statistics.stdev(values))}"


def format_cell(value) -> str:
  if value is None:
    return "—"
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def _csv(value) -> str:
  return "" if value is None else str(value)
