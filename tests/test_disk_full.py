"""A full disk while a checkpoint or a dataset is written: the run stops with one clear line and a non-zero exit,
and the previous complete state stays usable (training resumes from the last complete checkpoint; an existing
dataset is untouched; nothing half-written is left).

On a real small file system where this host allows one (a tmpfs mounted in a private mount namespace: `unshare`,
as root or in a user namespace), and everywhere by injecting the OSError at the write.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys

import jax
import pytest

from maxlm.data import dataset, prepare, tokenizer
from maxlm.errors import RunFailed
from maxlm.training import checkpoint, loop

from conftest import make_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _namespace() -> list[str] | None:
  """An `unshare` prefix under which `mount -t tmpfs` works, or None."""
  if shutil.which("unshare") is None or shutil.which("mount") is None:
    return None
  for prefix in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
    probe = subprocess.run(
      [*prefix, "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d && umount $d && rmdir $d"],
      capture_output=True,
      timeout=30,
    )
    if probe.returncode == 0:
      return prefix
  return None


NAMESPACE = _namespace()
needs_tmpfs = pytest.mark.skipif(NAMESPACE is None, reason="no private mount namespace for a small tmpfs here")


def _on_small_disk(script: str, size: str, env: dict | None = None) -> subprocess.CompletedProcess:
  """Runs `script` with $DISK a fresh tmpfs of `size` (gone when the script ends: copy results out)."""
  wrapped = f'DISK=$(mktemp -d) && mount -t tmpfs -o size={size} tmpfs "$DISK" && export DISK && {script}'
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", **(env or {})}
  return subprocess.run(
    [*NAMESPACE, "sh", "-c", wrapped], cwd=REPO, capture_output=True, text=True, timeout=600, env=env
  )


TRAIN = (
  f"{sys.executable} -m maxlm train --config=configs/tiny.py --config.train.steps=40 --config.train.log_every=5 "
  "--config.checkpoint.every_steps=2 --config.checkpoint.keep=100 --config.metrics.tensorboard=false "
  "--config.metrics.peak_tflops=1"
)


@needs_tmpfs
def test_checkpoints_filling_the_disk_stop_the_run_which_resumes_elsewhere(tmp_path):
  # 12 MB holds a few 1.5 MB checkpoints of the tiny model, not 20 of them.
  proc = _on_small_disk(f'{TRAIN} --workdir="$DISK/run"; echo "rc=$?"; cp -a "$DISK/run" {tmp_path}/run', "12m")
  assert "rc=1" in proc.stdout, proc.stdout + proc.stderr
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert "Traceback" not in proc.stderr, proc.stderr
  assert lines[-1].startswith("maxlm train: stopped: not enough free space for the checkpoint of step"), lines[-1]
  complete = sorted(int(d) for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit())
  assert complete and complete[-1] < 40
  assert f"the checkpoint at step {complete[-1]} is complete" in lines[-1]
  assert not [d for d in os.listdir(tmp_path / "run" / "checkpoints") if not d.isdigit()]  # nothing half-written

  # Space freed (here: the run moved to a roomier disk): the same command resumes from the last complete checkpoint.
  resumed = subprocess.run(
    [*TRAIN.split(), f"--workdir={tmp_path}/run"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
  )
  assert resumed.returncode == 0, resumed.stderr
  assert f"resumed from the checkpoint at step {complete[-1]}" in resumed.stderr


@needs_tmpfs
def test_a_dataset_filling_the_disk_leaves_nothing_and_spares_the_old_one(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(40):
    lines = (" ".join(f"word{(i * 7 + j * 13 + k) % 997}" for k in range(100)) for j in range(30))
    (corpus / f"{i}.txt").write_text("\n".join(lines) + "\n")
  tok = tokenizer.train(iter([(corpus / "0.txt").read_text()]), vocab_size=280, output=str(tmp_path / "tok.model"))
  small = tmp_path / "small.txt"
  small.write_text("a small corpus that fits. " * 50)
  cli = f"{sys.executable} -m maxlm data prepare --tokenizer={tok.path} --dedup=none --filters=none --workers=1"
  script = (
    f'{cli} --input {small} --output="$DISK/old" && sha256sum "$DISK"/old/*/* > {tmp_path}/before && '
    f'{cli} --input {corpus} --output="$DISK/new"; echo "rc=$?"; '
    f'sha256sum "$DISK"/old/*/* > {tmp_path}/after; ls -a "$DISK" > {tmp_path}/listing'
  )
  proc = _on_small_disk(script, "256k")
  assert "rc=1" in proc.stdout, proc.stdout + proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
  assert last.startswith("maxlm data: stopped: no space left on the device"), last
  assert (tmp_path / "before").read_text() == (tmp_path / "after").read_text()
  assert set((tmp_path / "listing").read_text().split()) == {".", "..", "old"}  # no new/, no new.partial/


def test_an_asynchronous_checkpoint_write_failure_is_a_report(tmp_path, monkeypatch):
  """Orbax writes in the background: its error surfaces at the next save and becomes one report naming the last
  complete checkpoint (injected: the writer fails from the second save on)."""
  calls = []
  original = checkpoint.Checkpointer._save

  def failing(self, step, *args):
    calls.append(step)
    if len(calls) > 1:
      raise OSError(errno.ENOSPC, "No space left on device", os.path.join(self.directory, str(step)))
    return original(self, step, *args)

  monkeypatch.setattr(checkpoint.Checkpointer, "_save", failing)
  cfg = make_config(
    **{"train.steps": 8, "checkpoint.every_steps": 2, "metrics.tensorboard": False, "metrics.peak_tflops": 1.0}
  )
  with pytest.raises(RunFailed, match=r"no space left on the device: .*; the checkpoint at step 2 is complete: free"):
    loop.run(cfg, str(tmp_path), devices=jax.devices()[:1])
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_a_dataset_write_failure_leaves_no_partial_output(tmp_path, monkeypatch):
  corpus = tmp_path / "c.txt"
  corpus.write_text("some text to tokenize. " * 200)
  tok = tokenizer.train(iter([corpus.read_text()]), vocab_size=280, output=str(tmp_path / "tok.model"))

  def failing(self, ids):
    raise OSError(errno.ENOSPC, "No space left on device", os.path.join(self.directory, "tokens.bin"))

  monkeypatch.setattr(dataset.SplitWriter, "add", failing)
  with pytest.raises(OSError, match="No space left"):
    prepare.prepare([str(corpus)], tok.path, str(tmp_path / "out"), dedup="none", filters="none")
  assert sorted(os.listdir(tmp_path)) == ["c.txt", "tok.model"]


def test_a_failed_tokenizer_write_keeps_the_old_model(tmp_path, monkeypatch):
  corpus = tmp_path / "c.txt"
  corpus.write_text("some text to tokenize. " * 200)
  path = str(tmp_path / "tok.model")
  tokenizer.train(iter([corpus.read_text()]), vocab_size=280, output=path)
  digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
  real_replace = os.replace

  def failing_replace(src, dst):
    if dst == path:
      raise OSError(errno.ENOSPC, "No space left on device", dst)
    return real_replace(src, dst)

  monkeypatch.setattr(os, "replace", failing_replace)
  with pytest.raises(OSError):
    tokenizer.train(iter([corpus.read_text()]), vocab_size=290, output=path)
  assert hashlib.sha256(open(path, "rb").read()).hexdigest() == digest
  assert sorted(os.listdir(tmp_path)) == ["c.txt", "tok.model"]
