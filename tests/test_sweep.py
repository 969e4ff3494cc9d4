"""Sweeps, run summaries and comparisons: `maxlm sweep` runs real tiny runs (resumable after a kill, a failing run
recorded while the rest go on, successive halving), `summary.json` agrees with `metrics.jsonl`, `maxlm compare` shows
the config keys that differ and plots every run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import matplotlib.image
import pytest

from maxlm.research import compare, hyper, results, sweep
from maxlm.training import loop, summary

from conftest import make_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = """
from configs import tiny
from maxlm.research import hyper


def get_config():
  c = tiny.get_config()
  c.train.update(steps=STEPS, eval_every=3, log_every=1, eval_batches=1)
  c.checkpoint.every_steps = 3
  c.metrics.update(tensorboard=False, peak_tflops=1.0)
  return c
"""
# The table columns that depend on the runs' numbers alone, not on how long they took.
STABLE = ("run", "status", "steps", "final_loss", "final_eval_loss", "best_eval_loss", "tokens", "reason")


def _sweep_file(tmp_path, body: str, steps: int = 6, name: str = "sweep.py") -> str:
  path = tmp_path / name
  path.write_text(TINY.replace("STEPS", str(steps)) + textwrap.dedent(body))
  return str(path)


def _maxlm(*args, **kwargs) -> subprocess.CompletedProcess:
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  return subprocess.run(
    [sys.executable, "-m", "maxlm", *args], cwd=REPO, capture_output=True, text=True, timeout=600, env=env, **kwargs
  )


def _table(directory) -> list[dict]:
  with open(os.path.join(directory, "results.csv")) as f:
    import csv

    return [{k: r[k] for k in STABLE} for r in csv.DictReader(f)]


# Building runs ---------------------------------------------------------------------------------------------------


def test_grids_zips_and_random_search():
  grid = hyper.product(hyper.sweep("optim.lr", [1e-3, 3e-3]), hyper.sweep("model.d_model", [32, 64, 128]))
  assert len(grid) == 6 and grid[1] == {"optim.lr": 1e-3, "model.d_model": 64}  # the first list varies slowest
  pairs = hyper.zipped(hyper.sweep("optim.lr", [1e-3, 3e-3]), hyper.sweep("train.seed", [0, 1]))
  assert pairs == [{"optim.lr": 1e-3, "train.seed": 0}, {"optim.lr": 3e-3, "train.seed": 1}]
  with pytest.raises(ValueError, match="one length"):
    hyper.zipped(hyper.sweep("optim.lr", [1]), hyper.sweep("train.seed", [0, 1]))
  spaces = {
    "lr": hyper.log_uniform("optim.lr", 1e-4, 1e-2),
    "width": hyper.choice("model.d_model", [32, 64]),
    "layers": hyper.int_uniform("model.num_layers", 1, 3),
  }
  drawn = hyper.random_search(20, seed=3, **spaces)
  assert drawn == hyper.random_search(20, seed=3, **spaces) != hyper.random_search(20, seed=4, **spaces)
  assert all(1e-4 <= r["optim.lr"] <= 1e-2 and r["model.num_layers"] in (1, 2, 3) for r in drawn)
  assert {r["model.d_model"] for r in drawn} == {32, 64}

  names = sweep.run_names(grid)
  assert names[1] == "lr=0.001,d_model=64" and len(set(names)) == 6
  assert sweep.run_names(grid) == names  # stable
  # Keys with the same last part keep their full names; values equal to 4 digits get a digest to stay unique.
  assert sweep.run_names([{"data.seed": 1, "train.seed": 2}]) == ["data.seed=1,train.seed=2"]
  close = sweep.run_names([{"optim.lr": 0.0010001}, {"optim.lr": 0.0010002}])
  assert len(set(close)) == 2 and all(n.startswith("lr=0.001-") for n in close)
  assert sweep.run_names([{}]) == ["base"]


@pytest.mark.parametrize(
  "body, expected",
  [
    ("def get_sweep(:\n  pass\n", "cannot load: invalid syntax"),
    (
      "def get_sweep():\n  return [{'optim.lrr': 1e-3}]\n",
      "run 0: unknown config key 'optim.lrr': did you mean 'optim.lr'?",
    ),
    ("def get_sweep():\n  return []\n", "get_sweep() returned no runs"),
    ("X = 1\n", "defines no get_sweep()"),
    ("def get_sweep():\n  return [{'optim.lr': 'fast'}]\n", "run 0: optim.lr='fast' has type str; expected float"),
    ("def get_sweep():\n  return [{'train.seed': 1}, {'train.seed': 1}]\n", "run 1 repeats run 0 (seed=1)"),
    ("def get_sweep():\n  return {'optim.lr': 1e-3}\n", "must return a list of override dicts"),
    ("METRIC = 'speed'\ndef get_sweep():\n  return [{}]\n", "METRIC='speed' is not one of"),
  ],
  ids=["syntax", "unknown_key", "empty", "no_get_sweep", "wrong_type", "duplicate", "not_a_list", "bad_metric"],
)
def test_bad_sweep_files_are_one_line_errors(tmp_path, body, expected):
  proc = _maxlm("sweep", f"--sweep={_sweep_file(tmp_path, body)}", f"--workdir={tmp_path}/out", "--dry_run")
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr
  assert not os.path.exists(tmp_path / "out")


def test_dry_run_lists_the_runs_and_their_commands(tmp_path):
  body = "def get_sweep():\n  return hyper.sweep('optim.lr', [1e-3, 3e-3])\n"
  proc = _maxlm(
    "sweep",
    f"--sweep={_sweep_file(tmp_path, body)}",
    f"--workdir={tmp_path}/out",
    "--dry-run",
    "--config.train.steps=9",
  )
  assert proc.returncode == 0, proc.stderr
  assert "2 runs of" in proc.stdout and "lr=0.001: train --config=" in proc.stdout
  assert "--config.train.steps=9 --config.optim.lr=0.001" in proc.stdout
  assert not os.path.exists(tmp_path / "out")


# Real sweeps -----------------------------------------------------------------------------------------------------

GRID = """
def get_sweep():
  return hyper.chain(
    hyper.sweep("optim.lr", [1e-3, 1e-2]),
    hyper.fixed(**{"model.num_heads": 3}),  # d_model=64 is not divisible by 3: fails, and the rest go on
    hyper.sweep("model.d_model", [32]),
  )
"""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("sweep")
  path = _sweep_file(tmp, GRID, steps=30)
  proc = _maxlm("sweep", f"--sweep={path}", f"--workdir={tmp}/out", "--parallel=2")
  assert proc.returncode == 0, proc.stderr
  return tmp, path, proc


def test_a_sweep_records_every_run_and_a_failure_does_not_stop_it(uninterrupted):
  tmp, _, proc = uninterrupted
  table = _table(tmp / "out")
  assert [r["run"] for r in table][-1] == "num_heads=3"  # no metric: last
  statuses = {r["run"]: r["status"] for r in table}
  assert statuses == {"lr=0.001": "finished", "lr=0.01": "finished", "d_model=32": "finished", "num_heads=3": "failed"}
  failed = next(r for r in table if r["run"] == "num_heads=3")
  assert failed["reason"].startswith("model.d_model=64 is not divisible by model.num_heads=3")
  losses = [float(r["final_eval_loss"]) for r in table[:3]]
  assert losses == sorted(losses)
  markdown = (tmp / "out" / "results.md").read_text()
  assert f"| **best** {table[0]['run']} |" in markdown and markdown in proc.stdout
  for name in ("lr=0.001", "num_heads=3"):
    run = tmp / "out" / "runs" / name
    assert (run / "command.txt").read_text().startswith(sys.executable)
    assert json.loads((run / "overrides.json").read_text())
  rerun = _maxlm("sweep", f"--sweep={tmp}/sweep.py", f"--workdir={tmp}/out")
  assert rerun.returncode == 0 and "4 of 4 runs already ended; running 0" in rerun.stderr
  other = _maxlm("sweep", f"--sweep={tmp}/sweep.py", f"--workdir={tmp}/out", "--config.train.steps=7")
  assert other.returncode == 2 and "holds another sweep" in other.stderr


def test_a_sweep_killed_midway_and_rerun_gives_the_same_table(uninterrupted, tmp_path):
  tmp, path, _ = uninterrupted
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  # --parallel=2 as the uninterrupted sweep: XLA:CPU's sums may differ in the last bits with a run's core count.
  cmd = [sys.executable, "-m", "maxlm", "sweep", f"--sweep={path}", f"--workdir={tmp_path}/out", "--parallel=2"]
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  first = tmp_path / "out" / "runs" / "lr=0.001"
  deadline = time.time() + 300
  while not (first / "checkpoints" / "3").is_dir() and time.time() < deadline:  # into the first run's 30 steps
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr
  stopped = summary.read(str(first))
  assert stopped["status"] == "stopped" and 3 <= stopped["steps"] < 30, stopped  # checkpointed, not finished
  assert not (tmp_path / "out" / "runs" / "d_model=32").exists()  # the sweep stopped before its last run
  again = _maxlm("sweep", f"--sweep={path}", f"--workdir={tmp_path}/out", "--parallel=2")
  assert again.returncode == 0, again.stderr
  assert "resumed from the checkpoint at step" in (first / "log.txt").read_text()
  assert _table(tmp_path / "out") == _table(tmp / "out")


def test_successive_halving_prunes_the_worse_half_at_each_rung(tmp_path):
  body = "def get_sweep():\n  return hyper.sweep('optim.lr', [1e-4, 3e-4, 1e-3, 3e-3])\n"
  path = _sweep_file(tmp_path, body, steps=8)
  proc = _maxlm("sweep", f"--sweep={path}", f"--workdir={tmp_path}/out", "--prune=halving", "--parallel=2")
  assert proc.returncode == 0, proc.stderr
  runs = {n: str(tmp_path / "out" / "runs" / n) for n in ("lr=0.0001", "lr=0.0003", "lr=0.001", "lr=0.003")}
  assert sweep.rungs(8, 2, 2) == [2, 4]
  at2 = {n: sweep.eval_loss_at(w, 2) for n, w in runs.items()}
  keep2 = sorted(runs, key=at2.get)[:2]
  at4 = {n: sweep.eval_loss_at(runs[n], 4) for n in keep2}
  best = min(keep2, key=at4.get)
  for name, workdir in runs.items():
    s = summary.read(workdir)
    if name == best:
      assert s["status"] == "finished" and s["steps"] == 8
    else:
      assert s["status"] == "pruned" and s["pruned_at_step"] == (4 if name in keep2 else 2), (name, s)
      assert s["steps"] == s["pruned_at_step"]  # it trained no further than its rung
  assert "pruned" in (tmp_path / "out" / "results.md").read_text()


def _fake_run(root, name: str, evals: dict[int, float]) -> str:
  workdir = root / name
  workdir.mkdir()
  with open(workdir / "metrics.jsonl", "w") as f:
    for step, loss in evals.items():
      f.write(json.dumps({"step": step, "loss": loss + 0.1, "eval_loss": loss, "step_time_s": 0.1}) + "\n")
  return str(workdir)


def test_halving_decides_on_the_eval_loss_at_the_rung(tmp_path):
  runs = {
    "a": _fake_run(tmp_path, "a", {10: 3.0, 20: 2.0}),
    "b": _fake_run(tmp_path, "b", {10: 2.5, 20: 2.4}),
    "c": _fake_run(tmp_path, "c", {10: 2.5, 20: 1.0}),  # ties with b at step 10: the name decides
    "d": _fake_run(tmp_path, "d", {20: 0.5}),  # no eval at step 10 (it failed before): last
    "e": _fake_run(tmp_path, "e", {10: 2.7}),
  }
  survivors, pruned = sweep.halving(runs, 10, eta=2)
  assert survivors == ["b", "c", "e"] and set(pruned) == {"a", "d"}
  assert "eval loss 3.0000 ranked 4 of 5; the best 3 went on" in pruned["a"] and "no eval" in pruned["d"]
  survivors, pruned = sweep.halving({k: runs[k] for k in ("a", "b", "c")}, 20, eta=3)
  assert survivors == ["c"] and set(pruned) == {"a", "b"}


# Summaries and comparisons ---------------------------------------------------------------------------------------


def test_summary_json_agrees_with_the_metrics_and_the_target(tmp_path):
  cfg = make_config(
    **{
      "train.steps": 30,
      "train.eval_every": 5,
      "train.log_every": 5,
      "train.target_eval_loss": 5.3,
      "train.stop_at_target": True,
      "checkpoint.every_steps": 10,
      "metrics.tensorboard": False,
      "metrics.peak_tflops": 2.0,
    }
  )
  loop.run(cfg, str(tmp_path), devices=jax.devices()[:1])
  s = json.loads((tmp_path / "summary.json").read_text())
  history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  reached = next(r for r in history if r.get("eval_loss") is not None and r["eval_loss"] <= 5.3)
  assert s["status"] == "finished" and s["steps"] == reached["step"] < 30  # stopped at the target
  assert s["reason"] == f"reached train.target_eval_loss=5.3 at step {reached['step']}"
  assert s["step_to_target"] == reached["step"] and s["tokens_to_target"] == reached["step"] * 16 * 64
  assert s["tokens"] == s["steps"] * 16 * 64 and s["final_eval_loss"] == reached["eval_loss"]
  assert s["best_loss"] == min(r["loss"] for r in history) and s["final_loss"] == history[-1]["loss"]
  train_time = sum(r["step_time_s"] * 5 for r in history)
  assert s["train_time_s"] == pytest.approx(train_time) and s["time_to_target_s"] == pytest.approx(train_time)
  assert s["mfu"] == pytest.approx(s["model_flops"] / train_time / 2.0e12)
  assert s["wall_time_s"] > s["train_time_s"] > 0
  assert s["config_hash"] == summary.config_hash(cfg.to_dict()) and s["maxlm"]["version"] and s["host"]
  assert loop.run(cfg, str(tmp_path), devices=jax.devices()[:1]) == []  # reached: nothing left to train


def test_stop_at_step_pauses_with_an_eval_and_the_summary_follows_the_run(tmp_path):
  cfg = make_config(
    **{"train.steps": 6, "train.eval_every": 4, "metrics.tensorboard": False, "checkpoint.every_steps": 4}
  )
  loop.run(cfg, str(tmp_path), devices=jax.devices()[:1], stop_at_step=3)
  s = summary.read(str(tmp_path))
  assert s["status"] == "stopped" and s["steps"] == 3 and "--stop_at_step=3" in s["reason"]
  assert sweep.eval_loss_at(str(tmp_path), 3) is not None and os.path.isdir(tmp_path / "checkpoints" / "3")
  loop.run(cfg, str(tmp_path), devices=jax.devices()[:1])
  s2 = summary.read(str(tmp_path))
  assert s2["status"] == "finished" and s2["steps"] == 6 and s2["wall_time_s"] > s["wall_time_s"]


def test_compare_shows_what_differs_and_plots_every_run(uninterrupted, tmp_path):
  tmp, _, _ = uninterrupted
  runs = compare.find_runs([str(tmp / "out")])
  differing, rows = compare.table(runs)
  assert differing == ["model.d_model", "optim.lr"]  # num_heads=3 never started: it has no config to compare
  assert [r["status"] for r in rows].count("finished") == 3
  fig = compare.plot(runs, str(tmp_path / "curves.png"))
  image = matplotlib.image.imread(str(tmp_path / "curves.png"))
  assert image.shape[0] > 100 and (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  axes = fig.get_axes()
  assert len(axes) == 6 and all(len(ax.get_lines()) == 3 for ax in axes)  # one curve per started run
  proc = _maxlm("compare", str(tmp / "out" / "runs" / "lr=0.001"), str(tmp / "out" / "runs" / "d_model=32"))
  assert proc.returncode == 0 and proc.stdout.splitlines()[0] == (
    "| run | model.d_model | optim.lr | status | steps | final_loss | final_eval_loss | best_eval_loss | "
    "time_to_target_s | tokens_per_sec |"
  )
  bad = _maxlm("compare", str(tmp_path))
  assert bad.returncode == 2 and "not a maxlm run" in bad.stderr


def test_results_sort_mark_the_best_and_summarize_seeds(tmp_path):
  def row(name, overrides, time_to_target, status="finished"):
    reached = time_to_target is not None
    return {
      "run": name,
      "overrides": overrides,
      "status": status,
      "final_eval_loss": 3.0,
      "time_to_target_s": time_to_target,
      "tokens_to_target": 1000 if reached else None,
      "step_to_target": 10 if reached else None,
    }

  rows = [
    row("seed=0", {"train.seed": 0}, 4.0),
    row("seed=1", {"train.seed": 1}, 6.0),
    row("qk_norm=true,seed=0", {"model.qk_norm": True, "train.seed": 0}, 2.0),
    row("qk_norm=true,seed=1", {"model.qk_norm": True, "train.seed": 1}, None),
    row("broken", {"train.seed": 9}, None, status="failed"),
  ]
  results.write(str(tmp_path), rows, "time_to_target_s")
  with open(tmp_path / "results.csv") as f:
    import csv

    table = list(csv.DictReader(f))
  assert [r["run"] for r in table] == ["qk_norm=true,seed=0", "seed=0", "seed=1", "broken", "qk_norm=true,seed=1"]
  assert [r["best"] for r in table] == ["1", "0", "0", "0", "0"]
  md = (tmp_path / "results.md").read_text()
  assert "| **best** qk_norm=true,seed=0 |" in md
  assert "| seed=0, seed=1, broken |  | 3 | 5 ± 1.414 | 1000 ± 0 | 2/3 |" in md
  assert "| qk_norm=true,seed=0, qk_norm=true,seed=1 | True | 2 | 2 | 1000 | 1/2 |" in md
