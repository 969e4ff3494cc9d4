"""Scaling ladders: the fits recover a known law from noisy samples of it; IsoFLOP parabolas find their optima; a
micro ladder runs end to end (WSD trunks with decay branches that equal runs trained alone), fits, and checks a
held-out prediction made before the held-out run trained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from maxlm.research import fit, ladder
from maxlm.training import summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRUE = fit.Law(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Chinchilla's fit


def _samples(seed: int, noise: float = 0.003):
  rng = np.random.default_rng(seed)
  N = np.repeat(np.geomspace(1e7, 1e9, 8), 4)
  D = N * np.tile([5.0, 10.0, 20.0, 40.0], 8)
  return N, D, TRUE.loss(N, D) * np.exp(rng.normal(0.0, noise, len(N)))


@pytest.mark.parametrize("seed", [0, 1])
def test_approach_3_recovers_a_known_law_from_noisy_runs(seed):
  N, D, L = _samples(seed)
  law, _ = fit.fit_law(N, D, L)
  assert pytest.approx(TRUE.E, rel=0.02) == law.E
  assert law.alpha == pytest.approx(TRUE.alpha, abs=0.03) and law.beta == pytest.approx(TRUE.beta, abs=0.03)
  # What the fit is for: the loss of a run 2x bigger than any it saw, and the compute-optimal split of 100x more.
  assert law.loss(2e9, 4e10) == pytest.approx(TRUE.loss(2e9, 4e10), rel=0.003)
  n_opt, d_opt = law.optimal(1e22)
  n_true, _ = TRUE.optimal(1e22)
  assert n_opt == pytest.approx(n_true, rel=0.35) and 6 * n_opt * d_opt == pytest.approx(1e22)
  resamples = fit.bootstrap(N, D, L, law, samples=100, seed=seed)
  for name in ("E", "alpha", "beta"):
    lo, hi = fit.interval([getattr(r, name) for r in resamples], level=0.99)
    assert lo <= getattr(law, name) <= hi and lo <= getattr(TRUE, name) <= hi, (name, lo, hi)


def test_exact_data_gives_the_law_back():
  N, D, _ = _samples(0)
  law, objective = fit.fit_law(N, D, TRUE.loss(N, D))
  for name in ("E", "A", "B", "alpha", "beta"):
    assert getattr(law, name) == pytest.approx(getattr(TRUE, name), rel=2e-3), name


def test_isoflop_parabolas_find_the_optimum():
  budgets = {}
  for C in (1e18, 1e19, 1e20):
    sizes = np.geomspace(TRUE.optimal(C)[0] / 6, TRUE.optimal(C)[0] * 6, 7)
    budgets[C] = [(n, C / (6 * n), float(TRUE.loss(n, C / (6 * n)))) for n in sizes]
  result = fit.isoflop(budgets)
  for b in result["budgets"]:
    assert b["N_opt"] == pytest.approx(TRUE.optimal(b["C"])[0], rel=0.2)
  assert result["N_opt_exponent"] == pytest.approx(TRUE.beta / (TRUE.alpha + TRUE.beta), abs=0.05)


MICRO = """
from configs import tiny
from maxlm.research import ladder


def get_config():
  c = tiny.get_config()
  c.data.seq_len = 32
  c.optim.update(schedule="wsd", warmup_steps=2, decay_fraction=0.3, lr=1e-2)
  c.train.update(global_batch=8, eval_every=1000, eval_batches=2, log_every=5)
  c.checkpoint.every_steps = 1000
  c.metrics.update(tensorboard=False, peak_tflops=1.0)
  return c


def get_ladder():
  shapes = [(1, 16), (1, 24), (1, 32), (2, 32), (2, 48), (2, 64)]
  return ladder.Ladder(
    sizes=ladder.depth_width(shapes, head_dim=8, kv_group=2),
    tokens_per_param=[1.0, 2.0],
    predict={"size": ladder.depth_width([(3, 64)], head_dim=8, kv_group=2)[0], "tokens_per_param": 2.0},
  )
"""


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("ladder")
  (tmp / "micro.py").write_text(textwrap.dedent(MICRO))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "maxlm",
      "ladder",
      f"--ladder={tmp}/micro.py",
      f"--workdir={tmp}/out",
      "--parallel=2",
      "--predict",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=900,
    env=env,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return tmp, proc


def test_the_micro_ladder_runs_fits_and_checks_its_prediction(micro):
  tmp, proc = micro
  out = tmp / "out"
  runs = sorted(os.listdir(out / "runs"))
  assert len(runs) == 13 and runs[-1].startswith("predict_L3-D64_tpp=2")
  for name in runs:
    assert summary.read(str(out / "runs" / name))["status"] == "finished", name
  result = json.loads((out / "fit.json").read_text())
  assert result["approach3"]["runs"] == 12 and set(result["approach3"]["ci95"]) == {"E", "A", "B", "alpha", "beta"}
  assert result["compute_optimal"]["C"] > 0 and len(result["points"]) == 12
  prediction = json.loads((out / "prediction.json").read_text())
  assert prediction["predicted"] > 0 and prediction["error"] == pytest.approx(
    prediction["predicted"] / prediction["actual"] - 1
  )
  predicted_at = os.path.getmtime(out / "prediction.json")
  assert (out / "fit.png").read_bytes()[:4] == b"\x89PNG" and result["held_out"][0]["run"] == prediction["run"]
  del predicted_at


def test_a_decay_branch_is_the_run_its_budget_would_have_been_alone(micro, tmp_path):
  """L2-D64 at 1 token/param branched off the 2 tokens/param trunk; trained alone it gives the same losses."""
  tmp, _ = micro
  runs = ladder.LadderRuns(str(tmp / "micro.py"), str(tmp_path / "alone"))
  branch = next(r for r in runs.rungs if r.name == "L2-D64_tpp=1")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  cmd = runs.command(branch.name)
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  alone = summary.read(runs.workdirs[branch.name])
  branched = summary.read(str(tmp / "out" / "runs" / branch.name))
  assert branched["steps"] == alone["steps"] == branch.steps
  assert branched["final_eval_loss"] == pytest.approx(alone["final_eval_loss"], rel=1e-5)
  assert branched["final_loss"] == pytest.approx(alone["final_loss"], rel=1e-5)
  trunk_log = (tmp / "out" / "runs" / "L2-D64_tpp=2" / "log.txt").read_text()
  assert (
    "--stop_at_step" in trunk_log
    and "resumed from the checkpoint at step" in (tmp / "out" / "runs" / branch.name / "log.txt").read_text()
  )


def test_a_ladder_needs_six_sizes_and_one_kind_of_budget(tmp_path):
  body = MICRO.replace("shapes = [(1, 16), (1, 24), (1, 32), (2, 32), (2, 48), (2, 64)]", "shapes = [(1, 16), (1, 24)]")
  (tmp_path / "small.py").write_text(textwrap.dedent(body))
  proc = subprocess.run(
    [sys.executable, "-m", "maxlm", "ladder", f"--ladder={tmp_path}/small.py", f"--workdir={tmp_path}/o", "--dry_run"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2 and "2 sizes; a scaling fit needs at least 6" in proc.stderr
