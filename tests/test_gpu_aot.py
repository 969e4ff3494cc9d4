"""The train step compiled for NVIDIA GPUs on this CPU host (`maxlm compile --topology=h100:8`): XLA's GPU compiler
from the compile-only CUDA plugin (`make test-gpu-aot` installs it; skipped without it). On the optimized HLO: cuDNN
flash attention forward and backward, bf16 matmuls, and no full f32 logits (the fused chunked loss)."""

import math
import re
import subprocess
import sys

import pytest

from maxlm import config
from maxlm.errors import UserError
from maxlm.perf import aot

from conftest import cli_env

needs_plugin = pytest.mark.skipif(
  not aot.has_cuda_compiler(),
  reason="the CUDA compiler plugin is not installed: pip install -e '.[gpu-aot]' (make test-gpu-aot does)",
)


def shapes(hlo: str, dtype: str) -> list[tuple[int, ...]]:
  return [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(rf"\b{dtype}\[([\d,]*)\]", hlo)]


@needs_plugin
@pytest.mark.parametrize("name", ["gpt2_124m", "llama_1b"])
def test_train_step_compiles_for_8_h100s_with_cudnn_attention_and_a_fused_loss(name):
  overrides = ["--config.model.attention=auto", "--config.train.microbatches=8"]
  report = aot.compile_report(config.load([f"--config=configs/{name}.py", *overrides]), "h100:8", hlo=True)
  hlo = report["hlo"]
  assert report["device_kind"] == "NVIDIA H100 80GB HBM3" and report["num_devices"] == 8
  assert report["attention"] == "cudnn" and report["fits"]
  calls = set(re.findall(r'custom_call_target="([^"]+)"', hlo))
  fmha_calls = {c for c in calls if c.startswith("__cudnn$fmha")}  # the document mask goes in as a bias
  assert any(c.endswith("Backward") for c in fmha_calls) and any(not c.endswith("Backward") for c in fmha_calls), calls
  fmha = [line for line in hlo.splitlines() if "__cudnn$fmha" in line]
  assert all("bf16[" in line for line in fmha)  # attention in bfloat16
  dtypes = {m[1]: m[2] for m in re.finditer(r"%([\w.\-]+) = (\w+)\[", hlo)}
  dots = re.findall(r"= \w+\[[^\]]*\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)  # in Triton/cuBLAS fusions
  assert len(dots) >= 10 and all(dtypes[a] == dtypes[b] == "bf16" for a, b in dots), "a matmul is not in bfloat16"
  cfg = config.validate(config.load([f"--config=configs/{name}.py", *overrides]), num_devices=8, platform="gpu")
  rows, t = cfg.train.global_batch // cfg.train.microbatches // 8, cfg.train.loss_chunk
  assert 0 < t < cfg.data.seq_len  # the shipped config chunks the loss
  V, D = cfg.model.vocab_size, cfg.model.d_model
  full, chunk = rows * cfg.data.seq_len * V, rows * t * V
  # f32 buffers with a vocabulary axis: one chunk's logits, and the output projection's weights and optimizer state
  biggest = max(math.prod(s) for s in shapes(hlo, "f32") if V in s)
  assert biggest <= max(chunk, V * D) < full, f"an f32 [.., {V}] buffer of {biggest} elements: the full logits?"


@needs_plugin
def test_cli_reports_h200_nodes_and_refuses_what_does_not_fit(tmp_path):
  def run(*args):
    return subprocess.run(
      [sys.executable, "-m", "maxlm", "compile", "--config=configs/gpt2_124m.py", *args],
      capture_output=True,
      text=True,
      timeout=600,
      env=cli_env(),
    )

  ok = run("--topology=h200:2x8", "--config.mesh.data=16", "--config.train.microbatches=4")
  assert ok.returncode == 0, ok.stderr
  assert "h200:2x8: 16 x NVIDIA H200 (2 host process(es))" in ok.stdout
  assert "GiB per device (0.75 of 140.4 GiB per NVIDIA H200: JAX's allocator share" in ok.stdout
  big = run("--topology=h100:1", "--config.train.microbatches=1", "--config.mesh.data=1")
  assert big.returncode == 1 and "does not fit" in big.stderr.strip().splitlines()[-1]


def test_gpu_topologies_are_parsed_and_checked():
  assert aot.is_gpu_topology("h100:8") and aot.is_gpu_topology("h200:2x8") and not aot.is_gpu_topology("v5e:2x2")
  assert aot.gpu_memory_bytes("h100:8") == 84929347584
  with pytest.raises(UserError, match=r"--topology=h100:16: use 1 to 8 GPUs per node, e.g. h100:8 or h100:2x8"):
    aot.topology_devices("h100:16")
  with pytest.raises(UserError, match=r"--num_slices is for TPU slices: give GPU nodes in --topology"):
    aot.topology_devices("h100:8", num_slices=2)


@pytest.mark.skipif(aot.has_cuda_compiler(), reason="the plugin is installed")
def test_without_the_plugin_the_error_names_the_extra():
  with pytest.raises(UserError, match=r"--topology=h100:8 needs XLA's CUDA compiler \(no GPU needed\): pip install "):
    aot.topology_devices("h100:8")


@needs_plugin
def test_fp8_projections_compile_to_fp8_matmuls_on_h100():
  cfg = config.load(["--config=configs/gpt2_124m.py", "--config.model.quantization=fp8", "--config.model.num_layers=2"])
  hlo = aot.compile_report(cfg, "h100:8", hlo=True)["hlo"]
  dtypes = {m[1]: m[2] for m in re.finditer(r"%([\w.\-]+) = (\w+)\[", hlo)}
  dots = [(dtypes[a], dtypes[b]) for a, b in re.findall(r"= \w+\[[^\]]*\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)]
  assert ("f8e4m3fn", "f8e4m3fn") in dots  # forward: e4m3 x e4m3
  assert ("f8e5m2", "f8e4m3fn") in dots  # backward: e5m2 gradients x e4m3
  assert ("bf16", "bf16") in dots  # the output head stays bf16
