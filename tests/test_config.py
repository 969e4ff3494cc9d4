"""Config loading and validation: every user error is one line naming the key, exit code 2, no traceback."""

import os
import subprocess
import sys

import pytest

from configs import base
from maxlm import config
from maxlm.errors import UserError

from conftest import make_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_named_configs_load_and_validate():
  for name in ("tiny", "cpu_10m", "gpt2_124m", "llama_1b", "llama3_8b"):
    cfg = config.load([f"--config={REPO}/configs/{name}.py"])
    config.validate(cfg, num_devices=8)


def test_choice_lists_match_the_code_that_acts_on_them():
  from maxlm.model import attention, transformer
  from maxlm.parallel import context
  from maxlm.training import optim

  assert set(attention.IMPLEMENTATIONS) == set(base.ATTENTION) - {"auto"}  # auto is resolved by validate
  assert set(transformer.REMAT_POLICIES) == set(base.REMAT) - {"none"}
  assert context.VARIANTS == base.CONTEXT_ATTENTION  # none: no jax.checkpoint at all
  assert set(optim.SCHEDULES) == set(base.SCHEDULES)
  flat = config.flat_keys(base.get_config())
  for key, choices in base.CHOICES.items():
    assert flat[key] in choices, key
  with pytest.raises(UserError, match=r"model.remat='some' is not one of none, full, dots, dots_no_batch"):
    make_config(**{"model.remat": "some"})


def test_llama3_8b_has_the_real_shapes():
  from maxlm.model import flops

  cfg = config.validate(config.load([f"--config={REPO}/configs/llama3_8b.py"]), num_devices=1)
  assert 8.0e9 < flops.param_count(cfg.model) < 8.1e9  # Llama 3 8B: 8.03B parameters.


def test_overrides_are_typed():
  cfg = config.load(
    [
      f"--config={REPO}/configs/tiny.py",
      "--config.model.num_layers=3",
      "--config.optim.lr=1e-2",
      "--config.model.qk_norm=true",
      "--config.model.remat=full",
    ]
  )
  assert (cfg.model.num_layers, cfg.optim.lr, cfg.model.qk_norm, cfg.model.remat) == (3, 1e-2, True, "full")


@pytest.mark.parametrize(
  "args, expected",
  [
    (["--config.model.num_layer=3"], "unknown config key 'model.num_layer': did you mean 'model.num_layers'?"),
    (["--config.modle.num_layers=3"], "unknown config key 'modle.num_layers': did you mean 'model.num_layers'?"),
    (["--config.model.num_layers=abc"], "--config.model.num_layers=abc"),
    (["--config.model.qk_norm=maybe"], "--config.model.qk_norm=maybe"),
  ],
)
def test_bad_overrides(args, expected):
  with pytest.raises(UserError) as e:
    config.load([f"--config={REPO}/configs/tiny.py", *args])
  assert expected in str(e.value)
  assert "\n" not in str(e.value)


def test_missing_config_file():
  with pytest.raises(UserError, match="no such file"):
    config.load(["--config=configs/nope.py"])


@pytest.mark.parametrize(
  "overrides, expected",
  [
    ({"model.d_model": 100, "model.num_heads": 3}, "model.d_model=100 is not divisible by model.num_heads=3"),
    ({"model.num_heads": 4, "model.num_kv_heads": 3}, "model.num_heads=4 is not divisible by model.num_kv_heads=3"),
    ({"model.d_model": 60, "model.num_heads": 4}, "RoPE needs an even head_dim"),
    ({"train.global_batch": 12}, "not divisible by the data-parallel size mesh.data*mesh.fsdp*mesh.expert=8"),
    ({"train.global_batch": 16, "train.microbatches": 3}, "not divisible by train.microbatches=3"),
    ({"mesh.data": 3}, "multiply to 3 but there are 8 devices"),
    ({"mesh.dcn_data": 2}, "mesh.dcn_data*mesh.dcn_fsdp=2 but the devices form 1 slice(s)"),
    ({"mesh.dcn_fsdp": 0}, "mesh.dcn_fsdp=0 must be >= 1"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, "at most one mesh axis may fill"),
    ({"mesh.data": -1, "mesh.fsdp": 3}, "cannot fill 8 devices"),
    (
      {"mesh.data": 2, "mesh.tensor": 4, "model.num_kv_heads": 2},
      "model.num_kv_heads=2 is not divisible by mesh.tensor=4",
    ),
    ({"model.remat": "some"}, "model.remat='some' is not one of none, full, dots, dots_no_batch"),
    ({"model.num_layers": 2.5}, "model.num_layers=2.5 has type float; expected int"),
    ({"optim.lr": "fast"}, "optim.lr='fast' has type str; expected float"),
    ({"train.steps": 0}, "train.steps=0 must be >= 1"),
    ({"data.source": "tokens"}, "data.source='tokens' needs data.path"),
    ({"data.source": "tokens", "data.path": "/nonexistent.bin"}, "no such file"),
  ],
)
def test_validation_errors(overrides, expected):
  with pytest.raises(UserError) as e:
    make_config(num_devices=8, **overrides)
  assert expected in str(e.value)
  assert "\n" not in str(e.value)


def test_unknown_key_in_config_file():
  cfg = base.get_config()
  cfg.train.stpes = 10
  with pytest.raises(UserError, match="unknown config key 'train.stpes': did you mean 'train.steps'"):
    config.validate(cfg, num_devices=1)


def test_mesh_fill_and_dtype_resolution():
  cfg = make_config(num_devices=8, **{"mesh.data": 2, "mesh.fsdp": -1, "mesh.tensor": 2})
  assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (2, 2, 2)
  assert cfg.model.compute_dtype == "float32"
  gpu = config.validate(base.get_config(), num_devices=1, platform="gpu")
  assert gpu.model.compute_dtype == "bfloat16"


@pytest.mark.parametrize(
  "args, expected",
  [
    (["--config=configs/tiny.py", "--config.model.num_layer=3", "--workdir=W"], "did you mean 'model.num_layers'?"),
    (
      ["--config", "configs/tiny.py", "--config.model.d_model=65", "--workdir", "W"],
      "model.d_model=65 is not divisible",
    ),
    (["--config=configs/tiny.py"], "missing --workdir"),
    (["--workdir=W"], "missing --config"),
    (["--config=configs/nope.py", "--workdir=W"], "--config=configs/nope.py: no such file"),
    (["--config=configs/tiny.py", "--wrkdir=W"], "bad argument: Unknown command line flag 'wrkdir'"),
  ],
)
def test_cli_config_errors_exit_2_with_one_line(args, expected, tmp_path):
  args = [a.replace("W", f"{tmp_path}/run") if "W" in a and "=" in a or a == "W" else a for a in args]
  proc = subprocess.run(
    [sys.executable, "-m", "maxlm", "train", *args], cwd=REPO, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and expected in lines[0], proc.stderr
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(f"{tmp_path}/run")


def test_cli_refuses_a_workdir_that_holds_a_run(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
  proc = subprocess.run(
    [sys.executable, "-m", "maxlm", "train", "--config=configs/tiny.py", f"--workdir={tmp_path}"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2 and "holds a run without checkpoints to resume from" in proc.stderr
  assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'  # Nothing lost.
