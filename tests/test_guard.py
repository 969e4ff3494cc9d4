"""Stability guard: rejected steps never change the state; NaNs and spikes are skipped or rolled back."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from maxlm.training import guard as guard_lib
from maxlm.training import loop

from conftest import cli_env, make_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = {
  "train.steps": 12,
  "train.log_every": 1,
  "train.eval_every": 0,
  "metrics.tensorboard": False,
  "metrics.peak_tflops": 1.0,
  "checkpoint.every_steps": 2,
}


def run(workdir, **overrides):
  return loop.run(make_config(**{**RUN, **overrides}), str(workdir), devices=jax.devices()[:1])


def events(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if "event" in r]


def test_rejected_step_leaves_the_state_bitwise_unchanged():
  session = loop.setup(make_config(**RUN), jax.devices()[:1])
  state = session.program.init()
  before = jax.device_get(state)
  batch = session.next_batch()
  for loss_scale, max_loss in [(np.nan, np.inf), (1.0, 0.5)]:  # non-finite; loss above the spike threshold
    controls = {"loss_scale": np.float32(loss_scale), "lr_scale": np.float32(1), "max_loss": np.float32(max_loss)}
    state, metrics = session.step(state, batch, controls)
    assert not bool(metrics["applied"])
    for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(before)):
      np.testing.assert_array_equal(a, b)
  state, metrics = session.step(
    state, batch, {"loss_scale": np.float32(1), "lr_scale": np.float32(1), "max_loss": np.float32(np.inf)}
  )
  assert bool(metrics["applied"]) and int(state.step) == 1


def test_spike_threshold():
  g = guard_lib.Guard(make_config(**{"train.guard.window": 4, "train.guard.spike_z": 3.0}).train.guard)
  for step, loss in enumerate([4.0, 4.2, 3.8, 4.0]):
    assert g.max_loss() == math.inf  # Detection waits for a full window.
    assert g.observe(step, loss, True, math.inf) == []
  std = math.sqrt(np.mean(np.square([0, 0.2, -0.2, 0])))
  assert g.max_loss() == pytest.approx(4.0 + 3.0 * std)
  assert g.observe(9, 40.0, False, 4.4) == [
    {"step": 9, "event": "spike", "loss": 40.0, "threshold": 4.4},
    {"step": 9, "event": "skip"},
  ]
  flat = guard_lib.Guard(make_config(**{"train.guard.window": 2, "train.guard.spike_z": 3.0}).train.guard)
  flat.observe(0, 2.0, True, math.inf)
  flat.observe(1, 2.0, True, math.inf)
  assert flat.max_loss() == pytest.approx(2.0 + 3.0 * 0.02)  # std floored at 1% of the mean


def test_skip_policy_drops_a_nan_step_and_goes_on(tmp_path):
  records = run(tmp_path, **{"train.inject_nan_at_step": 5})
  assert events(tmp_path) == [{"step": 5, "event": "nan", "loss": None}, {"step": 5, "event": "skip"}]
  assert [r["step"] for r in records] == list(range(1, 13))
  assert all(math.isfinite(r["loss"]) for r in records if r["step"] != 5)
  assert records[-1]["loss"] < records[0]["loss"]


def test_rollback_policy_recovers_from_a_nan(tmp_path):
  reference = run(tmp_path / "reference")
  records = run(tmp_path / "faulty", **{"train.guard.policy": "rollback", "train.inject_nan_at_step": 7})
  assert events(tmp_path / "faulty") == [
    {"step": 7, "event": "nan", "loss": None},
    {"step": 7, "event": "rollback", "to_step": 6, "data_skipped_to": 8},
  ]
  assert [r["loss"] for r in records[:6]] == [r["loss"] for r in reference[:6]]  # Identical before the fault.
  assert records[-1]["step"] == 12 and math.isfinite(records[-1]["loss"])
  # The schedule follows applied updates: restored at 6, then steps 9-11 applied, so step 12 is update 9
  # (the reference's step 10), at half the learning rate for rollback_lr_steps.
  assert records[-1]["lr"] == pytest.approx(0.5 * reference[9]["lr"], rel=1e-6)


def test_rollback_on_a_spike(tmp_path):
  run(tmp_path, **{"train.guard.policy": "rollback", "train.guard.window": 4, "train.inject_spike_at_step": 9})
  spike, rollback = events(tmp_path)
  assert spike["event"] == "spike" and spike["step"] == 9 and spike["loss"] > spike["threshold"]
  assert rollback == {"step": 9, "event": "rollback", "to_step": 8, "data_skipped_to": 10}


def test_running_out_of_rollbacks_stops_with_a_report(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "maxlm",
      "train",
      "--config=configs/tiny.py",
      f"--workdir={tmp_path}",
      "--config.train.steps=10",
      "--config.checkpoint.every_steps=2",
      "--config.train.guard.policy=rollback",
      "--config.train.guard.max_rollbacks=0",
      "--config.train.inject_nan_at_step=5",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=cli_env(),
  )
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
    "maxlm train: stopped: step 5 failed the stability guard after 0 rollbacks (train.guard.max_rollbacks); the "
    "newest good checkpoint is step 4: lower optim.lr or inspect the data around this step, then rerun to resume"
  )
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]  # Nothing good was deleted.
