"""`make demo` end to end at a smaller size: corpus -> tokenizer -> prepared data -> training -> samples."""

import os
import subprocess
import sys

from conftest import cli_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo(tmp_path, workdir: str, steps: int) -> subprocess.CompletedProcess:
  args = ["--max-files=30", "--val-fraction=0.3", f"--cache={tmp_path}/cache", f"--workdir={tmp_path}/{workdir}"]
  args += [f"--config.train.steps={steps}", f"--config.train.eval_every={steps}"]
  args += [f"--config.checkpoint.every_steps={steps}", "--config.model.num_layers=1", "--config.train.log_every=2"]
  return subprocess.run(
    [sys.executable, "tools/demo.py", *args], cwd=REPO, capture_output=True, text=True, timeout=600, env=cli_env()
  )


def test_demo_pipeline(tmp_path):
  proc = _demo(tmp_path, "run", 4)
  assert proc.returncode == 0, proc.stderr
  assert "final train loss" in proc.stdout and "MFU" in proc.stdout
  samples = proc.stdout.split("samples (temperature 0.8, top-k 20):\n")[1].splitlines()
  assert [s.split()[0] for s in samples] == ["def", "import", "class", "return"]
  # Cached: the second run reuses the tokenizer and the prepared dataset.
  again = _demo(tmp_path, "run2", 2)
  assert again.returncode == 0 and "already holds this dataset" in again.stderr
