"""gs:// workdirs and datasets, against a GCS emulator the tests start on 127.0.0.1 (tests/gcs_emulator.py): the
storage layer, a hard-killed run resumed bitwise from a bucket, a corrupt checkpoint object set aside, a dataset
prepared into a bucket and trained on, and eval, sample and convert on bucket workdirs."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from google.cloud import storage as gcs_client

from maxlm import cli, storage
from maxlm.data import prepare, tokenizer
from maxlm.errors import UserError
from maxlm.training import loop

import test_checkpoint
from conftest import cli_env, make_config
from gcs_emulator import BUCKET
from test_checkpoint import RUN  # 8 steps, a checkpoint every 2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
  """A fresh local cache (copies of bucket datasets, staging) per test."""
  monkeypatch.setenv("MAXLM_CACHE", str(tmp_path / "cache"))
  return tmp_path / "cache"


def bucket(gcs):
  return gcs_client.Client(project="test", client_options={"api_endpoint": gcs.url}).bucket(BUCKET)


def losses(workdir) -> dict[int, float]:
  lines = storage.read_text(storage.join(str(workdir), "metrics.jsonl")).splitlines()
  return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_paths_files_and_copies(gcs, cache):
  root = f"gs://{BUCKET}/basics"
  storage.write_atomically(root + "/a/b.json", '{"x": 1}')
  storage.write_atomically(root + "/a/c/d.bin", b"\x00" * 1000)
  assert json.loads(storage.read_text(root + "/a/b.json")) == {"x": 1}
  assert storage.isdir(root + "/a") and storage.isfile(root + "/a/b.json") and not storage.exists(root + "/z")
  assert storage.listdir(root + "/a") == ["b.json", "c"] and storage.listdir(root + "/missing") == []
  storage.makedirs(root + "/empty")  # nothing to do on a bucket
  assert storage.free_bytes(root) is None

  copy = storage.local_copy(root + "/a", "test data")
  assert open(os.path.join(copy, "c", "d.bin"), "rb").read() == b"\x00" * 1000
  assert storage.local_copy(root + "/a", "test data") == copy  # made once, reused
  storage.write_atomically(root + "/a/b.json", '{"x": 22}')  # another content: another copy
  assert json.load(open(os.path.join(storage.local_copy(root + "/a", "test data"), "b.json"))) == {"x": 22}
  assert open(storage.local_copy(root + "/a/b.json", "file")).read() == '{"x": 22}'
  with pytest.raises(UserError, match=r"gs://maxlm-test/nothing: no such test data"):
    storage.local_copy(f"gs://{BUCKET}/nothing", "test data")

  storage.move_tree(root + "/a", root + "/moved")
  assert gcs.objects("basics/") == ["basics/moved/b.json", "basics/moved/c/d.bin"]
  with pytest.raises(UserError, match=r"s3:// paths are not supported; use a local path or gs://bucket/dir"):
    storage.is_remote("s3://bucket/run")


def test_a_missing_gcsfs_is_a_one_line_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "gcsfs", None)
  with pytest.raises(UserError, match=r"gs:// paths need the gcs extra: pip install 'maxlm\[gcs\]'"):
    storage.resolve("gs://bucket/run")


def test_cli_refuses_a_missing_bucket_in_one_line(gcs, capsys):
  code = cli.main(["train", "--config=configs/tiny.py", "--workdir=gs://no-such-bucket/run"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and err[-1].endswith("no bucket gs://no-such-bucket (or no access to it); create it or pass another")


def train_cli(workdir):
  """test_checkpoint's command line, shortened to 16 steps with a checkpoint every 2 and TensorBoard on."""
  overrides = ("--config.train.steps=16", "--config.checkpoint.every_steps=2", "--config.metrics.tensorboard=true")
  return test_checkpoint.cli(workdir, *overrides)


def test_hard_kill_then_resume_from_a_bucket_is_bitwise(gcs, tmp_path):
  subprocess.run(train_cli(tmp_path / "local"), cwd=REPO, check=True, capture_output=True, timeout=300, env=cli_env())
  workdir = f"gs://{BUCKET}/killed"
  proc = subprocess.Popen(
    train_cli(workdir), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env()
  )
  deadline = time.time() + 240
  while "killed/checkpoints/6/commit_success.txt" not in gcs.objects("killed/checkpoints/6/") and proc.poll() is None:
    assert time.time() < deadline, "no checkpoint at step 6"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)  # while a later step runs, or its checkpoint is being written
  proc.wait()
  assert max(losses(workdir)) < 16
  # A save cut off by the kill leaves objects without Orbax's commit marker: never taken for a checkpoint.
  storage.write_atomically(f"{workdir}/checkpoints/14/state/_METADATA", "{")
  resumed = subprocess.run(train_cli(workdir), cwd=REPO, capture_output=True, text=True, timeout=300, env=cli_env())
  assert resumed.returncode == 0, resumed.stderr
  assert "resumed from the checkpoint at step" in resumed.stderr
  assert losses(workdir) == losses(tmp_path / "local")  # bitwise, every step once
  names = gcs.objects("killed/")
  assert {"killed/config.json", "killed/summary.json"} <= set(names)
  assert any(n.startswith("killed/tb/events.out.tfevents") for n in names)
  assert json.loads(storage.read_text(workdir + "/summary.json"))["status"] == "finished"


def test_a_corrupt_checkpoint_object_is_set_aside(gcs, caplog):
  reference = losses_of_run(None)
  workdir = f"gs://{BUCKET}/corrupt"
  loop.run(make_config(**RUN), workdir, devices=jax.devices()[:1])  # checkpoints 4, 6, 8 kept (keep=3)
  blobs = [b for b in bucket(gcs).list_blobs(prefix="corrupt/checkpoints/8/state/") if "/d/" in b.name]
  biggest = max(blobs, key=lambda b: b.size)
  data = biggest.download_as_bytes()
  biggest.upload_from_string(data[: len(data) // 2])
  with caplog.at_level(logging.INFO, logger="maxlm"):
    records = loop.run(make_config(**RUN), workdir, devices=jax.devices()[:1])
  assert "checkpoint step 8 is unreadable" in caplog.text
  assert "resumed from the checkpoint at step 6" in caplog.text
  assert [(r["step"], r["loss"]) for r in records] == [(7, reference[7]), (8, reference[8])]
  assert any(n.startswith("corrupt/checkpoints_corrupt/8/state/") for n in gcs.objects("corrupt/checkpoints_corrupt/"))
  assert storage.listdir(workdir + "/checkpoints") == ["4", "6", "8"]  # 8 written again by the resumed run


_REFERENCE = {}


def losses_of_run(data_path, **overrides):
  """Per-step losses of RUN in a fresh local workdir (memoised per data path)."""
  key = (data_path, tuple(sorted(overrides.items())))
  if key not in _REFERENCE:
    import tempfile

    workdir = tempfile.mkdtemp(prefix="maxlm_ref_")
    cfg = dict(RUN, **overrides)
    if data_path:
      cfg.update({"data.source": "prepared", "data.path": data_path})
    loop.run(make_config(**cfg), workdir, devices=jax.devices()[:1])
    _REFERENCE[key] = losses(workdir)
  return _REFERENCE[key]


def test_prepare_into_a_bucket_then_train_eval_sample_and_convert(gcs, tmp_path, cache, capsys):
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "x = 1", "def f():", "café", "日本語"]
  docs = [" ".join(rng.choice(words, size=rng.integers(8, 40))) for _ in range(60)]
  with open(tmp_path / "docs.jsonl", "w") as f:
    f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
  tok = tokenizer.train(iter(docs), vocab_size=300, output=str(tmp_path / "tok.model"))
  args = dict(val_fraction=0.2, dedup="none", filters="none")
  prepare.prepare([str(tmp_path / "docs.jsonl")], tok.path, str(tmp_path / "data"), **args)
  data = f"gs://{BUCKET}/datasets/docs"
  assert cli.main(["data", "prepare", "--input", str(tmp_path / "docs.jsonl"), "--tokenizer", tok.path,
                   "--output", data, "--val_fraction=0.2", "--dedup=none", "--filters=none"]) == 0  # fmt: skip
  for name in ("manifest.json", "train/tokens.bin", "train/index.npy", "val/tokens.bin", "val/index.npy"):
    assert storage.Path(f"{data}/{name}").read_bytes() == (tmp_path / "data" / name).read_bytes(), name
  assert not os.listdir(cache / "staging")  # the staging copy is gone once uploaded
  assert cli.main(["data", "prepare", "--input", str(tmp_path / "docs.jsonl"), "--tokenizer", tok.path,
                   "--output", data, "--val_fraction=0.2", "--dedup=none", "--filters=none"]) == 0  # fmt: skip
  assert "already holds this dataset" in capsys.readouterr().err

  overrides = {"model.vocab_size": tok.vocab_size, "data.seq_len": 16, "train.eval_every": 4, "train.eval_batches": 2}
  workdir = f"gs://{BUCKET}/runs/prepared"
  cfg = make_config(**{**RUN, **overrides, "data.source": "prepared", "data.path": data})
  records = loop.run(cfg, workdir, devices=jax.devices()[:1])
  assert {r["step"]: r["loss"] for r in records} == losses_of_run(str(tmp_path / "data"), **overrides)
  assert len(os.listdir(cache / "remote")) == 1  # one local copy of the dataset, read by train and eval

  assert cli.main(["eval", f"--workdir={workdir}"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["rows"] > 0 and np.isfinite(result["loss"])
  assert cli.main(["sample", f"--workdir={workdir}", "--prompt", "alpha", "--max_new_tokens=4", "--temperature=0"]) == 0
  assert len(json.loads(capsys.readouterr().out)["tokens"]) == 4

  exported = f"gs://{BUCKET}/exports/hf"
  assert cli.main(["convert", "to-hf", f"--workdir={workdir}", f"--out={exported}"]) == 0
  assert {"exports/hf/config.json", "exports/hf/model.safetensors", "exports/hf/tokenizer.model"} <= set(
    gcs.objects("exports/hf/")
  )
  imported = f"gs://{BUCKET}/runs/imported"
  assert cli.main(["convert", "from-hf", f"--hf_dir={exported}", f"--workdir={imported}"]) == 0
  assert cli.main(["convert", "to-hf", f"--workdir={imported}", f"--out={tmp_path / 'again'}"]) == 0
  capsys.readouterr()
  first = storage.Path(f"{exported}/model.safetensors").read_bytes()
  assert (tmp_path / "again" / "model.safetensors").read_bytes() == first  # a bucket round trip is exact


def test_two_processes_share_a_bucket_workdir_without_a_shared_disk(gcs, tmp_path):
  """2 processes x 4 devices to gs://, stopped at step 4 with a checkpoint and resumed: the losses of one process
  with 8 devices, and each process's data position saved in the bucket."""
  from test_multihost import kill_all, launch, read

  workdir = f"gs://{BUCKET}/two"
  steps = ["--config.train.steps=8", "--config.checkpoint.every_steps=4"]
  for extra, logs_dir in ((["--stop_at_step=4"], "first"), ([], "second")):
    procs, logs = launch(workdir, *steps, *extra, log_dir=str(tmp_path / logs_dir))
    try:
      codes = [p.wait(timeout=300) for p in procs]
    finally:
      kill_all(procs)
    assert codes == [0, 0], [read(log)[-3000:] for log in logs]
  assert "resumed from the checkpoint at step 4" in read(logs[0])
  assert {"two/checkpoints/4/data/process_0-of-2.json", "two/checkpoints/4/data/process_1-of-2.json"} <= set(
    gcs.objects("two/checkpoints/4/")
  )
  one = make_config(num_devices=8, **{**RUN, "train.steps": 8, "checkpoint.every_steps": 4})
  expected = {r["step"]: r["loss"] for r in loop.run(one, str(tmp_path / "one"))}
  got = losses(workdir)
  np.testing.assert_allclose([got[s] for s in range(1, 9)], [expected[s] for s in range(1, 9)], rtol=1e-5)


def test_tokenizer_and_inputs_from_a_bucket_and_local_only_commands(gcs, tmp_path, capsys):
  docs = "\n".join(f"line {i} of the text, with words {i * 7} and more" for i in range(300))
  storage.write_atomically(f"gs://{BUCKET}/raw/docs.txt", docs)
  assert cli.main(["tokenizer", "train", f"--input=gs://{BUCKET}/raw", "--vocab_size=300",
                   f"--output=gs://{BUCKET}/tok/tok.model"]) == 0  # fmt: skip
  tok = tokenizer.Tokenizer(f"gs://{BUCKET}/tok/tok.model")
  assert tok.vocab_size == 300 and tok.decode(tok.encode("line 7 of")) == "line 7 of"
  capsys.readouterr()
  code = cli.main(["sweep", "--sweep=configs/sweeps/lr_width.py", f"--workdir=gs://{BUCKET}/sweep"])
  assert code == 2
  assert (
    capsys.readouterr()
    .err.strip()
    .splitlines()[-1]
    .endswith("sweeps keep their outputs on a local or shared disk; pass a local directory")
  )


def test_rollback_restores_from_a_bucket(gcs):
  workdir = f"gs://{BUCKET}/rollback"
  local = losses_of_run(None, **{"train.guard.policy": "rollback", "train.inject_nan_at_step": 7})
  loop.run(
    make_config(**{**RUN, "train.guard.policy": "rollback", "train.inject_nan_at_step": 7}),
    workdir,
    devices=jax.devices()[:1],
  )
  lines = storage.read_text(workdir + "/metrics.jsonl").splitlines()
  assert {"step": 7, "event": "rollback", "to_step": 6, "data_skipped_to": 8} in map(json.loads, lines)
  assert losses(workdir) == local  # the same trajectory as the local run's rollback


def test_a_profile_trace_is_uploaded_to_a_bucket(gcs, cache):
  workdir = f"gs://{BUCKET}/profiled"
  cfg = make_config(**{**RUN, "train.steps": 4, "checkpoint.every_steps": 0, "metrics.profile_steps": "2-3"})
  loop.run(cfg, workdir, devices=jax.devices()[:1])
  assert len([n for n in gcs.objects("profiled/profile/") if n.endswith(".xplane.pb")]) == 1
  assert not os.listdir(cache / "staging")  # the local trace and metrics mirror are gone
