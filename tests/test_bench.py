"""`maxlm bench`: the record it writes and the table row it appends."""

import json
import os
import subprocess
import sys

import pytest

from conftest import cli_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmark(script: str, *args: str, timeout: int = 300) -> None:
  """Runs benchmarks/`script` with `args` from the repository root; fails the test on a non-zero exit."""
  proc = subprocess.run(
    [sys.executable, f"benchmarks/{script}", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
    env=cli_env(),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_bench_writes_a_record_and_appends_a_row(tmp_path):
  args = [
    sys.executable,
    "-m",
    "maxlm",
    "bench",
    "--config=configs/tiny.py",
    "--steps=2",
    "--warmup=1",
    f"--results_dir={tmp_path}",
    "--config.train.loss_chunk=16",
  ]
  proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300, env=cli_env())
  assert proc.returncode == 0, proc.stderr
  record = json.loads((tmp_path / "bench_cpu_tiny.json").read_text())
  from maxlm.perf import bench

  bench.write(record, str(tmp_path))  # A second run appends a row under the same header.
  assert record == json.loads(proc.stdout.strip().splitlines()[-1])
  assert record["config"] == "tiny" and record["timed_steps"] == 2 and record["loss_chunk"] == 16
  assert record["tokens_per_step"] == 16 * 64
  assert record["flops_per_token"] == 737280.0  # tiny's hand count (tests/test_flops.py)
  for key in (
    "step_time_s_median",
    "step_time_s_pipelined",
    "tokens_per_sec_per_device",
    "tflops_per_device",
    "mfu",
    "peak_memory_bytes",
    "compile_s",
  ):
    assert record[key] > 0, key
  assert abs(record["tflops_per_device"] / record["peak_tflops_per_device"] - record["mfu"]) < 1e-12
  rows = [line for line in (tmp_path / "mfu.md").read_text().splitlines() if line.startswith("| 20")]
  assert len(rows) == 2 and rows[0] == rows[1] and "| tiny |" in rows[0] and "1× cpu" in rows[0]
  assert (tmp_path / "mfu.md").read_text().count("| date |") == 1


def test_bench_config_error_is_one_line(tmp_path):
  proc = subprocess.run(
    [sys.executable, "-m", "maxlm", "bench", "--config=configs/tiny.py", "--steps=0"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    env=cli_env(),
  )
  assert proc.returncode == 2 and proc.stderr.startswith("maxlm bench: error:") and "Traceback" not in proc.stderr


def test_nanogpt_comparison_runs_both_sides_on_the_same_shape(tmp_path):
  pytest.importorskip("torch")
  run_benchmark(
    "nanogpt_compare.py",
    "--config=tiny",
    "--batch=4",
    "--steps=1",
    "--rounds=2",
    "--warmup=1",
    "--no-compile",
    f"--results_dir={tmp_path}",
    timeout=600,
  )
  result = json.loads((tmp_path / "nanogpt_compare_cpu_tiny.json").read_text())
  assert result["torch"]["params"] == result["params"] == 115_008  # The script refuses differing shapes.
  # Same initialisation scheme: both start near the uniform-prediction loss ln V.
  assert abs(result["torch"]["first_loss"] - result["loss_at_init_ln_v"]) < 0.3
  # Both sides ran every round (one step each); the ratio is the median of the rounds' ratios.
  assert result["maxlm"]["timed_steps"] == 2 and len(result["round_ratios"]) == 2
  assert result["maxlm_over_torch"] == pytest.approx(sum(result["round_ratios"]) / 2)


def test_matmul_floor_times_every_projection_in_three_orientations(tmp_path):
  run_benchmark(
    "matmul_floor.py", "--config=tiny", "--batch=2", "--rounds=1", "--repeats=1", f"--results_dir={tmp_path}"
  )
  result = json.loads((tmp_path / "matmul_floor_cpu_tiny.json").read_text())
  rows = result["products"]
  # q, k, v, o, gate+up, down per layer and the head, each forward, input gradient and weight gradient.
  assert len(rows) == 21 and {r["kind"] for r in rows} == {"forward", "input_grad", "weight_grad"}
  assert result["gflop_per_step"] == pytest.approx(
    sum(2 * r["M"] * r["K"] * r["N"] * r["runs_per_step"] for r in rows) / 1e9
  )
  jax_sum = sum(r["jax_s"][0] * r["runs_per_step"] for r in rows)
  assert result["step_matmul_s"]["jax"] == pytest.approx(jax_sum)


@pytest.mark.parametrize("scan", [True, False])
def test_profile_ops_accounts_for_the_step_matmuls(tmp_path, scan):
  """The trace joined to the HLO finds every matmul of the step: their FLOPs (counted once per event, so a
  scanned layer's dot counts per layer) match the model's analytic count."""
  run_benchmark(
    "profile_ops.py",
    "--config=configs/tiny.py",
    "--steps=1",
    f"--config.model.scan_layers={str(scan).lower()}",
    f"--results_dir={tmp_path}",
  )
  r = json.loads((tmp_path / "profile_cpu_tiny.json").read_text())
  assert r["matmul_gflop_per_step"] * 1e9 == pytest.approx(r["flops_per_step_model"], rel=0.1)
  assert {"matmul", "elementwise fusion"} <= set(r["kinds_ms_per_step"])
  assert sum(r["kinds_ms_per_step"].values()) == pytest.approx(r["op_ms_per_step"])
  ms = [m["ms_per_step"] for m in r["matmuls"]]
  assert ms == sorted(ms, reverse=True) and all(m["gflop_per_step"] > 0 for m in r["matmuls"])
  assert r["host"] and r["overrides"] == [f"--config.model.scan_layers={str(scan).lower()}"]
