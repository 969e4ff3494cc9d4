"""Multi-process training: real `maxlm train` processes joined by `jax.distributed` on 127.0.0.1 (gloo CPU
collectives), 2 processes x 4 fake CPU devices against one process with 8 devices.

Invariants: the 2-process run computes the 1-process losses (rtol 1e-5), through a preemption (SIGTERM to ONE
process stops both at the same step with one checkpoint, exit 0) and a resume onto a multi-slice-style mesh
(`mesh.dcn_data=2`: the data axis spans the processes over "DCN"); a process that dies ends the others
with JAX's error within a bounded time.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from maxlm.training import loop

from conftest import cli_env, make_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40
RUN = {
  "train.steps": STEPS,
  "train.log_every": 1,
  "train.eval_every": 0,
  "metrics.tensorboard": False,
  "metrics.peak_tflops": 1.0,
  "checkpoint.every_steps": 100,
}
HEARTBEAT_S = 10
START_TIMEOUT_S = 240  # Two processes import JAX and compile on two shared cores.


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(workdir, *extra, num_processes=2, log_dir=None):
  """`maxlm train` as `num_processes` processes with 4 fake CPU devices each; returns (procs, log paths)."""
  port, procs, logs = free_port(), [], []
  overrides = [f"--config.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in RUN.items()]
  log_dir = log_dir or workdir
  os.makedirs(log_dir, exist_ok=True)
  for i in range(num_processes):
    log = os.path.join(log_dir, f"process_{i}.log")
    logs.append(log)
    cmd = [
      sys.executable,
      "-m",
      "maxlm",
      "train",
      "--config=configs/tiny.py",
      f"--workdir={workdir}",
      *overrides,
      *extra,
      f"--coordinator=127.0.0.1:{port}",
      f"--num_processes={num_processes}",
      f"--process_id={i}",
      f"--heartbeat_timeout_s={HEARTBEAT_S}",
      "--init_timeout_s=120",
    ]
    with open(log, "w") as f:
      procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=cli_env(4)))
  return procs, logs


def kill_all(procs):
  for p in procs:
    if p.poll() is None:
      p.kill()
    p.wait()


def wait_for_step(workdir, step, procs, timeout=START_TIMEOUT_S):
  path, deadline = os.path.join(workdir, "metrics.jsonl"), time.time() + timeout
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if os.path.exists(path) and sum(1 for _ in open(path)) >= step:
      return
    time.sleep(0.05)
  raise AssertionError(f"process 0 did not log step {step} (exit codes {[p.poll() for p in procs]})")


def losses_by_step(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def read(path):
  with open(path) as f:
    return f.read()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Per-step losses of one process with 8 devices."""
  assert jax.device_count() == 8
  records = loop.run(make_config(num_devices=8, **RUN), str(tmp_path_factory.mktemp("one_process")))
  return {r["step"]: r["loss"] for r in records}


def test_sigterm_to_one_process_stops_both_then_resume_matches_one_process(tmp_path, reference):
  workdir = str(tmp_path / "run")
  procs, logs = launch(workdir, log_dir=str(tmp_path))
  try:
    wait_for_step(workdir, 3, procs)
    procs[1].send_signal(signal.SIGTERM)  # Only process 1 is preempted; process 0 must learn it from the all-gather.
    codes = [p.wait(timeout=120) for p in procs]
  finally:
    kill_all(procs)
  assert codes == [0, 0], [read(log)[-3000:] for log in logs]
  stopped_at = max(losses_by_step(workdir))
  assert stopped_at < STEPS, "the run finished before the signal: nothing was tested"
  assert f"stopped by another process's signal after step {stopped_at}: a checkpoint was saved" in read(logs[0])
  checkpoints = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert checkpoints == [stopped_at]  # One checkpoint, at the stop step (periodic saves are every 100 steps).
  data = sorted(os.listdir(os.path.join(workdir, "checkpoints", str(stopped_at), "data")))
  # Both processes saved that step: each wrote its iterator state into it.
  assert [f for f in data if f.startswith("process_")] == ["process_0-of-2.json", "process_1-of-2.json"]

  # Resume with the data axis laid out as 2 slices (here: processes) x 4 devices, the multi-slice path.
  procs, logs = launch(workdir, "--config.mesh.data=4", "--config.mesh.dcn_data=2", log_dir=str(tmp_path / "resume"))
  try:
    codes = [p.wait(timeout=START_TIMEOUT_S) for p in procs]
  finally:
    kill_all(procs)
  assert codes == [0, 0], [read(log)[-3000:] for log in logs]
  assert f"resumed from the checkpoint at step {stopped_at}" in read(logs[0])
  resumed = losses_by_step(workdir)
  assert sorted(resumed) == list(range(1, STEPS + 1))
  np.testing.assert_allclose(
    [resumed[s] for s in range(1, STEPS + 1)], [reference[s] for s in range(1, STEPS + 1)], rtol=1e-5
  )
  assert reference[STEPS] < reference[1]  # It trained.


def test_context_axis_across_processes_matches_one_process(tmp_path, reference):
  """mesh.context=8 over 2 processes x 4 devices: both processes feed the same rows (maxlm.parallel.mesh.HostRows),
  their devices holding halves of every sequence; the losses are one process's with data parallelism."""
  workdir = str(tmp_path / "run")
  procs, logs = launch(workdir, "--config.mesh.data=1", "--config.mesh.context=8")
  try:
    codes = [p.wait(timeout=START_TIMEOUT_S) for p in procs]
  finally:
    kill_all(procs)
  assert codes == [0, 0], [read(log)[-3000:] for log in logs]
  losses = losses_by_step(workdir)
  np.testing.assert_allclose(
    [losses[s] for s in range(1, STEPS + 1)], [reference[s] for s in range(1, STEPS + 1)], rtol=1e-4
  )


@pytest.mark.parametrize("comm_dtype", ["float32", "int8"])
def test_diloco_with_a_replica_per_process_matches_one_process(tmp_path, comm_dtype):
  """train.diloco.replicas=2 over 2 processes x 4 devices logs the losses of the same DiLoCo run in one process
  with 8 devices. The processes are the "slices": validation puts the replicas across them (mesh.dcn_diloco=2),
  and the drifts go between processes in comm_dtype (int8: all-to-all and all-gather)."""
  diloco = {"train.diloco.replicas": 2, "train.diloco.sync_every": 5, "train.diloco.comm_dtype": comm_dtype}
  one = loop.run(make_config(num_devices=8, **RUN, **diloco, **{"mesh.data": 4}), str(tmp_path / "one_process"))
  workdir = str(tmp_path / "run")
  procs, logs = launch(workdir, *(f"--config.{k}={v}" for k, v in diloco.items()))
  try:
    codes = [p.wait(timeout=START_TIMEOUT_S) for p in procs]
  finally:
    kill_all(procs)
  assert codes == [0, 0], [read(log)[-3000:] for log in logs]
  with open(os.path.join(workdir, "config.json")) as f:
    mesh = json.load(f)["mesh"]
  assert (mesh["dcn_diloco"], mesh["diloco"], mesh["data"]) == (2, 1, 4)
  losses = losses_by_step(workdir)
  np.testing.assert_allclose(
    [losses[s] for s in range(1, STEPS + 1)], [r["loss"] for r in one if "loss" in r][:STEPS], rtol=1e-5
  )


def test_a_dead_process_ends_the_others_within_the_heartbeat_timeout(tmp_path):
  workdir = str(tmp_path / "run")
  procs, logs = launch(workdir, "--config.train.steps=100000", "--config.checkpoint.every_steps=0")
  try:
    wait_for_step(workdir, 2, procs)
    procs[1].kill()  # SIGKILL: no goodbye. (If process 0, the coordinator, dies, the others fail at once.)
    killed = time.monotonic()
    code = procs[0].wait(timeout=HEARTBEAT_S + 110)  # Generous for a loaded machine, but bounded.
    waited = time.monotonic() - killed
  finally:
    kill_all(procs)
  assert code != 0
  out = read(logs[0])
  assert "another task died" in out and "stopped sending heartbeats" in out, out[-3000:]
  print(f"process 0 exited {waited:.1f} s after process 1 was killed (heartbeat timeout {HEARTBEAT_S} s)")


def test_process_discovery_from_flags_and_cluster_variables():
  from maxlm.errors import UserError
  from maxlm.parallel import distributed

  assert distributed.detect(None, None, None, environ={}) is None
  assert distributed.detect("10.0.0.2:8476", 4, 3, environ={}) == "explicit"
  assert distributed.detect("10.0.0.2:8476", 1, 0, environ={}) is None
  slurm = {
    "SLURM_JOB_ID": "7",
    "SLURM_STEP_NODELIST": "n[1-2]",
    "SLURM_NTASKS": "16",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "3",
  }
  assert distributed.detect(None, None, None, environ=slurm) == "SLURM"
  assert distributed.detect(None, None, None, environ={**slurm, "SLURM_NTASKS": "1"}) is None
  with pytest.raises(UserError, match="--num_processes, --process_id missing"):
    distributed.detect("10.0.0.2:8476", None, None, environ={})
  with pytest.raises(UserError, match="use HOST:PORT"):
    distributed.detect("10.0.0.2", 2, 0, environ={})


def test_cli_reports_incomplete_distributed_flags_in_one_line(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "maxlm",
      "train",
      "--config=configs/tiny.py",
      f"--workdir={tmp_path}",
      "--coordinator=127.0.0.1:1234",
      "--num_processes=2",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    env=cli_env(1),
  )
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
    "maxlm train: error: --process_id missing: pass --coordinator=HOST:PORT, --num_processes=N and --process_id=I "
    "together (the same HOST:PORT and N on every process)"
  )
