"""`maxlm sweep`: a sweep file's runs, each an ordinary maxlm workdir, resumable, N at a time.

A sweep file is Python with `get_config()` (the base config: `configs/base.py`'s, or a named config's) and
`get_sweep()`, the runs as a list of override dicts built with `maxlm.research.hyper`. It may set `METRIC` (a
summary.json field, lower is better; default `final_eval_loss`) that results are sorted by.

  DIR/sweep.json               the sweep file, the base overrides from the command line and every run's overrides
  DIR/runs/<name>/             one maxlm workdir per run, named from its overrides (`lr=0.003,d_model=128`), with
                               overrides.json, command.txt (the `maxlm train` command line) and log.txt (its output)
  DIR/results.csv, results.md  one row per run, sorted by METRIC, the best marked (rewritten as runs end)

Each run is `maxlm train --config=SWEEP_FILE --workdir=DIR/runs/NAME --config.KEY=VALUE ...` in its own process.
Rerunning the sweep skips runs that ended (finished, diverged, pruned; failed too, unless --retry_failed) and
resumes the others from their checkpoints. A run that fails is recorded with its reason and never stops the
sweep. SIGTERM/SIGINT are passed to the runs, which checkpoint and stop; the sweep then exits and a rerun goes on.

Parallel runs: on CPU each of N processes is pinned to its share of the cores; on GPUs each run gets one GPU
(CUDA_VISIBLE_DEVICES), at most one run per GPU; on a TPU host runs go one after another over the whole slice.

Successive halving (`prune="halving"`): every live run trains to rung 1, the best 1/eta by eval loss at that step
go on to rung 2, and so on; the survivors finish. Rungs are train.steps / eta^k for k = rungs..1. Ties break by
name, so the decision is a function of the runs' (deterministic) eval losses: a rerun makes the same one.
"""

from __future__ import annotations

import collections
import difflib
import glob
import hashlib
import json
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

import ml_collections
import numpy as np

from configs import base
from maxlm import config
from maxlm.errors import UserError
from maxlm.parallel import distributed
from maxlm.research import results
from maxlm.storage import write_atomically
from maxlm.training import summary

log = logging.getLogger("maxlm")

DEFAULT_METRIC = "final_eval_loss"
ENDED = ("finished", "diverged", "pruned")
MAX_NAME = 120


def load(path: str) -> tuple[ml_collections.ConfigDict, list[dict], str]:
  """(base config, runs as override dicts, metric) of a sweep file; every problem is one UserError line."""
  if not os.path.isfile(path):
    raise UserError(f"--sweep={path}: no such file; pass a sweep file, e.g. --sweep=configs/sweeps/lr_width.py")
  module = config.load_python(path, "--sweep")
  for name in ("get_config", "get_sweep"):
    if not callable(getattr(module, name, None)):
      raise UserError(f"--sweep={path} defines no {name}() (see configs/sweeps/lr_width.py)")
  try:
    cfg, runs = module.get_config(), module.get_sweep()
  except Exception as e:  # noqa: BLE001
    raise UserError(f"--sweep={path}: get_config() or get_sweep() failed: {_one_line(e)}") from None
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise UserError(f"--sweep={path}: get_config() must return an ml_collections.ConfigDict")
  if not isinstance(runs, (list, tuple)) or not all(isinstance(r, dict) for r in runs):
    raise UserError(f"--sweep={path}: get_sweep() must return a list of override dicts (see maxlm/research/hyper.py)")
  if not runs:
    raise UserError(f"--sweep={path}: get_sweep() returned no runs")
  metric = getattr(module, "METRIC", DEFAULT_METRIC)
  if metric not in results.METRICS:
    raise UserError(f"--sweep={path}: METRIC={metric!r} is not one of {', '.join(results.METRICS)}")
  schema = config.flat_keys(base.get_config())
  for i, run in enumerate(runs):
    for key, value in run.items():
      check_override(key, value, schema, where=f"--sweep={path}: run {i}")
  return cfg, [dict(r) for r in runs], metric


def check_override(key: str, value: object, schema: dict, where: str) -> None:
  if not isinstance(key, str) or key not in schema:
    close = difflib.get_close_matches(str(key), list(schema), n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'?" if close else "see configs/base.py for the keys"
    raise UserError(f"{where}: unknown config key '{key}': {hint}")
  try:
    config.check_type(key, value, schema[key])
  except UserError as e:
    raise UserError(f"{where}: {e}") from None


def run_names(runs: Sequence[dict]) -> list[str]:
  """A stable, readable, unique directory name per run, from its overrides alone."""
  keys = list(dict.fromkeys(k for run in runs for k in run))
  short = {k: k.rsplit(".", 1)[-1] for k in keys}
  clashes = {s for s, n in collections.Counter(short.values()).items() if n > 1}
  short = {k: (k if s in clashes else s) for k, s in short.items()}
  names = []
  for run in runs:
    name = ",".join(f"{short[k]}={_format(v)}" for k, v in run.items()) or "base"
    name = "".join(c if c.isalnum() or c in "=,.-_+" else "_" for c in name)
    if len(name) > MAX_NAME:
      name = name[: MAX_NAME - 13] + "-" + _digest(run)
    names.append(name)
  seen: dict[str, int] = {}
  for i, (name, run) in enumerate(zip(names, runs)):
    if name in seen and runs[seen[name]] == run:
      raise UserError(f"the sweep's run {i} repeats run {seen[name]} ({name}): remove one")
    seen.setdefault(name, i)
  counts = collections.Counter(names)
  return [f"{n}-{_digest(r)}" if counts[n] > 1 else n for n, r in zip(names, runs)]


def _format(value: object) -> str:
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def _digest(run: dict) -> str:
  return hashlib.sha256(json.dumps(run, sort_keys=True, default=str).encode()).hexdigest()[:12]


def flag_value(value: object) -> str:
  """How `--config.KEY=VALUE` spells a value so that absl parses it back exactly."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, float):
    return repr(value)
  return str(value)


def parse_base_overrides(args: Sequence[str]) -> dict:
  """`--config.KEY=VALUE` arguments of `maxlm sweep`, applied to every run (values kept as the strings given)."""
  schema = config.flat_keys(base.get_config())
  out = {}
  for arg in args:
    if not arg.startswith("--config.") or "=" not in arg:
      raise UserError(f"unexpected argument {arg!r}: maxlm sweep takes --config.KEY=VALUE overrides for every run")
    key, value = arg[len("--config.") :].split("=", 1)
    if key not in schema:
      check_override(key, value, schema, where="maxlm sweep")
    out[key] = value
  return out


class Sweep:
  """The runs of one sweep file in one directory (see the module docstring)."""

  def __init__(self, path: str, directory: str, base_overrides: dict | None = None):
    self.path, self.directory = os.path.abspath(path), os.path.abspath(directory)
    self.base_cfg, self.runs, self.metric = load(path)
    self.base_overrides = dict(base_overrides or {})
    self.names = run_names(self.runs)
    self.workdirs = {n: os.path.join(self.directory, "runs", n) for n in self.names}
    self.overrides = dict(zip(self.names, self.runs))

  def steps(self, name: str) -> int:
    """train.steps of a run (its override, a base override, or the sweep's base config)."""
    value = self.overrides[name].get("train.steps", self.base_overrides.get("train.steps", self.base_cfg.train.steps))
    return int(value)

  def command(self, name: str, stop_at_step: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "maxlm", "train", f"--config={self.path}", f"--workdir={self.workdirs[name]}"]
    cmd += [f"--config.{k}={v}" for k, v in self.base_overrides.items()]
    cmd += [f"--config.{k}={flag_value(v)}" for k, v in self.overrides[name].items()]
    return cmd + ([f"--stop_at_step={stop_at_step}"] if stop_at_step else [])

  def describe(self) -> str:
    lines = [f"{len(self.names)} runs of {self.path} (sorted by {self.metric}) into {self.directory}/runs/:"]
    lines += [f"  {n}: {' '.join(shlex.quote(a) for a in self.command(n)[3:])}" for n in self.names]
    return "\n".join(lines)

  def check_directory(self) -> None:
    """A directory holding another sweep is refused; a new one records this sweep in sweep.json."""
    record = json.loads(json.dumps({"sweep": self.path, "base_overrides": self.base_overrides, "runs": self.overrides}))
    path = os.path.join(self.directory, "sweep.json")
    if os.path.exists(path):
      try:
        with open(path) as f:
          earlier = json.load(f)
      except ValueError:
        earlier = None
      if not isinstance(earlier, dict) or {k: earlier.get(k) for k in record} != record:
        raise UserError(
          f"--workdir={self.directory} holds another sweep (other file, overrides or runs; see its sweep.json): "
          "choose a new --workdir, or rerun with the same arguments to resume"
        )
      return
    if os.path.exists(self.directory) and os.listdir(self.directory):
      raise UserError(f"--workdir={self.directory} exists and is not a sweep directory: choose a new --workdir")
    os.makedirs(os.path.join(self.directory, "runs"), exist_ok=True)
    write_atomically(path, json.dumps(record, indent=2) + "\n")

  def status(self, name: str) -> str | None:
    s = summary.read(self.workdirs[name])
    return s["status"] if s else None

  def write_results(self) -> list[dict]:
    rows = results.collect({n: self.workdirs[n] for n in self.names}, self.overrides)
    results.write(self.directory, rows, self.metric)
    return rows


class _Slots:
  """Where runs execute: N slots, each with its environment and CPU cores."""

  def __init__(self, parallel: int):
    gpus = _gpu_count()
    if distributed.tpu_chips_present():
      if parallel > 1:
        log.warning("a TPU host runs one run at a time over the whole slice: --parallel=%d ignored", parallel)
      parallel, gpus = 1, 0
    if gpus and parallel > gpus:
      raise UserError(
        f"--parallel={parallel}: this host has {gpus} GPU(s), and a run takes one: use --parallel<={gpus}"
      )
    self.count = parallel
    cores = sorted(os.sched_getaffinity(0))
    self.cores = [[int(x) for x in c] for c in np.array_split(cores, min(parallel, len(cores)))] if not gpus else None
    self.gpus = gpus

  def env(self, slot: int) -> dict:
    env = dict(os.environ)
    if self.gpus and self.count > 1:
      env["CUDA_VISIBLE_DEVICES"] = str(slot)
    return env

  def pin(self, slot: int):
    if not self.cores or self.count == 1:
      return None
    cores = self.cores[slot % len(self.cores)]
    return lambda: os.sched_setaffinity(0, cores)


def _gpu_count() -> int:
  """NVIDIA GPUs on this host, counted without starting a JAX backend (which would hold their memory)."""
  return len(glob.glob("/proc/driver/nvidia/gpus/*"))


class Runner:
  """Runs jobs (run name, stop step) in slots; records each run's end; passes SIGTERM/SIGINT on."""

  def __init__(self, sweep: Sweep, slots: _Slots):
    self.sweep, self.slots, self.stopping = sweep, slots, False
    self._running: dict[int, tuple[str, subprocess.Popen, float]] = {}

  def _stop(self, signum, frame):
    if not self.stopping:
      log.info("%s received: stopping the runs after their current step", signal.Signals(signum).name)
    self.stopping = True
    for _, proc, _ in self._running.values():
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)

  def run(self, jobs: Sequence[tuple[str, int | None]]) -> None:
    previous = {s: signal.signal(s, self._stop) for s in (signal.SIGTERM, signal.SIGINT)}
    pending = collections.deque(jobs)
    try:
      while (pending and not self.stopping) or self._running:
        free = [s for s in range(self.slots.count) if s not in self._running]
        while pending and free and not self.stopping:
          self._start(free.pop(0), *pending.popleft())
        for slot, (name, proc, started) in list(self._running.items()):
          if proc.poll() is not None:
            del self._running[slot]
            self._ended(name, proc.returncode, started)
        time.sleep(0.1)
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)

  def _start(self, slot: int, name: str, stop_at_step: int | None) -> None:
    workdir = self.sweep.workdirs[name]
    os.makedirs(workdir, exist_ok=True)
    write_atomically(os.path.join(workdir, "overrides.json"), json.dumps(self.sweep.overrides[name], indent=2) + "\n")
    cmd = self.sweep.command(name, stop_at_step)
    write_atomically(os.path.join(workdir, "command.txt"), " ".join(shlex.quote(a) for a in cmd) + "\n")
    until = f" to step {stop_at_step}" if stop_at_step else ""
    log.info("run %s%s", name, until)
    with open(os.path.join(workdir, "log.txt"), "a") as out:
      out.write(f"\n$ {' '.join(shlex.quote(a) for a in cmd)}\n")
      out.flush()
      proc = subprocess.Popen(
        cmd, stdout=out, stderr=subprocess.STDOUT, env=self.slots.env(slot), preexec_fn=self.slots.pin(slot)
      )
    self._running[slot] = (name, proc, time.time())

  def _ended(self, name: str, returncode: int, started: float) -> None:
    workdir = self.sweep.workdirs[name]
    mtime = os.path.getmtime(os.path.join(workdir, summary.FILE)) if summary.read(workdir) else 0.0
    if returncode != 0 and self.stopping:
      log.info("run %s: stopped before it could checkpoint; a rerun starts it again", name)
      return
    if returncode != 0 and mtime < started:  # It ended before training (bad config, crash): say why.
      summary.write(
        workdir,
        {"overrides": self.sweep.overrides[name]},
        summary.summarize([], status="failed", tokens_per_step=0, flops_per_step=0.0, num_devices=1, peak_tflops=None),
        wall_time_s=time.time() - started,
        reason=_last_error(os.path.join(workdir, "log.txt")) or f"exit status {returncode}",
      )
    s = summary.read(workdir) or {}
    log.info("run %s: %s%s", name, s.get("status", "?"), f" ({s['reason']})" if s.get("reason") else "")
    self.sweep.write_results()


def _last_error(log_path: str) -> str | None:
  try:
    with open(log_path, errors="replace") as f:
      lines = [line.strip() for line in f if line.strip()]
  except OSError:
    return None
  for line in reversed(lines):
    for verdict in (": error: ", ": stopped: "):
      if line.startswith("maxlm ") and verdict in line:
        return line.split(verdict, 1)[1]
  return lines[-1][:300] if lines else None


def rungs(steps: int, eta: int, count: int) -> list[int]:
  """The steps at which successive halving compares runs: steps / eta^k for k = count..1 (distinct, >= 1)."""
  return sorted({max(1, steps // eta**k) for k in range(count, 0, -1)} - {steps})


def eval_loss_at(workdir: str, step: int) -> float | None:
  for record in summary.records(workdir):
    if record["step"] == step and record.get("eval_loss") is not None:
      return float(record["eval_loss"])
  return None


def halving(candidates: dict[str, str], step: int, eta: int) -> tuple[list[str], dict[str, str]]:
  """(survivors, {pruned run: why}) of successive halving at `step` among `candidates` (name -> workdir): the best
  ceil(n/eta) by eval loss at that step go on; a run without that eval (it failed before) ranks last."""
  losses = {n: eval_loss_at(w, step) for n, w in candidates.items()}
  order = sorted(candidates, key=lambda n: (losses[n] is None, losses[n] if losses[n] is not None else 0.0, n))
  keep = max(1, math.ceil(len(order) / eta))
  pruned = {}
  for rank, name in enumerate(order[keep:], start=keep + 1):
    loss = "no eval" if losses[name] is None else f"eval loss {losses[name]:.4f}"
    pruned[name] = f"successive halving at step {step}: {loss} ranked {rank} of {len(order)}; the best {keep} went on"
  return order[:keep], pruned


def execute(
  sweep: Sweep,
  *,
  parallel: int = 1,
  prune: str = "none",
  eta: int = 2,
  rung_count: int = 2,
  retry_failed: bool = False,
) -> list[dict]:
  """Runs (or resumes) every run of the sweep; returns the result rows."""
  sweep.check_directory()
  runner = Runner(sweep, _Slots(parallel))
  done = set(ENDED) | ({"failed"} if not retry_failed else set())
  todo = [n for n in sweep.names if sweep.status(n) not in done]
  if len(todo) < len(sweep.names):
    log.info("%d of %d runs already ended; running %d", len(sweep.names) - len(todo), len(sweep.names), len(todo))
  if prune == "halving":
    _halving(sweep, runner, eta, rung_count, done)
  else:
    runner.run([(n, None) for n in todo])
  return sweep.write_results()


def _halving(sweep: Sweep, runner: Runner, eta: int, count: int, done: set) -> None:
  steps = {sweep.steps(n) for n in sweep.names}
  if len(steps) > 1:
    raise UserError("--prune=halving compares runs at the same steps: do not sweep train.steps")
  alive = list(sweep.names)
  for step in rungs(steps.pop(), eta, count):
    # Runs pruned at an earlier rung are out; those pruned here (an earlier attempt) take part in this ranking again.
    alive = [n for n in alive if not _pruned_before(sweep.workdirs[n], step)]
    behind = [n for n in alive if sweep.status(n) not in done and _last_step(sweep.workdirs[n]) < step]
    runner.run([(n, step) for n in behind])
    if runner.stopping:
      return
    candidates = {n: sweep.workdirs[n] for n in alive if sweep.status(n) not in ("failed", "diverged")}
    survivors, pruned = halving(candidates, step, eta)
    for name, why in pruned.items():
      _mark_pruned(sweep.workdirs[name], step, why)
      log.info("run %s: pruned (%s)", name, why)
    alive = survivors
    sweep.write_results()
  runner.run([(n, None) for n in alive if sweep.status(n) not in done])


def _pruned_before(workdir: str, step: int) -> bool:
  s = summary.read(workdir)
  return bool(s and s["status"] == "pruned" and (s.get("pruned_at_step") or 0) < step)


def _last_step(workdir: str) -> int:
  history = summary.records(workdir)
  return history[-1]["step"] if history else 0


def _mark_pruned(workdir: str, step: int, why: str) -> None:
  s = summary.read(workdir)
  if s and s["status"] == "pruned":
    return
  s = dict(s or {})
  s.update(status="pruned", reason=why, pruned_at_step=step)
  write_atomically(os.path.join(workdir, summary.FILE), json.dumps(s, indent=2) + "\n")


def _one_line(error: Exception) -> str:
  return " ".join(str(error).split()) or type(error).__name__
