"""`maxlm ladder` and `maxlm fit`: a scaling ladder of ordinary runs, the scaling laws fitted to it, and a held-out
prediction checked against a run trained after it was made.

A ladder file is Python, like a sweep file: `get_config()` (the base config: data, optimizer, ...) and
`get_ladder()` returning a `Ladder`: the model sizes (≥ 6; config overrides, e.g. from `depth_width`), the token
budgets per size (`tokens_per_param`: D = k·N) or the FLOP budgets (`flops`, IsoFLOP: D = C / (6·N)), optional
rules for the learning rate and global batch by size, and the held-out run to `predict` (a bigger size).

Each rung is an ordinary maxlm run in `DIR/runs/<size>_<budget>/`. With the WSD schedule (`optim.schedule="wsd"`),
one run per size serves every budget: it trains at the stable learning rate and stops where each smaller budget's
decay starts (`--stop_at_step`); that checkpoint is copied into the smaller budget's workdir, which resumes from it
and decays over its last `optim.decay_fraction` of steps. Training is deterministic and the schedule is the same
up to the branch point, so each branch is the run that budget would have been alone, for the cost of its decay.

N is the count of weights in matmuls (`flops.matmul_params`), D the tokens trained (summary.json `tokens`), L the
final eval loss; the fits are in maxlm/research/fit.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable

import ml_collections
import numpy as np

from configs import base
from maxlm import config
from maxlm.errors import UserError
from maxlm.model import flops
from maxlm.research import fit, sweep
from maxlm.storage import write_atomically
from maxlm.training import summary

log = logging.getLogger("maxlm")

MIN_SIZES = 6


@dataclasses.dataclass
class Ladder:
  sizes: list[dict]  # config overrides of each model size
  tokens_per_param: list[float] = dataclasses.field(default_factory=list)  # D = k·N for each k
  flops: list[float] = dataclasses.field(default_factory=list)  # IsoFLOP budgets C: D = C / (6·N)
  lr: Callable[[float], float] | None = None  # N -> optim.lr (default: the base config's)
  batch: Callable[[float], int] | None = None  # N -> train.global_batch
  predict: dict | None = None  # {"size": overrides, "tokens_per_param": k} of the held-out run


def depth_width(
  shapes: list[tuple[int, int]], head_dim: int = 32, mlp_ratio: float = 4.0, kv_group: int = 1
) -> list[dict]:
  """Sizes from (num_layers, d_model) pairs: heads of `head_dim`, `kv_group` query heads per kv head, an MLP of
  `mlp_ratio`·d_model (rounded to a multiple of 32)."""
  out = []
  for layers, width in shapes:
    heads = width // head_dim
    out.append(
      {
        "model.num_layers": layers,
        "model.d_model": width,
        "model.num_heads": heads,
        "model.num_kv_heads": max(1, heads // kv_group),
        "model.mlp_dim": int(round(mlp_ratio * width / 32)) * 32,
      }
    )
  return out


def size_label(size: dict) -> str:
  return f"L{size.get('model.num_layers', '?')}-D{size.get('model.d_model', '?')}"


@dataclasses.dataclass
class Rung:
  name: str
  size: str  # size label: runs of one size share a trunk under WSD branching
  overrides: dict
  N: float  # matmul weights
  steps: int
  budget: str  # "tpp=20" or "C=1e+13"
  flops_budget: float | None = None


class LadderRuns(sweep.Sweep):
  """The rungs of a ladder file as a sweep (the same runner, results, resumption)."""

  def __init__(self, path: str, directory: str, base_overrides: dict | None = None):
    self.path, self.directory = os.path.abspath(path), os.path.abspath(directory)
    self.base_overrides = dict(base_overrides or {})
    self.base_cfg, self.ladder = load(path)
    self.metric = "final_eval_loss"
    resolved = _resolved(self.base_cfg, self.base_overrides)
    self.rungs = expand(resolved, self.ladder)
    self.names = [r.name for r in self.rungs]
    self.overrides = {r.name: r.overrides for r in self.rungs}
    self.workdirs = {n: os.path.join(self.directory, "runs", n) for n in self.names}
    self.branching = resolved.optim.schedule == "wsd"
    self.resolved = resolved
    if self.branching:
      if resolved.checkpoint.every_steps == 0:
        raise UserError("WSD branching continues runs from checkpoints: set checkpoint.every_steps > 0 in the ladder")
      short = min(self.rungs, key=lambda r: r.steps)
      if _branch_point(short.steps, resolved) <= resolved.optim.warmup_steps:
        raise UserError(
          f"rung {short.name} ({short.steps} steps) would branch off at step {_branch_point(short.steps, resolved)}, "
          f"inside the warmup (optim.warmup_steps={resolved.optim.warmup_steps}): lower the warmup or raise the budgets"
        )

  def describe(self) -> str:
    lines = [
      f"{len(self.rungs)} rungs of {self.path} into {self.directory}/runs/"
      + (" (WSD: one trunk per size, decay branches for the smaller budgets):" if self.branching else ":")
    ]
    for r in self.rungs:
      lines.append(f"  {r.name}: N={r.N / 1e6:.3g}M, {r.steps} steps, lr {r.overrides.get('optim.lr', 'base')}")
    return "\n".join(lines)

  def add(self, rung: Rung) -> None:
    self.rungs.append(rung)
    self.names.append(rung.name)
    self.overrides[rung.name] = rung.overrides
    self.workdirs[rung.name] = os.path.join(self.directory, "runs", rung.name)


def load(path: str) -> tuple[ml_collections.ConfigDict, Ladder]:
  if not os.path.isfile(path):
    raise UserError(f"--ladder={path}: no such file; pass a ladder file, e.g. --ladder=configs/ladders/tiny.py")
  module = config.load_python(path, "--ladder")
  if not all(callable(getattr(module, f, None)) for f in ("get_config", "get_ladder")):
    raise UserError(f"--ladder={path}: a ladder file defines get_config() and get_ladder()")
  try:
    cfg, ladder = module.get_config(), module.get_ladder()
  except Exception as e:  # noqa: BLE001  The file's own error is the user's to fix.
    raise UserError(f"--ladder={path}: get_config() or get_ladder() failed: {' '.join(str(e).split())}") from None
  if not isinstance(cfg, ml_collections.ConfigDict) or not isinstance(ladder, Ladder):
    raise UserError(f"--ladder={path}: get_config() must return a ConfigDict and get_ladder() a ladder.Ladder")
  if len(ladder.sizes) < MIN_SIZES:
    raise UserError(f"--ladder={path}: {len(ladder.sizes)} sizes; a scaling fit needs at least {MIN_SIZES}")
  if bool(ladder.tokens_per_param) == bool(ladder.flops):
    raise UserError(f"--ladder={path}: give token budgets (tokens_per_param) or FLOP budgets (flops), one of the two")
  schema = config.flat_keys(base.get_config())
  for i, size in enumerate([*ladder.sizes, *([ladder.predict["size"]] if ladder.predict else [])]):
    for key, value in size.items():
      sweep.check_override(key, value, schema, where=f"--ladder={path}: size {i}")
  return cfg, ladder


def _resolved(cfg: ml_collections.ConfigDict, base_overrides: dict) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict(cfg.to_dict())
  for key, value in base_overrides.items():
    *groups, name = key.split(".")
    node = out
    for g in groups:
      node = node[g]
    node[name] = type(node[name])(value) if not isinstance(node[name], bool) else value in ("true", "True", "1")
  return out


def _model(cfg: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  model = ml_collections.ConfigDict(cfg.model.to_dict())
  for key, value in overrides.items():
    if key.startswith("model."):
      model[key.split(".", 1)[1]] = value
  return model


def rung(cfg: ml_collections.ConfigDict, ladder: Ladder, size: dict, tokens_per_param=None, flops_budget=None) -> Rung:
  """One run of the ladder: `size` trained on tokens_per_param·N tokens, or on flops_budget / (6·N)."""
  N = float(flops.matmul_params(_model(cfg, size)))
  batch = ladder.batch(N) if ladder.batch else cfg.train.global_batch
  tokens = tokens_per_param * N if tokens_per_param is not None else flops_budget / (6 * N)
  steps = max(1, math.ceil(tokens / (batch * cfg.data.seq_len)))
  overrides = {**size, "train.steps": steps, "train.global_batch": batch}
  if ladder.lr:
    overrides["optim.lr"] = float(ladder.lr(N))
  budget = f"tpp={tokens_per_param:g}" if tokens_per_param is not None else f"C={flops_budget:.2g}"
  name = f"{size_label(size)}_{budget}"
  return Rung(name, size_label(size), overrides, N, steps, budget, flops_budget)


def expand(cfg: ml_collections.ConfigDict, ladder: Ladder) -> list[Rung]:
  rungs = []
  for size in ladder.sizes:
    for k in ladder.tokens_per_param:
      rungs.append(rung(cfg, ladder, size, tokens_per_param=k))
    for C in ladder.flops:
      rungs.append(rung(cfg, ladder, size, flops_budget=C))
  names = [r.name for r in rungs]
  if len(set(names)) != len(names):
    raise UserError("two ladder sizes have the same num_layers and d_model: make the sizes distinct")
  return rungs


def _branch_point(steps: int, cfg: ml_collections.ConfigDict) -> int:
  """Where WSD's decay of a `steps`-step run starts (maxlm/training/optim.py `_wsd`)."""
  return steps - int(round(cfg.optim.decay_fraction * steps))


def _seed_branch(trunk: str, branch: str, step: int) -> None:
  """The trunk's checkpoint at `step`, and its metrics up to it, become the start of the branch's workdir."""
  target = os.path.join(branch, "checkpoints", str(step))
  if os.path.isdir(target):
    return
  os.makedirs(os.path.dirname(target), exist_ok=True)
  shutil.copytree(os.path.join(trunk, "checkpoints", str(step)), target + ".copy")
  os.replace(target + ".copy", target)
  kept = [json.dumps(r) + "\n" for r in summary.records(trunk) if r["step"] <= step]
  write_atomically(os.path.join(branch, "metrics.jsonl"), "".join(kept))


def execute(runs: LadderRuns, parallel: int = 1) -> None:
  """Trains every rung (resuming what exists); with WSD, one trunk per size and a decay branch per smaller budget."""
  runs.check_directory()
  runner = sweep.Runner(runs, sweep._Slots(parallel))
  ended = set(sweep.ENDED) | {"failed"}
  if not runs.branching:
    runner.run([(n, None) for n in runs.names if runs.status(n) not in ended])
    return
  by_size: dict[str, list[Rung]] = {}
  for r in runs.rungs:
    by_size.setdefault(r.size, []).append(r)
  plans = []  # per size: (trunk, [(branch point, branch rung)] in step order)
  for group in by_size.values():
    group = sorted(group, key=lambda r: r.steps)
    trunk = group[-1]
    plans.append((trunk, [(_branch_point(r.steps, runs.resolved), r) for r in group[:-1]]))
  stages = max(len(branches) for _, branches in plans) + 1
  ready: list[tuple[str, int | None]] = []  # branches seeded in the previous stage
  for stage in range(stages):
    jobs = list(ready)
    for trunk, branches in plans:
      if runs.status(trunk.name) in ended:
        continue
      stop = branches[stage][0] if stage < len(branches) else None
      if stop is None or _last_step(runs.workdirs[trunk.name]) < stop:
        jobs.append((trunk.name, stop))
    runner.run(jobs)
    if runner.stopping:
      return
    ready = []
    for trunk, branches in plans:
      if stage < len(branches):
        point, branch = branches[stage]
        if runs.status(branch.name) in ended:
          continue
        if _last_step(runs.workdirs[trunk.name]) >= point and os.path.isdir(
          os.path.join(runs.workdirs[trunk.name], "checkpoints", str(point))
        ):
          _seed_branch(runs.workdirs[trunk.name], runs.workdirs[branch.name], point)
          ready.append((branch.name, None))
        else:
          log.warning("run %s: its trunk %s did not reach step %d; it is skipped", branch.name, trunk.name, point)
  runner.run(ready)


def _last_step(workdir: str) -> int:
  history = summary.records(workdir)
  return history[-1]["step"] if history else 0


# Fitting ---------------------------------------------------------------------------------------------------------


def points(directory: str, exclude: tuple[str, ...] = ("predict",)) -> list[dict]:
  """(run, N, D, C, L, flops_budget) of every finished run of a ladder directory (the held-out run left out)."""
  out = []
  runs_dir = os.path.join(directory, "runs")
  if not os.path.isdir(runs_dir):
    raise UserError(f"{directory}: not a ladder directory (no runs/); run maxlm ladder first")
  for name in sorted(os.listdir(runs_dir)):
    workdir = os.path.join(runs_dir, name)
    s = summary.read(workdir)
    if name.startswith(exclude) or not s or s["status"] != "finished" or s.get("final_eval_loss") is None:
      continue
    cfg = config.load_workdir(workdir)
    budget = name.rsplit("_C=", 1)[1] if "_C=" in name else None
    out.append(
      {
        "run": name,
        "N": float(flops.matmul_params(cfg.model)),
        "D": float(s["tokens"]),
        "C": float(s["model_flops"]),
        "L": float(s["final_eval_loss"]),
        "flops_budget": float(budget) if budget else None,
      }
    )
  return out


def fit_directory(
  directory: str, budget: float | None = None, bootstrap_samples: int = 200, plot: str | None = None
) -> dict:
  """Fits the laws to a ladder directory's finished runs; writes DIR/fit.json (and the plots); returns it."""
  data = points(directory)
  if len(data) < 5:
    raise UserError(f"{directory}: {len(data)} finished runs; the fit needs at least 5 (let maxlm ladder finish)")
  N, D, L = (np.array([p[k] for p in data]) for k in ("N", "D", "L"))
  law, objective = fit.fit_law(N, D, L)
  resamples = fit.bootstrap(N, D, L, law, samples=bootstrap_samples)
  intervals = {k: fit.interval([getattr(r, k) for r in resamples]) for k in ("E", "A", "B", "alpha", "beta")}
  predicted = law.loss(N, D)
  result = {
    "approach3": {
      **law.as_dict(),
      "ci95": intervals,
      "huber_delta": fit.HUBER_DELTA,
      "objective": objective,
      "runs": len(data),
      "rmse_log": float(np.sqrt(np.mean(np.log(predicted / L) ** 2))),
    },
    "points": [{**p, "predicted": float(q), "error": float(q / p["L"] - 1)} for p, q in zip(data, predicted)],
  }
  budgets: dict[float, list] = {}
  for p in data:
    if p["flops_budget"]:
      budgets.setdefault(p["flops_budget"], []).append((p["N"], p["D"], p["L"]))
  if budgets:
    result["approach2"] = fit.isoflop(budgets)
  C = budget or 10 * max(p["C"] for p in data)
  n_opt, d_opt = law.optimal(C)
  result["compute_optimal"] = {
    "C": C,
    "N": n_opt,
    "D": d_opt,
    "L": float(law.loss(n_opt, d_opt)),
    "tokens_per_param": d_opt / n_opt,
  }
  write_atomically(os.path.join(directory, "fit.json"), json.dumps(result, indent=2) + "\n")
  if plot:
    plot_fit(result, law, plot)
  return result


def plot_fit(result: dict, law: fit.Law, path: str) -> None:
  """Loss vs compute with the fitted frontier; IsoFLOP curves with their optima (approach 2); predicted vs actual."""
  from matplotlib.figure import Figure

  fig = Figure(figsize=(16, 4.8), layout="constrained")
  ax_c, ax_iso, ax_pred = fig.subplots(1, 3)
  pts = result["points"]
  C = np.array([p["C"] for p in pts])
  ax_c.scatter(C, [p["L"] for p in pts], c=np.log([p["N"] for p in pts]), cmap="viridis", label="runs")
  grid = np.geomspace(C.min() / 2, result["compute_optimal"]["C"] * 2, 50)
  ax_c.plot(grid, [law.loss(*law.optimal(c)) for c in grid], "k--", label="fitted frontier L(N_opt(C), D_opt(C))")
  ax_c.set(xscale="log", xlabel="training FLOPs C", ylabel="final eval loss", title="loss vs compute")
  ax_c.legend(fontsize="small")
  for p in pts:
    ax_iso.scatter(p["N"], p["L"], color="C0" if p["flops_budget"] is None else None, s=12)
  for b in result.get("approach2", {}).get("budgets", []):
    xs = np.geomspace(b["N_opt"] / 8, b["N_opt"] * 8, 50)
    c2, c1, c0 = b["parabola"]
    ax_iso.plot(xs, c2 * np.log(xs) ** 2 + c1 * np.log(xs) + c0, label=f"C={b['C']:.2g}")
    ax_iso.plot(b["N_opt"], b["L_opt"], "k*")
  ax_iso.set(xscale="log", xlabel="parameters N", ylabel="final eval loss", title="IsoFLOP profiles (approach 2)")
  if result.get("approach2", {}).get("budgets"):
    ax_iso.legend(fontsize="small")
  actual = [p["L"] for p in pts]
  ax_pred.scatter(actual, [p["predicted"] for p in pts], s=14)
  for extra in result.get("held_out", []):
    ax_pred.scatter(extra["actual"], extra["predicted"], marker="*", s=120, color="C3", label="held out")
  lo, hi = min(actual) * 0.98, max(actual) * 1.02
  ax_pred.plot([lo, hi], [lo, hi], "k:")
  ax_pred.set(xlabel="actual final eval loss", ylabel="predicted (approach 3)", title="predicted vs actual")
  fig.savefig(path, dpi=100)


# The held-out prediction ------------------------------------------------------------------------------------------


def predict_and_check(runs: LadderRuns, parallel: int = 1, plot: str | None = None) -> dict:
  """Fits the finished ladder, writes the held-out run's predicted loss to DIR/prediction.json before it trains,
  trains it, and reports the error."""
  if not runs.ladder.predict:
    raise UserError(f"--ladder={runs.path} names no held-out run: set Ladder(predict={{'size': ..., ...}})")
  spec = runs.ladder.predict
  held = rung(
    runs.resolved,
    runs.ladder,
    spec["size"],
    tokens_per_param=spec.get("tokens_per_param"),
    flops_budget=spec.get("flops"),
  )
  held.name = f"predict_{held.name}"
  runs.add(held)
  path = os.path.join(runs.directory, "prediction.json")
  if os.path.exists(path):
    with open(path) as f:
      prediction = json.load(f)
  else:
    result = fit_directory(runs.directory)
    law = fit.Law(**{k: result["approach3"][k] for k in ("E", "A", "B", "alpha", "beta")})
    tokens = held.steps * held.overrides["train.global_batch"] * runs.resolved.data.seq_len
    prediction = {
      "run": held.name,
      "N": held.N,
      "D": float(tokens),
      "predicted": float(law.loss(held.N, tokens)),
      "made": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
      "fit_runs": result["approach3"]["runs"],
    }
    write_atomically(path, json.dumps(prediction, indent=2) + "\n")
    log.info("predicted final eval loss of %s: %.4f (before training it)", held.name, prediction["predicted"])
  sweep.Runner(runs, sweep._Slots(parallel)).run([(held.name, None)] if runs.status(held.name) != "finished" else [])
  s = summary.read(runs.workdirs[held.name]) or {}
  if s.get("status") != "finished":
    raise UserError(f"the held-out run {held.name} did not finish ({s.get('status')}): see its log.txt")
  prediction.update(actual=s["final_eval_loss"], error=prediction["predicted"] / s["final_eval_loss"] - 1)
  write_atomically(path, json.dumps(prediction, indent=2) + "\n")
  result = fit_directory(runs.directory, plot=None)
  result["held_out"] = [prediction]
  write_atomically(os.path.join(runs.directory, "fit.json"), json.dumps(result, indent=2) + "\n")
  if plot:
    law = fit.Law(**{k: result["approach3"][k] for k in ("E", "A", "B", "alpha", "beta")})
    plot_fit(result, law, plot)
  return prediction
