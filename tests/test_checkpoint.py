"""Checkpoints: a resumed run continues the uninterrupted run's exact trajectory, whatever killed it."""

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from maxlm.errors import UserError
from maxlm.training import loop

from conftest import cli_env, make_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = {
  "train.steps": 8,
  "train.log_every": 1,
  "train.eval_every": 0,
  "metrics.tensorboard": False,
  "metrics.peak_tflops": 1.0,
  "checkpoint.every_steps": 2,
}


def losses_by_step(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def run(workdir, devices=None, **overrides):
  devices = devices or jax.devices()[:1]
  return loop.run(make_config(num_devices=len(devices), **{**RUN, **overrides}), str(workdir), devices=devices)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Per-step losses of an uninterrupted 8-step run on one device."""
  workdir = tmp_path_factory.mktemp("reference")
  run(workdir)
  return losses_by_step(workdir)


def cli(workdir, *extra):
  return [
    sys.executable,
    "-m",
    "maxlm",
    "train",
    "--config=configs/tiny.py",
    f"--workdir={workdir}",
    "--config.train.steps=24",
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
    "--config.checkpoint.every_steps=4",
    "--config.metrics.tensorboard=false",
    *extra,
  ]


def complete_checkpoints(workdir):
  directory = os.path.join(workdir, "checkpoints")
  return [d for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(directory) else []  # not *.tmp


def wait_for_step(workdir, step, proc, timeout=180):
  """Waits until `step` is logged and at least one checkpoint is complete."""
  path, deadline = os.path.join(workdir, "metrics.jsonl"), time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(path) and sum(1 for _ in open(path)) >= step and complete_checkpoints(workdir):
      return
    time.sleep(0.02)
  raise AssertionError(f"the run did not reach step {step} with a complete checkpoint")


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("cli_reference")
  subprocess.run(cli(workdir), cwd=REPO, check=True, capture_output=True, timeout=300, env=cli_env())
  return losses_by_step(workdir)


def test_hard_kill_then_resume_reproduces_the_uninterrupted_losses(tmp_path, cli_reference):
  kill_at = random.randint(6, 20)
  proc = subprocess.Popen(cli(tmp_path), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())
  wait_for_step(tmp_path, kill_at, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  resumed = subprocess.run(cli(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=300, env=cli_env())
  assert resumed.returncode == 0, resumed.stderr
  assert "resumed from the checkpoint at step" in resumed.stderr
  assert losses_by_step(tmp_path) == cli_reference  # Bitwise: same floats, every step 1..24 exactly once.


def test_sigterm_saves_and_exits_cleanly(tmp_path, cli_reference):
  proc = subprocess.Popen(
    cli(tmp_path), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=cli_env()
  )
  wait_for_step(tmp_path, 7, proc)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr
  stopped_at = max(losses_by_step(tmp_path))
  assert f"stopped by SIGTERM after step {stopped_at}: a checkpoint was saved" in stderr
  assert str(stopped_at) in os.listdir(tmp_path / "checkpoints")  # Saved at the stop step, not the last periodic one.
  subprocess.run(cli(tmp_path), cwd=REPO, check=True, capture_output=True, timeout=300, env=cli_env())
  assert losses_by_step(tmp_path) == cli_reference


@pytest.mark.parametrize(
  "resume_mesh, num_devices",
  [
    ({"mesh.data": 2, "mesh.fsdp": 1, "mesh.tensor": 2}, 4),
    ({"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1}, 1),
  ],
)
def test_restore_onto_another_mesh(tmp_path, devices, reference, caplog, resume_mesh, num_devices):
  run(tmp_path, devices, **{"train.steps": 8, "checkpoint.every_steps": 4, "mesh.data": 1, "mesh.fsdp": 8})
  # Drop the final checkpoint so the resumed run has steps 5-8 to compute on the new mesh.
  os.rename(tmp_path / "checkpoints" / "8", tmp_path / "moved_away")
  with caplog.at_level(logging.INFO, logger="maxlm"):
    records = run(tmp_path, devices[:num_devices], **resume_mesh)
  assert (
    "resumed from the checkpoint at step 4; resharded from mesh "
    "{'diloco': 1, 'stage': 1, 'data': 1, 'fsdp': 8, 'expert': 1, 'context': 1, 'tensor': 1}" in caplog.text
  )
  assert [r["step"] for r in records] == [5, 6, 7, 8]
  np.testing.assert_allclose([r["loss"] for r in records], [reference[s] for s in (5, 6, 7, 8)], rtol=1e-5)


def test_corrupt_latest_checkpoint_falls_back_to_an_older_one(tmp_path, reference, caplog):
  run(tmp_path)  # checkpoints at 4, 6, 8 (keep=3)
  state_dir = tmp_path / "checkpoints" / "8" / "state"
  biggest = max((os.path.join(d, f) for d, _, fs in os.walk(state_dir) for f in fs), key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  with caplog.at_level(logging.INFO, logger="maxlm"):
    records = run(tmp_path, **{"train.steps": 8})
  assert "checkpoint step 8 is unreadable" in caplog.text
  assert "resumed from the checkpoint at step 6" in caplog.text
  assert [r["step"] for r in records] == [7, 8]
  assert [r["loss"] for r in records] == [reference[7], reference[8]]
  assert (tmp_path / "checkpoints_corrupt" / "8" / "state").is_dir()  # Set aside, not deleted.
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "6", "8"]  # 8 rewritten by the resumed run.


def test_checkpoint_of_another_model_is_a_config_error(tmp_path):
  run(tmp_path, **{"train.steps": 2})
  with pytest.raises(UserError, match=r"saved for a different model \(model.d_model: saved 64, now 128"):
    run(tmp_path, **{"train.steps": 4, "model.d_model": 128})


def test_cli_reports_a_model_mismatch_in_one_line(tmp_path):
  subprocess.run(
    cli(tmp_path, "--config.train.steps=2"), cwd=REPO, check=True, capture_output=True, timeout=300, env=cli_env()
  )
  proc = subprocess.run(
    cli(tmp_path, "--config.model.num_layers=3"), cwd=REPO, capture_output=True, text=True, timeout=300, env=cli_env()
  )
  assert proc.returncode == 2
  assert (
    proc.stderr.strip()
    .splitlines()[-1]
    .startswith(
      "maxlm train: error: the checkpoint at step 2 was saved for a different model (model.num_layers: saved 2, now 3)"
    )
  )
  assert "Traceback" not in proc.stderr


def test_retention_keeps_the_newest_and_the_permanent_ones(tmp_path):
  run(tmp_path, **{"train.steps": 9, "checkpoint.every_steps": 1, "checkpoint.keep": 2, "checkpoint.keep_every": 4})
  assert sorted(map(int, os.listdir(tmp_path / "checkpoints"))) == [4, 8, 9]


def test_resuming_a_finished_run_trains_nothing(tmp_path, caplog):
  run(tmp_path, **{"train.steps": 2})
  with caplog.at_level(logging.INFO, logger="maxlm"):
    assert run(tmp_path, **{"train.steps": 2}) == []
  assert "nothing to train" in caplog.text


def test_every_minutes_saves_between_step_multiples(tmp_path):
  # 0.0001 minutes (6 ms): nearly every step is past due, so saves follow steps that are not multiples of 50. Not
  # necessarily every one: a step dispatched within 6 ms of the previous save's return is not due yet.
  run(
    tmp_path,
    **{"train.steps": 5, "checkpoint.every_steps": 50, "checkpoint.every_minutes": 0.0001, "checkpoint.keep": 10},
  )
  saved = sorted(map(int, os.listdir(tmp_path / "checkpoints")))
  assert saved[0] == 1 and saved[-1] == 5 and len(saved) >= 3, saved


def test_checkpoint_missing_an_item_falls_back(tmp_path, reference, caplog):
  run(tmp_path)  # checkpoints at 4, 6, 8
  import shutil

  shutil.rmtree(tmp_path / "checkpoints" / "8" / "data")
  with caplog.at_level(logging.INFO, logger="maxlm"):
    records = run(tmp_path)
  assert "checkpoint step 8 is unreadable" in caplog.text and "resumed from the checkpoint at step 6" in caplog.text
  assert [r["loss"] for r in records] == [reference[7], reference[8]]


def test_sigint_stops_like_sigterm(tmp_path):
  proc = subprocess.Popen(
    cli(tmp_path), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=cli_env()
  )
  wait_for_step(tmp_path, 5, proc)
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0 and "stopped by SIGINT after step" in stderr
