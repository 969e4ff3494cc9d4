"""Hugging Face interop, checked against `transformers` itself (CPU PyTorch, test-only).

Import: a random `LlamaForCausalLM`/`MistralForCausalLM` built here and saved as safetensors gives the same
logits in maxlm within 1e-4 (f32). Export: a model trained a few steps in maxlm gives the same logits in
`transformers`, and importing the export back is bit-exact. Bad inputs are one line and exit code 2.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open

from maxlm import cli, config
from maxlm.data import pipeline, tokenizer
from maxlm.errors import UserError
from maxlm.interop import hf, sample
from maxlm.training import checkpoint, loop

from conftest import cli_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4  # f32 logits, |logit| ~ 1: the bound
TOKENS = np.random.default_rng(0).integers(0, 96, (2, 24))


def build_hf(directory, arch="llama", dtype=torch.float32, max_shard_size="50GB", **overrides):
  """A random HF model saved to `directory`; returns what transformers loads from it, in f32."""
  settings = dict(
    vocab_size=96,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.2,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
  )
  settings.update(overrides)
  if arch == "mistral":
    cfg, cls = transformers.MistralConfig(**settings), transformers.MistralForCausalLM
  elif arch == "mixtral":
    cfg, cls = transformers.MixtralConfig(**settings), transformers.MixtralForCausalLM
  else:
    cfg, cls = transformers.LlamaConfig(**settings), transformers.LlamaForCausalLM
  torch.manual_seed(0)
  model = cls(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:  # Norm weights start at 1; make them random so a mix-up would show.
        p.copy_(1 + 0.3 * torch.randn_like(p))
  model.to(dtype).save_pretrained(directory, max_shard_size=max_shard_size)
  return cls.from_pretrained(directory, dtype=torch.float32).eval()


def hf_logits(model, tokens=TOKENS):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def maxlm_model(workdir, **model_overrides):
  cfg = config.load_workdir(str(workdir))
  cfg.model.update(model_overrides)
  return cfg, checkpoint.restore_model(cfg, str(workdir), devices=jax.devices()[:1])


MIXTRAL = {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None, "router_aux_loss_coef": 0.01}


@pytest.mark.parametrize(
  "case, arch, dtype, overrides",
  [
    ("gqa_untied_sharded", "llama", torch.float32, {}),
    ("mha_tied_bf16", "llama", torch.bfloat16, {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    (
      "odd_heads_llama3_rope",
      "llama",
      torch.float32,
      {
        "num_attention_heads": 3,
        "num_key_value_heads": 1,
        "rope_theta": 500_000.0,
        "rope_scaling": {
          "rope_type": "llama3",
          "factor": 8.0,
          "low_freq_factor": 1.0,
          "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16,
        },
      },
    ),
    ("mistral", "mistral", torch.float32, {"num_attention_heads": 6, "num_key_value_heads": 2, "sliding_window": None}),
    ("mixtral_top2_sharded", "mixtral", torch.float32, MIXTRAL),
  ],
)
def test_import_matches_transformers_logits(tmp_path, case, arch, dtype, overrides):
  shard = "20KB" if "sharded" in case else "50GB"
  reference = build_hf(tmp_path / "hf", arch, dtype, max_shard_size=shard, **overrides)
  if "sharded" in case:
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
  summary = hf.from_hf(str(tmp_path / "hf"), str(tmp_path / "run"))
  assert summary["parameters"] == sum(p.numel() for p in reference.parameters())
  want = hf_logits(reference)
  assert want.std() > 0.3  # Logits far from zero: a layout mistake cannot hide inside the tolerance.
  cfg, m = maxlm_model(tmp_path / "run")
  np.testing.assert_allclose(np.asarray(m(TOKENS)), want, rtol=0, atol=TOL)
  if case == "odd_heads_llama3_rope":  # Unscanned layers read the same stacked parameters.
    _, unscanned = maxlm_model(tmp_path / "run", scan_layers=False)
    np.testing.assert_allclose(np.asarray(unscanned(TOKENS)), want, rtol=0, atol=TOL)
    assert cfg.model.rope_scaling.to_dict() == {
      "type": "llama3",
      "factor": 8.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_len": 16,
    }


LLAMA3_ROPE = {
  "rope_type": "llama3",
  "factor": 8.0,
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  "original_max_position_embeddings": 16,
}
TRAIN = [
  "--config.data.seq_len=24",
  "--config.train.global_batch=2",
  "--config.train.log_every=1",
  "--config.train.eval_every=0",
  "--config.checkpoint.every_steps=3",
  "--config.metrics.tensorboard=false",
  "--config.metrics.peak_tflops=1.0",
  "--config.model.scan_layers=false",
]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
  """A sharded HF Llama (GQA 4/2, untied, llama3 RoPE scaling) imported, then trained 3 steps in maxlm from
  the imported parameters (fresh optimizer, unscanned layers): (directory, config, HF model, records)."""
  tmp = tmp_path_factory.mktemp("tuned")
  reference = build_hf(tmp / "hf", max_shard_size="20KB", rope_scaling=LLAMA3_ROPE)
  hf.from_hf(str(tmp / "hf"), str(tmp / "imported"))
  cfg = config.validate(
    config.load([f"--config={tmp}/imported/config.py", "--config.train.steps=3", *TRAIN]), num_devices=1
  )
  records = loop.run(cfg, str(tmp / "tuned"), devices=jax.devices()[:1])
  return tmp, cfg, reference, records


def test_training_continues_from_an_imported_model(tuned, caplog):
  tmp, cfg, reference, records = tuned
  # Step 1's loss is the imported model's loss on the first batch, as transformers computes it.
  batch = next(pipeline.train_and_eval(cfg)[0])
  with torch.no_grad():
    logits = reference(torch.tensor(batch["inputs"])).logits
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 96), torch.tensor(batch["targets"]).long().reshape(-1))
  np.testing.assert_allclose(records[0]["loss"], float(want), rtol=1e-5)
  assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["loss"] < records[0]["loss"]
  assert not os.path.exists(tmp / "imported" / "checkpoints")  # The imported workdir is left as it was.
  # With checkpoints of its own, the run resumes; init_from only starts a run.
  more = config.validate(
    config.load([f"--config={tmp}/imported/config.py", "--config.train.steps=4", *TRAIN]), num_devices=1
  )
  with caplog.at_level("INFO", logger="maxlm"):
    assert [r["step"] for r in loop.run(more, str(tmp / "tuned"), devices=jax.devices()[:1])] == [4]
  assert "resumed from the checkpoint at step 3" in caplog.text and "init_from is ignored" in caplog.text


def test_export_matches_transformers_and_round_trips_exactly(tuned, tmp_path):
  tmp, cfg, _, _ = tuned
  summary = hf.to_hf(str(tmp / "tuned"), str(tmp_path / "hf"), step=3, max_shard_bytes=50_000)
  assert summary["step"] == 3 and len(summary["files"]) > 1
  assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
  exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
  assert exported.config.rope_parameters["rope_type"] == "llama3"
  cfg.model.scan_layers = True  # Either layout reads the same stacked parameters.
  m = checkpoint.restore_model(cfg, str(tmp / "tuned"), devices=jax.devices()[:1], step=3)
  want = np.asarray(m(TOKENS))
  assert want.std() > 0.3
  np.testing.assert_allclose(hf_logits(exported), want, rtol=0, atol=TOL)

  hf.from_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
  back = config.load_workdir(str(tmp_path / "back"))
  assert checkpoint.model_differences(back.model.to_dict(), cfg.model) == []
  _, again = maxlm_model(tmp_path / "back")
  for a, b in zip(jax.tree.leaves(nnx.split(m)[1]), jax.tree.leaves(nnx.split(again)[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # Bit-exact: f32 out, f32 in.


def test_mixtral_trained_in_maxlm_exports_to_transformers_and_back(tmp_path):
  """A random Mixtral imported (config mapped: 4 experts, top-2, balance weight x top_k), trained 3 steps on 2
  devices with expert parallelism, exported: transformers gives the same logits, and the import is bit-exact."""
  build_hf(tmp_path / "hf", "mixtral", **MIXTRAL)
  hf.from_hf(str(tmp_path / "hf"), str(tmp_path / "imported"))
  imported = config.load_workdir(str(tmp_path / "imported"))
  e = imported.model.moe
  assert (e.num_experts, e.top_k, e.router, e.renormalize, e.lb_weight) == (4, 2, "softmax", True, 0.02)
  cfg = config.validate(
    config.load(
      [f"--config={tmp_path}/imported/config.py", "--config.train.steps=3", "--config.mesh.expert=2", *TRAIN]
    ),
    num_devices=2,
  )
  loop.run(cfg, str(tmp_path / "tuned"), devices=jax.devices()[:2])
  hf.to_hf(str(tmp_path / "tuned"), str(tmp_path / "out"))
  exported = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
  assert exported.config.num_local_experts == 4 and exported.config.router_aux_loss_coef == pytest.approx(0.01)
  _, m = maxlm_model(tmp_path / "tuned")
  want = np.asarray(m(TOKENS))
  assert want.std() > 0.3
  np.testing.assert_allclose(hf_logits(exported), want, rtol=0, atol=TOL)
  hf.from_hf(str(tmp_path / "out"), str(tmp_path / "back"))
  _, again = maxlm_model(tmp_path / "back")
  for a, b in zip(jax.tree.leaves(nnx.split(m)[1]), jax.tree.leaves(nnx.split(again)[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_moe_models_without_a_mixtral_equivalent_are_not_exported(tmp_path):
  cfg = config.validate(
    config.load(
      [
        f"--config={REPO}/configs/tiny.py",
        "--config.model.moe.num_experts=4",
        "--config.model.moe.shared_experts=1",
        "--config.train.steps=1",
        *TRAIN,
      ]
    ),
    num_devices=1,
  )
  loop.run(cfg, str(tmp_path / "run"), devices=jax.devices()[:1])
  with pytest.raises(UserError, match="no Mixtral equivalent"):
    hf.to_hf(str(tmp_path / "run"), str(tmp_path / "out"))


def test_bfloat16_export_rounds_each_tensor(tuned, tmp_path):
  tmp, cfg, _, _ = tuned
  hf.to_hf(str(tmp / "tuned"), str(tmp_path / "hf"), step=3, dtype="bfloat16")
  with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="numpy") as f:
    assert f.metadata() == {"format": "pt"}
    q = f.get_tensor("model.layers.1.self_attn.q_proj.weight")
  m = checkpoint.restore_model(cfg, str(tmp / "tuned"), devices=jax.devices()[:1], step=3)
  want = np.asarray(nnx.split(m)[1]["blocks"]["attn"]["q_proj"][...])[1].reshape(48, -1).T
  assert q.dtype.name == "bfloat16"
  np.testing.assert_array_equal(q, want.astype(q.dtype))
  assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize(
  "hf_config, expected",
  [
    ({"architectures": ["Qwen2ForCausalLM"]}, "architecture Qwen2ForCausalLM is not supported (Qwen2 has q/k/v"),
    ({"architectures": ["GPT2LMHeadModel"]}, "architecture GPT2LMHeadModel is not supported"),
    ({"head_dim": 32}, "head_dim=32 is not hidden_size/num_attention_heads=48/4"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling type 'yarn'"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope scaling type 'linear'"),
    ({"attention_bias": True}, "attention_bias=true"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 16}, "sliding_window=16 < max_position_embeddings=64"),
  ],
)
def test_unsupported_configs_are_refused(hf_config, expected):
  base = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 96,
    "hidden_size": 48,
    "intermediate_size": 80,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
  }
  with pytest.raises(config.UserError) as e:
    hf.model_config_from_hf({**base, **hf_config})
  assert expected in str(e.value) and "\n" not in str(e.value)


def test_config_reads_transformers_5_rope_parameters():
  got = hf.model_config_from_hf(
    {
      "architectures": ["LlamaForCausalLM"],
      "vocab_size": 96,
      "hidden_size": 48,
      "intermediate_size": 80,
      "num_hidden_layers": 2,
      "num_attention_heads": 4,
      "rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
    }
  )
  assert (got["rope_theta"], got["rope_scaling"], got["num_kv_heads"], got["norm_eps"]) == (
    5e5,
    {"type": "none"},
    4,
    1e-6,
  )


def run_cli(capsys, *argv):
  code = cli.main(list(argv))
  err = capsys.readouterr().err.strip().splitlines()
  return code, err[-1] if err else ""


def test_bad_inputs_are_one_line_and_exit_2(tmp_path, capsys):
  build_hf(tmp_path / "hf")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
  (tmp_path / "empty" / "pytorch_model.bin").write_bytes(b"")
  code, line = run_cli(capsys, "convert", "from-hf", f"--hf_dir={tmp_path}/empty", f"--workdir={tmp_path}/a")
  assert code == 2 and line.startswith("maxlm convert: error: --hf_dir=") and "no safetensors weights" in line
  assert "found pytorch_model.bin" in line

  hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
  (tmp_path / "hf" / "config.json").write_text(json.dumps({**hf_cfg, "intermediate_size": 96}))
  code, line = run_cli(capsys, "convert", "from-hf", f"--hf_dir={tmp_path}/hf", f"--workdir={tmp_path}/b")
  assert (
    code == 2
    and "tensor model.layers.0.mlp.gate_proj.weight has shape [80, 48], but config.json implies [96, 48]" in line
  )
  assert not os.path.exists(tmp_path / "b") and not os.path.exists(tmp_path / "b.partial")

  code, line = run_cli(capsys, "convert", "to-hf", f"--workdir={tmp_path}/nothing", f"--out={tmp_path}/o")
  assert code == 2 and "nothing: no such directory" in line
  code, line = run_cli(capsys, "convert", "from-hf", f"--workdir={tmp_path}/c")
  assert code == 2 and "--hf_dir" in line
  code, line = run_cli(capsys, "convert", "sideways")
  assert code == 2 and "from-hf" in line


def test_cli_round_trip_hf_maxlm_hf_is_exact_and_never_imports_torch(tmp_path):
  build_hf(tmp_path / "hf", num_key_value_heads=1)
  (tmp_path / "qwen").mkdir()
  (tmp_path / "qwen" / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
  script = f"""
import sys
sys.modules["torch"] = None  # Any import of torch now fails.
from maxlm import cli
assert cli.main(["convert", "from-hf", "--hf_dir={tmp_path}/hf", "--workdir={tmp_path}/run"]) == 0
assert cli.main(["convert", "to-hf", "--workdir={tmp_path}/run", "--out={tmp_path}/out"]) == 0
sys.exit(cli.main(["convert", "from-hf", "--hf_dir={tmp_path}/qwen", "--workdir={tmp_path}/q"]))
"""
  proc = subprocess.run(
    [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300, env=cli_env()
  )
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
  assert (
    proc.stderr.strip()
    .splitlines()[-1]
    .startswith("maxlm convert: error: config.json: architecture Qwen2ForCausalLM is not supported")
  )
  assert json.loads(proc.stdout.splitlines()[0])["workdir"] == str(tmp_path / "run")
  with (
    safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="numpy") as a,
    safe_open(str(tmp_path / "out" / "model.safetensors"), framework="numpy") as b,
  ):
    assert sorted(a.keys()) == sorted(b.keys())
    for name in a.keys():  # noqa: SIM118  a safetensors file, not a dict
      np.testing.assert_array_equal(a.get_tensor(name), b.get_tensor(name))


def test_sentencepiece_tokenizer_is_carried_both_ways(tmp_path, capsys):
  import sentencepiece as spm

  text = "the cat sat on the mat and the dog sat on the log\n" * 20
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(text.splitlines()),
    model_prefix=str(tmp_path / "sp"),
    vocab_size=40,
    model_type="bpe",
    minloglevel=2,
  )
  build_hf(tmp_path / "hf")  # vocab 96 >= the tokenizer's 40
  os.replace(tmp_path / "sp.model", tmp_path / "hf" / "tokenizer.model")
  (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "legacy": True}))
  hf.from_hf(str(tmp_path / "hf"), str(tmp_path / "run"))
  tok, add_bos = tokenizer.for_run(str(tmp_path / "run"))
  assert add_bos and tok.model_bytes == (tmp_path / "hf" / "tokenizer.model").read_bytes()

  assert (
    cli.main(["sample", f"--workdir={tmp_path}/run", "--prompt", "the cat", "--max_new_tokens=4", "--temperature=0"])
    == 0
  )
  line = json.loads(capsys.readouterr().out)
  _, m = maxlm_model(tmp_path / "run")
  prompt = [tok.sp.bos_id()] + tok.encode("the cat")  # Llama tokenizers start prompts with BOS
  assert line["tokens"] == sample.generate(m, [prompt], max_new_tokens=4, eos_id=tok.sp.eos_id(), vocab=40)[0]

  hf.to_hf(str(tmp_path / "run"), str(tmp_path / "out"))
  for name in ("tokenizer.model", "tokenizer_config.json"):
    assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()
  exported = json.loads((tmp_path / "out" / "config.json").read_text())
  assert (exported["bos_token_id"], exported["eos_token_id"]) == (tok.sp.bos_id(), tok.sp.eos_id())
