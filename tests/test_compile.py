"""`maxlm compile`: the real train step compiled ahead of time, for a TPU topology on this CPU host (needs libtpu,
which `make test` installs) and for the local devices; an oversized config exits 1 with "does not fit"."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest

from conftest import cli_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason="libtpu not installed: pip install -e '.[dev,tpu]' (make test does)",
)
GIB = 2**30
# 1.3B parameters, one layer, replicated over 4 devices: ~16 bytes/parameter of f32 state alone exceeds 16 GiB.
OVERSIZED = [
  "--config.model.d_model=4096",
  "--config.model.num_heads=32",
  "--config.model.num_kv_heads=8",
  "--config.model.mlp_dim=16384",
  "--config.model.vocab_size=262144",
  "--config.model.num_layers=1",
]


def compile_cli(*args, num_devices=1):
  return subprocess.run(
    [sys.executable, "-m", "maxlm", "compile", "--config=configs/tiny.py", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=cli_env(num_devices),
  )


@needs_libtpu
def test_compiles_for_a_v5e_2x2_from_a_cpu_host():
  proc = compile_cli("--topology=v5e:2x2", "--json", "--config.mesh.fsdp=2")
  assert proc.returncode == 0, proc.stderr[-2000:]
  r = json.loads(proc.stdout)
  assert (r["device_kind"], r["num_devices"], r["mesh"]) == (
    "TPU v5 lite",
    4,
    {"diloco": 1, "stage": 1, "data": 2, "fsdp": 2, "expert": 1, "context": 1, "tensor": 1},
  )
  assert r["compute_dtype"] == "bfloat16" and r["hbm_bytes"] == 16 * GIB and r["fits"]
  m = r["memory_per_device"]
  # The f32 state (params + 2 Adam moments, ~0.12M parameters) is split over fsdp=2 and donated: outputs alias it.
  assert 0 < m["argument"] < 2 * 3 * 4 * 0.13e6 and m["alias"] > 0.9 * m["argument"]
  assert m["live"] == m["argument"] + m["output"] - m["alias"] + m["temp"] and m["peak"] >= m["live"]


@needs_libtpu
@pytest.mark.parametrize(
  "args, expect",
  [
    (
      ["--config.mesh.stage=2", "--config.model.num_layers=4", "--config.model.pipeline_repeats=2"],
      ("pipeline", "2 stages (circular, 2 repeats, 1 layer(s) per stage per repeat), 2 microbatches, bubble 20.0%"),
    ),
    (
      ["--config.mesh.context=2", "--config.model.context_attention=ring", "--config.data.seq_len=256"],
      ("attention", "context ring over 2 shards"),
    ),
    (
      ["--config.mesh.context=2", "--config.data.seq_len=256"],
      ("attention", "context all_gather over 2 shards (splash)"),
    ),
  ],
  ids=["pipeline-circular", "context-ring", "context-splash"],
)
def test_pipeline_and_context_parallel_steps_compile_for_tpu(args, expect):
  """These compile for a TPU: the pipeline with splash attention inside the vmap over stages, the ring in shard_map,
  and splash over the context shards' queries with its block tables split over them."""
  proc = compile_cli("--topology=v5e:2x2", "--json", *args)
  assert proc.returncode == 0, proc.stderr[-2000:]
  r = json.loads(proc.stdout)
  assert r[expect[0]] == expect[1] and r["fits"]


@needs_libtpu
def test_an_moe_model_compiles_with_experts_over_a_split_physical_axis(tmp_path):
  """moe_tiny on a v5e 4x4 with mesh.expert=8: 8 is no product of the physical axes (4, 4), so the mesh splits one;
  the TPU program dispatches with ragged_all_to_all and multiplies with the Megablox kernel (forward and backward),
  where the CPU program has its all_to_all stand-in and ragged_dot."""
  env = cli_env(1)
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_dump_to={tmp_path}"
  env["JAX_COMPILATION_CACHE_DIR"] = ""  # a cache hit would compile (and dump) nothing
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "maxlm",
      "compile",
      "--config=configs/moe_tiny.py",
      "--topology=v5e:4x4",
      "--json",
      "--config.mesh.data=1",
      "--config.mesh.fsdp=2",
      "--config.mesh.expert=8",
      "--config.train.global_batch=16",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  r = json.loads(proc.stdout)
  assert (
    r["mesh"] == {"diloco": 1, "stage": 1, "data": 1, "fsdp": 2, "expert": 8, "context": 1, "tensor": 1} and r["fits"]
  )
  (hlo,) = [p for p in tmp_path.glob("*jit_train_step*.after_optimizations.txt")]
  text = hlo.read_text()
  # 2 dispatches (out and back) forward, 2 in the backward pass; 3 grouped matmuls forward, 6 backward.
  assert text.count("ragged-all-to-all(") == 4
  assert text.count('custom_call_target="tpu_custom_call"') == 9


@needs_libtpu
def test_two_slices_use_the_dcn_axis():
  proc = compile_cli("--topology=v5e:2x2", "--num_slices=2", "--config.mesh.dcn_data=2", "--json")
  assert proc.returncode == 0, proc.stderr[-2000:]
  r = json.loads(proc.stdout)
  assert r["num_devices"] == 8 and r["mesh"]["data"] == 8 and r["fits"]
  proc = compile_cli("--topology=v5e:2x2", "--num_slices=2")
  assert proc.returncode == 2 and "set mesh.dcn_data" in proc.stderr.strip().splitlines()[-1]


@needs_libtpu
@pytest.mark.parametrize("comm_dtype, wire", [("bfloat16", "bf16"), ("int8", "s8"), ("float32", "f32")])
def test_diloco_replicas_span_two_slices_and_send_the_drift_in_comm_dtype(tmp_path, comm_dtype, wire):
  """train.diloco.replicas=2 on 2 slices of a v5e 2x2: validation puts the replicas across the slices
  (mesh.dcn_diloco=2), and in the TPU program what crosses the slices (the DCN sends) is the drift in comm_dtype:
  over 90% of the bytes sent. (XLA:CPU would widen a bfloat16 all-reduce to float32; int8 goes as all-to-all and
  all-gather with float32 scales.)"""
  env = cli_env(1)
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_dump_to={tmp_path}"
  env["JAX_COMPILATION_CACHE_DIR"] = ""  # a cache hit would compile (and dump) nothing
  args = ["--topology=v5e:2x2", "--num_slices=2", "--json", "--config.train.diloco.replicas=2"]
  args += ["--config.train.diloco.sync_every=4", f"--config.train.diloco.comm_dtype={comm_dtype}"]
  proc = subprocess.run(
    [sys.executable, "-m", "maxlm", "compile", "--config=configs/tiny.py", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=env,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  r = json.loads(proc.stdout)
  assert r["mesh"]["diloco"] == 2 and r["mesh"]["data"] == 4 and r["num_slices"] == 2 and r["fits"]
  (hlo,) = [p for p in tmp_path.glob("*jit_train_step*.after_optimizations.txt")]
  sent = {}  # bytes sent over DCN by dtype
  for dtype, shape in re.findall(r"= \((\w+)\[([\d,]*)\]\S* [^\n]*? send\(", hlo.read_text()):
    size = {"s8": 1, "pred": 1, "bf16": 2, "f32": 4, "s32": 4, "u32": 4}[dtype]
    sent[dtype] = sent.get(dtype, 0) + size * math.prod(int(d) for d in shape.split(",") if d)
  assert sent.get(wire, 0) > 0.9 * sum(sent.values()), sent


@needs_libtpu
def test_an_oversized_config_does_not_fit():
  proc = compile_cli("--topology=v5e:2x2", *OVERSIZED)
  assert proc.returncode == 1, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("maxlm compile: does not fit: ") and "v5e:2x2" in last and "mesh.fsdp" in last
  assert "Traceback" not in proc.stderr


@needs_libtpu
def test_an_unknown_topology_is_a_config_error():
  proc = compile_cli("--topology=v5litepod-4")
  assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
    "maxlm compile: error: --topology=v5litepod-4: libtpu does not know it"
  )


@needs_libtpu
def test_libtpu_held_by_another_process_is_named():
  """A TPU job on the host holds libtpu's lockfile; the error says so instead of blaming the topology name."""
  holder = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "from jax.experimental import topologies; import sys\n"
      "try: topologies.get_topology_desc(topology_name='v5e:2x2', platform='tpu')\n"
      "except Exception as e:  # Held already, e.g. by this pytest process after test_kernels.\n"
      "  assert 'lockfile' in str(e), e\n"
      "print('held', flush=True); sys.stdin.read()",
    ],
    cwd=REPO,
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  try:
    assert holder.stdout.readline().strip() == "held"
    env = {k: v for k, v in cli_env().items() if k != "ALLOW_MULTIPLE_LIBTPU_LOAD"}
    proc = subprocess.run(
      [sys.executable, "-m", "maxlm", "compile", "--config=configs/tiny.py", "--topology=v5e:2x2"],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      env=env,
    )
  finally:
    holder.communicate("", timeout=60)
  assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
    "maxlm compile: error: --topology=v5e:2x2: another process on this host is using libtpu"
  ), proc.stderr[-2000:]


def test_compiles_for_the_local_devices():
  proc = compile_cli("--json", "--config.mesh.fsdp=2", num_devices=2)
  assert proc.returncode == 0, proc.stderr[-2000:]
  r = json.loads(proc.stdout)
  assert r["topology"] == "local" and r["num_devices"] == 2 and r["device_kind"] == "cpu" and r["fits"]
  assert r["memory_per_device"]["temp"] > 0 and r["hbm_bytes"] > GIB


@needs_libtpu
def test_int8_projections_compile_to_integer_matmuls_for_tpu():
  from maxlm import config
  from maxlm.perf import aot

  cfg = config.load(["--config=configs/tiny.py", "--config.model.quantization=int8"])
  hlo = aot.compile_report(cfg, "v5e:2x2", hlo=True)["hlo"]
  dtypes = {m[1]: m[2] for m in re.finditer(r"%([\w.\-]+) = (\w+)\[", hlo)}
  ops = re.findall(r"= \w+\[[^\]]*\]\S* (?:dot|convolution)\(%([\w.\-]+), %([\w.\-]+)\)", hlo)
  operands = {(dtypes[a], dtypes[b]) for a, b in ops}
  assert ("s8", "s8") in operands, operands  # int8 x int8 on the MXU, forward and backward
  assert any("s8" not in pair for pair in operands)  # the output head stays in bfloat16
