"""Bad input, as a new user gives it, to every subcommand: configs, flags, data files, tokenizers, datasets,
checkpoints, Hugging Face directories and workdirs.

Each case runs `maxlm` in a subprocess and must exit with its code (2: bad input, 1: a run that cannot go on) with
one line `maxlm COMMAND: error: ...` (or `stopped:`) naming the problem, no traceback, and no libtpu noise on this
TPU-less host. An existing run's files, a prepared dataset, a tokenizer and an exported HF model are used by many
cases and must be byte-identical afterwards.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable

import jax
import numpy as np
import pytest

from maxlm.data import prepare, tokenizer
from maxlm.interop import hf
from maxlm.training import loop

from conftest import make_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 320
NOISE = ("Traceback", "TPU", "libtpu", "E0000")


def _texts() -> list[str]:
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "x = 1", "def f():", "return y", "naïve", "café", "the", "cat", "sat"]
  return [" ".join(rng.choice(words, size=rng.integers(20, 60))) + "\n" for _ in range(60)]


@dataclasses.dataclass
class World:
  root: str
  corpus: str  # a directory of .txt files
  tok: str  # a SentencePiece model
  ds: str  # a prepared dataset
  run: str  # a trained run with checkpoints at steps 2 and 4
  hf: str  # the run exported as a Hugging Face directory


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
  root = str(tmp_path_factory.mktemp("world"))
  corpus = os.path.join(root, "corpus")
  os.makedirs(corpus)
  for i, text in enumerate(_texts()):
    with open(os.path.join(corpus, f"doc{i}.txt"), "w") as f:
      f.write(text)
  tok = os.path.join(root, "tok.model")
  tokenizer.train(iter(_texts()), vocab_size=VOCAB, output=tok)
  ds = os.path.join(root, "ds")
  prepare.prepare([corpus], tok, ds, val_fraction=0.3, dedup="none", filters="none")
  run = os.path.join(root, "run")
  cfg = make_config(
    **{
      "model.vocab_size": VOCAB,
      "data.source": "prepared",
      "data.path": ds,
      "data.seq_len": 32,
      "train.global_batch": 2,
      "train.steps": 4,
      "train.eval_every": 0,
      "checkpoint.every_steps": 2,
      "metrics.tensorboard": False,
      "metrics.peak_tflops": 1.0,
    }
  )
  loop.run(cfg, run, devices=jax.devices()[:1])
  hf_dir = os.path.join(root, "hf")
  hf.to_hf(run, hf_dir)
  return World(root, corpus, tok, ds, run, hf_dir)


def _digest(paths: list[str]) -> dict[str, str]:
  out = {}
  for top in paths:
    for directory, _, names in os.walk(top):
      for name in names:
        path = os.path.join(directory, name)
        with open(path, "rb") as f:
          out[path] = hashlib.sha256(f.read()).hexdigest()
  return out


# Helpers that make a damaged copy of something in the case's own directory. ------------------------------------


def _copy(src: str, dst: str) -> str:
  (shutil.copytree if os.path.isdir(src) else shutil.copyfile)(src, dst)
  return dst


def _write(path: str, data: str | bytes) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)
  return path


def _truncate(path: str, keep: float = 0.5) -> None:
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(int(size * keep))


def _edit_json(path: str, **changes) -> None:
  with open(path) as f:
    data = json.load(f)
  data.update(changes)
  with open(path, "w") as f:
    json.dump(data, f)


def _delete_json_key(path: str, key: str) -> None:
  with open(path) as f:
    data = json.load(f)
  del data[key]
  with open(path, "w") as f:
    json.dump(data, f)


@dataclasses.dataclass
class Case:
  name: str
  args: str  # the command line after `maxlm`, with {corpus} {tok} {ds} {run} {hf} {tmp} and anything `prep` adds
  expect: str  # a fragment of the error line (placeholders as in `args`)
  code: int = 2
  prep: Callable[[World, str], dict] | None = None  # builds bad inputs in the case's directory `tmp`


def _tokens_file(tmp: str, ids) -> dict:
  return {"file": _write(os.path.join(tmp, "tokens.bin"), np.asarray(ids, np.uint16).tobytes())}


def _damaged(what: str, change: Callable[[str], None]) -> Callable[[World, str], dict]:
  """A prep that copies the world's `what` ("ds", "hf" or "run") into the case's directory and damages the copy."""

  def prep(w: World, tmp: str) -> dict:
    copy = _copy(getattr(w, what), os.path.join(tmp, what))
    change(copy)
    return {"bad": copy}

  return prep


def _file(name: str, data: str | bytes) -> Callable[[World, str], dict]:
  return lambda w, tmp: {"file": _write(os.path.join(tmp, name), data)}


def _corrupt_safetensors(d: str) -> None:
  _truncate(os.path.join(d, "model.safetensors"), 0.3)


def _corrupt_state(d: str) -> None:
  for directory, _, names in os.walk(os.path.join(d, "checkpoints")):
    for name in names:
      if "state" in directory:
        _write(os.path.join(directory, name), b"garbage")


TRAIN = "train --config=configs/tiny.py"
PREPARED = f"--config.data.source=prepared --config.model.vocab_size={VOCAB}"
PREPARE = "data prepare --input {corpus} --tokenizer={tok}"

CASES = [
  # The command itself.
  Case("unknown_command", "trian", "did you mean 'train'?"),
  Case("tokenizer_no_subcommand", "tokenizer", "missing subcommand: use maxlm tokenizer train"),
  Case("data_unknown_subcommand", "data prepar", "unknown subcommand 'prepar'"),
  Case("convert_no_direction", "convert --hf_dir={hf}", "unknown subcommand '--hf_dir="),
  # train: config files.
  Case("train_no_config", "train --workdir={tmp}/w", "missing --config"),
  Case("train_config_missing", "train --config={tmp}/nope.py --workdir={tmp}/w", "no such file"),
  Case(
    "train_config_syntax", "train --config={file} --workdir={tmp}/w", "cannot load", prep=_file("c.py", "def f(:\n")
  ),
  Case(
    "train_config_no_get_config",
    "train --config={file} --workdir={tmp}/w",
    "cannot load",
    prep=_file("c.py", "X = 1\n"),
  ),
  Case(
    "train_config_returns_dict",
    "train --config={file} --workdir={tmp}/w",
    "get_config() must return an ml_collections.ConfigDict",
    prep=_file("c.py", "def get_config():\n  return {}\n"),
  ),
  Case(
    "train_config_raises",
    "train --config={file} --workdir={tmp}/w",
    "boom in the config",
    prep=_file("c.py", "def get_config():\n  raise RuntimeError('boom in the config')\n"),
  ),
  Case(
    "train_config_not_from_base",
    "train --config={file} --workdir={tmp}/w",
    "named configs must start from configs/base.get_config()",
    prep=_file("c.py", "import ml_collections\ndef get_config():\n  return ml_collections.ConfigDict({'model': {}})\n"),
  ),
  # train: overrides.
  Case("train_unknown_key", TRAIN + " --workdir={tmp}/w --config.model.num_layer=3", "did you mean 'model.num_layers'"),
  Case("train_unknown_group", TRAIN + " --workdir={tmp}/w --config.modle.d_model=3", "did you mean 'model.d_model'"),
  Case("train_wrong_type", TRAIN + " --workdir={tmp}/w --config.model.num_layers=two", "bad argument"),
  Case("train_float_for_int", TRAIN + " --workdir={tmp}/w --config.train.steps=1.5", "bad argument"),
  Case("train_bad_choice", TRAIN + " --workdir={tmp}/w --config.model.remat=most", "is not one of none, full"),
  Case("train_below_minimum", TRAIN + " --workdir={tmp}/w --config.train.steps=0", "train.steps=0 must be >= 1"),
  Case(
    "train_indivisible", TRAIN + " --workdir={tmp}/w --config.model.d_model=65", "choose num_heads dividing d_model"
  ),
  Case("train_mesh_too_big", TRAIN + " --workdir={tmp}/w --config.mesh.tensor=4", "must divide the device count"),
  Case(
    "train_two_fill_axes",
    TRAIN + " --workdir={tmp}/w --config.mesh.data=-1 --config.mesh.fsdp=-1",
    "at most one mesh axis may fill",
  ),
  Case("train_bad_profile_steps", TRAIN + " --workdir={tmp}/w --config.metrics.profile_steps=a-b", "FIRST-LAST"),
  Case(
    "train_rollback_without_checkpoints",
    TRAIN + " --workdir={tmp}/w --config.train.guard.policy=rollback --config.checkpoint.every_steps=0",
    "needs checkpoints",
  ),
  Case("train_unknown_flag", TRAIN + " --wrkdir={tmp}/w", "Unknown command line flag 'wrkdir'"),
  Case(
    "train_partial_distributed_flags",
    TRAIN + " --workdir={tmp}/w --coordinator=127.0.0.1:1234",
    "--num_processes, --process_id missing",
  ),
  # train: workdirs.
  Case("train_no_workdir", TRAIN, "missing --workdir"),
  Case("train_workdir_is_a_file", TRAIN + " --workdir={file}", "is a file, not a directory", prep=_file("f", "x")),
  Case(
    "train_workdir_under_a_file", TRAIN + " --workdir={file}/run", "is a file, so no directory", prep=_file("f", "x")
  ),
  Case(
    "train_workdir_without_checkpoints",
    TRAIN + " --workdir={tmp}",
    "holds a run without checkpoints",
    prep=_file("metrics.jsonl", '{"step": 1}\n'),
  ),
  Case(
    "train_resume_another_model",
    TRAIN + " --workdir={run} " + PREPARED + " --config.data.path={ds} --config.data.seq_len=32 "
    "--config.train.global_batch=2 --config.model.num_layers=3",
    "saved for a different model (model.num_layers: saved 2, now 3)",
  ),
  Case(
    "train_resume_another_optimizer",
    TRAIN + " --workdir={run} " + PREPARED + " --config.data.path={ds} --config.data.seq_len=32 "
    "--config.train.global_batch=2 --config.optim.name=muon",
    "holds another optimizer's state (optim.name: saved 'adamw', now 'muon')",
  ),
  # train: data.
  Case(
    "train_dataset_missing",
    TRAIN + " --workdir={tmp}/w " + PREPARED + " --config.data.path={tmp}/none",
    "is not a prepared dataset",
  ),
  Case(
    "train_dataset_manifest_not_json",
    TRAIN + " --workdir={tmp}/w " + PREPARED + " --config.data.path={bad}",
    "not a valid dataset manifest",
    prep=_damaged("ds", lambda d: _write(os.path.join(d, "manifest.json"), "{not json")),
  ),
  Case(
    "train_dataset_tokens_truncated",
    TRAIN + " --workdir={tmp}/w " + PREPARED + " --config.data.path={bad}",
    "(truncated or mixed up): prepare the dataset again",
    prep=_damaged("ds", lambda d: _truncate(os.path.join(d, "train", "tokens.bin"))),
  ),
  Case(
    "train_dataset_index_missing",
    TRAIN + " --workdir={tmp}/w " + PREPARED + " --config.data.path={bad}",
    "index.npy: unreadable",
    prep=_damaged("ds", lambda d: os.remove(os.path.join(d, "train", "index.npy"))),
  ),
  Case(
    "train_dataset_index_garbage",
    TRAIN + " --workdir={tmp}/w " + PREPARED + " --config.data.path={bad}",
    "index.npy: unreadable",
    prep=_damaged("ds", lambda d: _write(os.path.join(d, "train", "index.npy"), b"\x93NUMPY garbage")),
  ),
  Case(
    "train_dataset_vocab_too_big",
    TRAIN + " --workdir={tmp}/w --config.data.source=prepared --config.data.path={ds}",
    f"set model.vocab_size >= {VOCAB}",
  ),
  Case(
    "train_dataset_mix_bad_weights",
    TRAIN + " --workdir={tmp}/w " + PREPARED + " --config.data.path={ds},{ds} --config.data.weights=a,b",
    "use comma-separated numbers",
  ),
  Case(
    "train_dataset_mix_weight_count",
    TRAIN + " --workdir={tmp}/w " + PREPARED + " --config.data.path={ds},{ds} --config.data.weights=1",
    "give one positive weight per dataset",
  ),
  Case(
    "train_tokens_file_missing",
    TRAIN + " --workdir={tmp}/w --config.data.source=tokens --config.data.path={tmp}/none.bin",
    "no such file",
  ),
  Case(
    "train_tokens_file_too_short",
    TRAIN + " --workdir={tmp}/w --config.data.source=tokens --config.data.path={file}",
    "fewer than data.seq_len+1",
    prep=lambda w, tmp: _tokens_file(tmp, range(10)),
  ),
  Case(
    "train_tokens_ids_too_big",
    TRAIN + " --workdir={tmp}/w --config.data.source=tokens --config.data.path={file}",
    ">= model.vocab_size=256",
    prep=lambda w, tmp: _tokens_file(tmp, np.full(5000, 60000)),
  ),
  Case(
    "train_init_from_missing", TRAIN + " --workdir={tmp}/w --config.train.init_from={tmp}/none", "no such directory"
  ),
  Case(
    "train_init_from_not_a_run",
    TRAIN + " --workdir={tmp}/w --config.train.init_from={corpus}",
    "train.init_from={corpus}: no config.json",
  ),
  Case(
    "train_init_from_another_model",
    TRAIN + " --workdir={tmp}/w --config.train.init_from={run} --config.model.num_layers=3",
    "holds a different model (model.",
  ),
  # bench and compile.
  Case("bench_zero_steps", "bench --config=configs/tiny.py --steps=0", "bad argument"),
  Case(
    "bench_results_dir_is_a_file",
    "bench --config=configs/tiny.py --results_dir={file}",
    "is a file, not a directory",
    prep=_file("f", "x"),
  ),
  Case("compile_zero_slices", "compile --config=configs/tiny.py --num_slices=0", "use 1 or more"),
  Case("compile_slices_without_topology", "compile --config=configs/tiny.py --num_slices=2", "needs --topology"),
  # tokenizer train.
  Case(
    "tokenizer_input_missing",
    "tokenizer train --input {tmp}/none --vocab_size=300 --output={tmp}/t.model",
    "matches no",
  ),
  Case(
    "tokenizer_vocab_not_a_number",
    "tokenizer train --input {corpus} --vocab_size=many --output={tmp}/t.model",
    "invalid int value",
  ),
  Case(
    "tokenizer_vocab_too_small",
    "tokenizer train --input {corpus} --vocab_size=10 --output={tmp}/t.model",
    "at least 260",
  ),
  Case(
    "tokenizer_vocab_too_large",
    "tokenizer train --input {corpus} --vocab_size=100000 --output={tmp}/t.model",
    "Vocabulary size too high",
  ),
  Case(
    "tokenizer_output_not_model", "tokenizer train --input {corpus} --vocab_size=300 --output={tmp}/t.txt", "*.model"
  ),
  Case(
    "tokenizer_output_directory_missing",
    "tokenizer train --input {corpus} --vocab_size=300 --output={tmp}/no/t.model",
    "does not exist",
  ),
  Case(
    "tokenizer_model_type",
    "tokenizer train --input {corpus} --vocab_size=300 --output={tmp}/t.model --model_type=wordpiece",
    "invalid choice: 'wordpiece'",
  ),
  Case("tokenizer_missing_vocab", "tokenizer train --input {corpus} --output={tmp}/t.model", "required: --vocab_size"),
  Case(
    "tokenizer_only_binary_input",
    "tokenizer train --input {file} --vocab_size=300 --output={tmp}/t.model",
    "no text to train on",
    prep=_file("b.txt", b"\x00\x01\x02"),
  ),
  Case(
    "tokenizer_unsupported_file",
    "tokenizer train --input {file} --vocab_size=300 --output={tmp}/t.model",
    "unsupported file type",
    prep=_file("x.csv", "a,b\n"),
  ),
  # data prepare.
  Case(
    "prepare_tokenizer_missing",
    "data prepare --input {corpus} --tokenizer={tmp}/none.model --output={tmp}/o",
    "not a readable SentencePiece model",
  ),
  Case(
    "prepare_tokenizer_garbage",
    "data prepare --input {corpus} --tokenizer={file} --output={tmp}/o",
    "not a readable SentencePiece model",
    prep=_file("t.model", b"\x00garbage" * 10),
  ),
  Case("prepare_val_fraction", PREPARE + " --output={tmp}/o --val_fraction=1.5", "use a fraction in [0, 1)"),
  Case("prepare_dedup_choice", PREPARE + " --output={tmp}/o --dedup=fuzzy", "invalid choice: 'fuzzy'"),
  Case("prepare_filters_choice", PREPARE + " --output={tmp}/o --filters=strict", "invalid choice: 'strict'"),
  Case("prepare_workers_zero", PREPARE + " --output={tmp}/o --workers=0", "use 1 or more processes"),
  Case("prepare_near_threshold", PREPARE + " --output={tmp}/o --dedup=near --near_threshold=2", "(0, 1]"),
  Case("prepare_into_another_dataset", PREPARE + " --output={ds} --val_fraction=0.5", "holds a different dataset"),
  Case("prepare_output_is_a_file", PREPARE + " --output={file}", "is a file, not a directory", prep=_file("f", "x")),
  Case(
    "prepare_output_manifest_damaged",
    PREPARE + " --output={tmp}/o",
    "unreadable manifest.json",
    prep=lambda w, tmp: {"x": _write(os.path.join(tmp, "o", "manifest.json"), "{")},
  ),
  Case(
    "prepare_nothing_usable",
    "data prepare --input {file} --tokenizer={tok} --output={tmp}/o",
    "no usable training documents",
    prep=_file("empty.txt", "   \n"),
  ),
  Case("prepare_missing_output", "data prepare --input {corpus} --tokenizer={tok}", "required: --output"),
  # convert from-hf.
  Case("from_hf_missing_dir", "convert from-hf --hf_dir={tmp}/none --workdir={tmp}/w", "no such directory"),
  Case(
    "from_hf_config_not_json",
    "convert from-hf --hf_dir={bad} --workdir={tmp}/w",
    "config.json is not valid JSON",
    prep=_damaged("hf", lambda d: _write(os.path.join(d, "config.json"), '{"vocab_size": 3')),
  ),
  Case(
    "from_hf_config_a_list",
    "convert from-hf --hf_dir={bad} --workdir={tmp}/w",
    "is not a JSON object: not a model config",
    prep=_damaged("hf", lambda d: _write(os.path.join(d, "config.json"), "[]")),
  ),
  Case(
    "from_hf_config_missing_key",
    "convert from-hf --hf_dir={bad} --workdir={tmp}/w",
    "lacks hidden_size",
    prep=_damaged("hf", lambda d: _delete_json_key(os.path.join(d, "config.json"), "hidden_size")),
  ),
  Case(
    "from_hf_config_wrong_type",
    "convert from-hf --hf_dir={bad} --workdir={tmp}/w",
    "hidden_size='64' should be a positive integer",
    prep=_damaged("hf", lambda d: _edit_json(os.path.join(d, "config.json"), hidden_size="64")),
  ),
  Case(
    "from_hf_rope_scaling_incomplete",
    "convert from-hf --hf_dir={bad} --workdir={tmp}/w",
    "lacks 'factor'",
    prep=_damaged("hf", lambda d: _edit_json(os.path.join(d, "config.json"), rope_scaling={"rope_type": "llama3"})),
  ),
  Case(
    "from_hf_architecture",
    "convert from-hf --hf_dir={bad} --workdir={tmp}/w",
    "Qwen2ForCausalLM is not supported",
    prep=_damaged("hf", lambda d: _edit_json(os.path.join(d, "config.json"), architectures=["Qwen2ForCausalLM"])),
  ),
  Case(
    "from_hf_no_weights",
    "convert from-hf --hf_dir={bad} --workdir={tmp}/w",
    "no safetensors weights",
    prep=_damaged("hf", lambda d: os.remove(os.path.join(d, "model.safetensors"))),
  ),
  Case(
    "from_hf_truncated_weights",
    "convert from-hf --hf_dir={bad} --workdir={tmp}/w",
    "not a readable safetensors file",
    prep=_damaged("hf", _corrupt_safetensors),
  ),
  Case(
    "from_hf_shape_mismatch",
    "convert from-hf --hf_dir={bad} --workdir={tmp}/w",
    "but config.json implies",
    prep=_damaged("hf", lambda d: _edit_json(os.path.join(d, "config.json"), intermediate_size=100)),
  ),
  Case("from_hf_into_a_run", "convert from-hf --hf_dir={hf} --workdir={run}", "exists and is not empty"),
  Case("from_hf_param_dtype", "convert from-hf --hf_dir={hf} --workdir={tmp}/w --param_dtype=float16", "choose one of"),
  # convert to-hf.
  Case("to_hf_not_a_run", "convert to-hf --workdir={corpus} --out={tmp}/o", "no config.json"),
  Case("to_hf_missing_step", "convert to-hf --workdir={run} --out={tmp}/o --step=99", "has no checkpoint at that step"),
  Case("to_hf_dtype", "convert to-hf --workdir={run} --out={tmp}/o --dtype=int8", "choose one of"),
  Case("to_hf_shard_size", "convert to-hf --workdir={run} --out={tmp}/o --max_shard_size=huge", "use a size like"),
  Case("to_hf_into_a_dataset", "convert to-hf --workdir={run} --out={ds}", "exists and is not empty"),
  Case(
    "to_hf_config_damaged",
    "convert to-hf --workdir={bad} --out={tmp}/o",
    "config.json is not valid JSON",
    prep=_damaged("run", lambda d: _write(os.path.join(d, "config.json"), "{")),
  ),
  Case(
    "to_hf_checkpoint_damaged",
    "convert to-hf --workdir={bad} --out={tmp}/o",
    "cannot read the parameters",
    prep=_damaged("run", _corrupt_state),
  ),
  # eval.
  Case("eval_no_workdir", "eval", "required: --workdir"),
  Case("eval_workdir_missing", "eval --workdir={tmp}/none", "no such directory"),
  Case("eval_not_a_run", "eval --workdir={corpus}", "no config.json"),
  Case("eval_batches_word", "eval --workdir={run} --batches=lots", "use a number of batches or 'all'"),
  Case("eval_batch_size_zero", "eval --workdir={run} --batch_size=0", "must be positive"),
  Case("eval_data_not_a_dataset", "eval --workdir={run} --data={corpus}", "not a prepared dataset"),
  Case("eval_missing_step", "eval --workdir={run} --step=3", "has no checkpoint at that step (it has: 2, 4)"),
  Case(
    "eval_config_not_groups",
    "eval --workdir={bad}",
    "is not a maxlm config",
    prep=_damaged("run", lambda d: _write(os.path.join(d, "config.json"), '{"model": 3}')),
  ),
  # sample.
  Case("sample_no_prompt", "sample --workdir={run}", "required: --prompt"),
  Case("sample_top_p", "sample --workdir={run} --prompt=hi --top_p=0", "0 < --top_p <= 1"),
  Case("sample_negative_temperature", "sample --workdir={run} --prompt=hi --temperature=-1", "--temperature >= 0"),
  Case("sample_step_word", "sample --workdir={run} --prompt=hi --step=last", "invalid int value: 'last'"),
  Case(
    "sample_without_tokenizer",
    "sample --workdir={bad} --prompt=hi",
    "no SentencePiece tokenizer found",
    prep=_damaged("run", lambda d: _edit_json(os.path.join(d, "config.json"), data={"source": "synthetic"})),
  ),
]


def _run_case(case: Case, w: World, tmp: str) -> tuple[subprocess.CompletedProcess, str]:
  os.makedirs(tmp, exist_ok=True)
  values = {"corpus": w.corpus, "tok": w.tok, "ds": w.ds, "run": w.run, "hf": w.hf, "tmp": tmp}
  if case.prep:
    values.update(case.prep(w, tmp))
  args = [a.format(**values) for a in case.args.split()]
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # As on a user's machine: libtpu noise shows.
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  proc = subprocess.run(
    [sys.executable, "-m", "maxlm", *args], cwd=REPO, capture_output=True, text=True, timeout=300, env=env
  )
  return proc, case.expect.format(**values)


@pytest.fixture(scope="module")
def results(world, tmp_path_factory):
  """Every case, run 3 at a time; then the digest of the shared inputs before and after."""
  before = _digest([world.run, world.ds, world.tok, world.hf, world.corpus])
  root = str(tmp_path_factory.mktemp("cases"))
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    futures = {c.name: pool.submit(_run_case, c, world, os.path.join(root, c.name)) for c in CASES}
    done = {name: f.result() for name, f in futures.items()}
  return done, before, _digest([world.run, world.ds, world.tok, world.hf, world.corpus])


def test_there_are_many_cases():
  assert len(CASES) >= 50 and len({c.name for c in CASES}) == len(CASES)
  commands = {c.args.split()[0] for c in CASES}
  assert {"train", "bench", "compile", "tokenizer", "data", "convert", "eval", "sample"} <= commands


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_one_line_and_an_exit_code(case, results):
  proc, expect = results[0][case.name]
  command = case.args.split()[0]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == case.code, proc.stderr
  for word in NOISE:
    assert word not in proc.stderr, proc.stderr
  verdicts = [line for line in lines if line.startswith(("maxlm: ", f"maxlm {command}: "))]
  assert len(verdicts) == 1 and verdicts[0] == lines[-1], proc.stderr
  assert expect in verdicts[0], proc.stderr


def test_shared_inputs_are_byte_identical_afterwards(results):
  _, before, after = results
  assert after == before


def test_a_truncated_gzip_and_a_corrupt_parquet_are_skipped_and_the_run_goes_on(world, tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  good = tmp_path / "good.jsonl.gz"
  with gzip.open(good, "wt") as f:
    for text in _texts()[:20]:
      f.write(json.dumps({"text": text}) + "\n")
  broken = tmp_path / "broken.jsonl.gz"
  broken.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
  not_gzip = tmp_path / "plain.jsonl.gz"
  not_gzip.write_text('{"text": "hello"}\n')
  table = tmp_path / "t.parquet"
  pq.write_table(pa.table({"text": _texts()[20:40]}), table, row_group_size=5)
  damaged = tmp_path / "damaged.parquet"
  data = bytearray(table.read_bytes())
  data[len(data) // 3 : len(data) // 3 + 200] = b"\xff" * 200  # a row group's pages, not the footer
  damaged.write_bytes(bytes(data))
  args = ["data", "prepare", "--input", str(good), str(broken), str(not_gzip), str(table), str(damaged)]
  args += ["--tokenizer", world.tok, "--output", str(tmp_path / "out"), "--dedup=none", "--filters=none"]
  proc = subprocess.run([sys.executable, "-m", "maxlm", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
  assert manifest["skipped"]["unreadable .gz file (truncated or corrupt)"] == 2
  assert manifest["skipped"]["unreadable parquet file"] == 1
  used = {os.path.basename(p): c for p, c in manifest["sources"].items() if c}
  assert set(used) == {"good.jsonl.gz", "t.parquet"}  # Nothing of the damaged files, not even their first half.
  assert "skipped 2 input(s): unreadable .gz file" in proc.stderr


def test_commands_print_no_libtpu_noise_on_a_host_without_a_tpu(world):
  """With the `tpu` extra installed (as `make test` does) and JAX_PLATFORMS unset, JAX would try libtpu first and print
  its `E0000 ... INVALID_ARGUMENT` lines; maxlm runs on the CPU without them."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  for args in (
    ["eval", f"--workdir={world.run}", "--batches=1"],
    ["sample", f"--workdir={world.run}", "--prompt=alpha", "--max_new_tokens=2"],
  ):
    proc = subprocess.run(
      [sys.executable, "-m", "maxlm", *args], cwd=REPO, capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])
    for word in NOISE:
      assert word not in proc.stderr, proc.stderr
