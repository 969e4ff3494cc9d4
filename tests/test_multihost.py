

def test_process_discovery_from_flags_and_cluster_variables():
  from maxlm import distributed
  from maxlm.config import ConfigError
  assert distributed.detect(None, None, None, environ={}) is None
  assert distributed.detect("10.0.0.2:8476", 4, 3, environ={}) == "explicit"
  assert distributed.detect("10.0.0.2:8476", 1, 0, environ={}) is None
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "16", "SLURM_PROCID": "3",
           "SLURM_LOCALID": "3"}
  assert distributed.detect(None, None, None, environ=slurm) == "SLURM"
  assert distributed.detect(None, None, None, environ={**slurm, "SLURM_NTASKS": "1"}) is None
  with pytest.raises(ConfigError, match="--num_processes, --process_id missing"):
    distributed.detect("10.0.0.2:8476", None, None, environ={})
  with pytest.raises(ConfigError, match="use HOST:PORT"):
    distributed.detect("10.0.0.2", 2, 0, environ={})


def test_cli_reports_incomplete_distributed_flags_in_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "maxlm", "train", "--config=configs/tiny.py", f"--workdir={tmp_path}",
                         "--coordinator=127.0.0.1:1234", "--num_processes=2"], cwd=REPO, capture_output=True,
                        text=True, timeout=120, env=cli_env(1))
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      "maxlm train: error: --process_id missing: pass --coordinator=HOST:PORT, --num_processes=N and --process_id=I "
      "together (the same HOST:PORT and N on every process)")
