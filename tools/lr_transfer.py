"""The learning-rate transfer table and plot of a sweep over parametrization x width x learning rate
(configs/sweeps/mup_transfer.py): the best learning rate per width, and final eval loss against learning rate.
Several sweep directories (the same sweep with other seeds) are averaged: the mean final eval loss per point.

  for s in 0 1 2; do maxlm sweep --sweep=configs/sweeps/mup_transfer.py --workdir=/tmp/mup_s$s --parallel=2 \
      --config.train.seed=$s --config.data.seed=$s; done
  python tools/lr_transfer.py /tmp/mup_s0 /tmp/mup_s1 /tmp/mup_s2 --plot=/tmp/mup_transfer.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from maxlm.training import summary  # noqa: E402


def collect(directories: list[str]) -> tuple[dict, dict]:
  """({parametrization: {width: {lr: mean final eval loss}}}, the same with the list of losses) over the finished
  runs of the sweep directories."""
  losses: dict = {}
  for directory in directories:
    for name in sorted(os.listdir(os.path.join(directory, "runs"))):
      workdir = os.path.join(directory, "runs", name)
      s = summary.read(workdir)
      if not s or s["status"] != "finished" or s.get("final_eval_loss") is None:
        continue
      with open(os.path.join(workdir, "overrides.json")) as f:
        o = json.load(f)
      by_width = losses.setdefault(o["model.parametrization"], {}).setdefault(o["model.d_model"], {})
      by_width.setdefault(o["optim.lr"], []).append(s["final_eval_loss"])
  means = {
    p: {w: {lr: sum(v) / len(v) for lr, v in by_lr.items()} for w, by_lr in bw.items()} for p, bw in losses.items()
  }
  return means, losses


def table(data: dict) -> str:
  widths = sorted({w for p in data.values() for w in p})
  lines = ["| parametrization | " + " | ".join(f"width {w}: best lr (loss)" for w in widths) + " | best lr moves |"]
  lines.append("|" + " --- |" * (len(widths) + 2))
  for name, by_width in data.items():
    best = {w: min(by_width[w], key=by_width[w].get) for w in widths if by_width.get(w)}
    lrs = sorted({lr for w in by_width.values() for lr in w})
    steps = [lrs.index(best[w]) for w in widths if w in best]
    cells = [f"{best[w]:g} ({by_width[w][best[w]]:.3f})" if w in best else "—" for w in widths]
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {max(steps) - min(steps)} grid step(s) |")
  return "\n".join(lines) + "\n"


def plot(data: dict, path: str, every: dict | None = None) -> None:
  from matplotlib.figure import Figure

  fig = Figure(figsize=(11, 4.2), layout="constrained")
  axes = fig.subplots(1, len(data), sharey=True, squeeze=False)[0]
  for ax, (name, by_width) in zip(axes, sorted(data.items(), reverse=True)):
    for width, losses in sorted(by_width.items()):
      lrs = sorted(losses)
      line = ax.plot(lrs, [losses[lr] for lr in lrs], marker="o", label=f"width {width}")[0]
      if every is not None:  # each seed's loss, faint
        for lr in lrs:
          ax.plot([lr] * len(every[name][width][lr]), every[name][width][lr], ".", color=line.get_color(), alpha=0.35)
      best = min(losses, key=losses.get)
      ax.plot(best, losses[best], "k*", markersize=12)
    ax.set(xscale="log", xlabel="learning rate", title=name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  axes[0].set_ylabel("final eval loss, mean over seeds (★ best per width)")
  fig.savefig(path, dpi=100)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("directories", nargs="+", help="sweep directories of the same sweep (other seeds)")
  parser.add_argument("--plot")
  args = parser.parse_args()
  data, every = collect(args.directories)
  seeds = sorted({len(v) for bw in every.values() for by_lr in bw.values() for v in by_lr.values()})
  print(table(data), end="")
  print(f"\nmean final eval loss over {'-'.join(map(str, sorted(set(seeds))))} run(s) per point")
  if args.plot:
    plot(data, args.plot, every)


if __name__ == "__main__":
  main()
