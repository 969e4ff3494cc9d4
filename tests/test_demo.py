"""`make demo` end to end at a smaller size: corpus -> tokenizer -> prepared data -> training -> samples."""

import os
import subprocess
import sys

from conftest import cli_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_pipeline(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      "tools/demo.py",
      "--max-files",
      "30",
      "--val-fraction",
      "0.3",
      f"--cache={tmp_path}/cache",
      f"--workdir={tmp_path}/run",
      "--config.train.steps=4",
      "--config.train.eval_every=4",
      "--config.checkpoint.every_steps=4",
      "--config.model.num_layers=1",
      "--config.train.log_every=2",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    env=cli_env(),
  )
  assert proc.returncode == 0, proc.stderr
  assert "final train loss" in proc.stdout and "MFU" in proc.stdout
  samples = proc.stdout.split("samples (temperature 0.8, top-k 20):\n")[1].splitlines()
  assert [s.split()[0] for s in samples] == ["def", "import", "class", "return"]
  # Cached: the second run reuses the tokenizer and the prepared dataset.
  again = subprocess.run(
    [
      sys.executable,
      "tools/demo.py",
      "--max-files",
      "30",
      "--val-fraction",
      "0.3",
      f"--cache={tmp_path}/cache",
      f"--workdir={tmp_path}/run2",
      "--config.train.steps=2",
      "--config.train.eval_every=2",
      "--config.checkpoint.every_steps=2",
      "--config.model.num_layers=1",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    env=cli_env(),
  )
  assert again.returncode == 0 and "already holds this dataset" in again.stderr
