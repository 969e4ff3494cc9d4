"""tools/tpu_vm.py --dry-run prints the gcloud command sequence, in order, and runs nothing."""

import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dry_run(*args):
  proc = subprocess.run(
    [sys.executable, "tools/tpu_vm.py", "--dry-run", "--name=exp1", "--zone=us-central2-b", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=60,
    env={**os.environ, "PATH": "/nonexistent"},
  )
  assert proc.returncode == 0, proc.stderr  # PATH without gcloud or git: a dry run must not call them.
  return [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]


def test_up_creates_copies_installs_and_runs_on_all_workers():
  cmds = dry_run(
    "up",
    "--accelerator=v4-16",
    "--runtime=tpu-ubuntu2204-base",
    "--",
    "--config=configs/llama_1b.py",
    "--workdir=/mnt/shared/run",
    "--config.train.steps=10",
  )
  zone = "--zone=us-central2-b"
  assert cmds[0] == [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "create",
    "exp1",
    "--accelerator-type=v4-16",
    "--version=tpu-ubuntu2204-base",
    zone,
  ]
  assert cmds[1][:3] == ["git", "-C", REPO] and cmds[1][3:5] == ["archive", "--format=tar.gz"]
  assert cmds[2] == [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "scp",
    "/tmp/maxlm-src.tar.gz",
    "exp1:maxlm-src.tar.gz",
    "--worker=all",
    zone,
  ]
  ssh = [c for c in cmds[3:] if c[3:5] == ["tpu-vm", "ssh"]]
  assert len(ssh) == 3 == len(cmds) - 3 and all("--worker=all" in c for c in ssh)
  remote = [next(w for w in c if w.startswith("--command="))[len("--command=") :] for c in ssh]
  assert "tar -xzf maxlm-src.tar.gz -C ~/maxlm" in remote[0]
  assert ".venv/bin/pip install -q -e '.[tpu]'" in remote[1]
  assert (
    "setsid nohup .venv/bin/maxlm train --config=configs/llama_1b.py --workdir=/mnt/shared/run "
    "--config.train.steps=10 > ~/maxlm-train.log" in remote[2]
  )


def test_queued_resource_create_and_delete():
  cmds = dry_run("--queued", "create", "--accelerator=v5litepod-16", "--runtime=v2-alpha-tpuv5-lite", "--spot")
  assert cmds == [
    [
      "gcloud",
      "compute",
      "tpus",
      "queued-resources",
      "create",
      "exp1-qr",
      "--node-id=exp1",
      "--accelerator-type=v5litepod-16",
      "--runtime-version=v2-alpha-tpuv5-lite",
      "--spot",
      "--zone=us-central2-b",
    ],
    [
      "gcloud",
      "compute",
      "tpus",
      "queued-resources",
      "describe",
      "exp1-qr",
      "--format=value(state.state)",
      "--zone=us-central2-b",
    ],
  ]
  assert dry_run("--queued", "delete") == [
    ["gcloud", "compute", "tpus", "queued-resources", "delete", "exp1-qr", "--force", "--quiet", "--zone=us-central2-b"]
  ]
  assert dry_run("delete") == [
    ["gcloud", "compute", "tpus", "tpu-vm", "delete", "exp1", "--quiet", "--zone=us-central2-b"]
  ]


def test_logs_and_fetch():
  [logs] = dry_run("logs")
  assert logs[3:6] == ["tpu-vm", "ssh", "exp1"] and "--worker=all" in logs
  assert 'tail -n +1 -F ~/maxlm-train.log | sed "s/^/$(hostname): /"' in logs[-2]
  [fetch] = dry_run("fetch", "--to=runs/exp1", "--workdir=/mnt/shared/run")
  assert fetch[3:] == [
    "tpu-vm",
    "scp",
    "exp1:~/maxlm-train.log",
    "exp1:/mnt/shared/run/metrics.jsonl",
    "exp1:/mnt/shared/run/config.json",
    "runs/exp1",
    "--worker=0",
    "--zone=us-central2-b",
  ]
