"""`maxlm COMMAND [flags]`. Config problems print one line and exit 2; bugs keep their traceback."""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys

from absl import flags

from maxlm import config
from maxlm.training import hostmem
from maxlm.errors import UserError

log = logging.getLogger("maxlm")

USAGE = """usage: maxlm COMMAND ...

  train            --config=FILE --workdir=DIR [--config.KEY=VALUE ...]
                   train a model; writes DIR/config.json, DIR/metrics.jsonl, DIR/tb/ and DIR/checkpoints/.
                   Rerunning on a DIR with checkpoints resumes; SIGTERM/SIGINT stop after a checkpoint.
                   e.g. maxlm train --config=configs/tiny.py --workdir=/tmp/run --config.train.steps=50
                   Several processes (multi-host): --coordinator=HOST:PORT --num_processes=N --process_id=I
                   on each, or nothing under SLURM, Open MPI and on Cloud TPU VMs (docs/multihost.md).
  bench            --config=FILE [--steps=10] [--warmup=3] [--results_dir=benchmarks/results] [--config.KEY=VALUE ...]
                   time the train step: median step time, tokens/s/device, TFLOP/s/device, MFU, peak memory;
                   writes a JSON and appends a row to RESULTS_DIR/mfu.md
  compile          --config=FILE [--topology=v5e:4x4 [--num_slices=2]] [--json] [--config.KEY=VALUE ...]
                   compile the train step ahead of time (for a TPU topology from any host, or for the local
                   devices) and report per-device memory against the chip's HBM; exit 1 when it does not fit.
  tokenizer train  --input PATH... --vocab-size N --output FILE.model [--model-type bpe|unigram]
                   train a SentencePiece tokenizer on .txt/.md/.py/.jsonl(.gz)/.parquet files, directories or globs
  data prepare     --input PATH... --tokenizer FILE.model --output DIR [--val-fraction 0.01] [--workers N]
                   [--dedup exact|near|none] [--near-threshold 0.8] [--filters default|prose|code|none]
                   curate and tokenize documents once into DIR/{train,val}/ with a manifest and a curation
                   report (see maxlm/data/prepare.py, docs/data.md)
  convert from-hf  --hf_dir=DIR --workdir=OUT [--param_dtype=float32|bfloat16]
                   import a Hugging Face Llama/Mistral safetensors model into a new workdir (params, config.py,
                   tokenizer); continue training with maxlm train --config=OUT/config.py
  convert to-hf    --workdir=RUN --out=DIR [--step=N] [--dtype=float32|bfloat16] [--max_shard_size=5GB]
                   export a run's newest (or step N) parameters as a LlamaForCausalLM directory (docs/interop.md)
  eval             --workdir=RUN [--data=DIR] [--step=N] [--batches=N|all] [--batch_size=B] [--seq_len=T]
                   held-out loss, perplexity and bits per byte on a prepared dataset's val split; JSON to stdout
  sample           --workdir=RUN --prompt TEXT [--prompt TEXT ...] [--max_new_tokens=64] [--temperature=1.0]
                   [--top_k=0] [--top_p=1.0] [--seed=0] [--step=N]
                   KV-cache sampling, batched prompts, stops at EOS; one JSON line per prompt
"""


class _ArgumentParser(argparse.ArgumentParser):
  """argparse, with its errors as one-line ConfigErrors."""

  def error(self, message):
    raise UserError(f"{message} (see maxlm --help)")


def _distributed_flags(flag_values: flags.FlagValues) -> dict:
  """The `jax.distributed` flags of `maxlm train` (see maxlm/parallel/distributed.py); values are read after parsing."""
  return {
      "coordinator": flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0's coordination service.",
                                         flag_values=flag_values),
      "num_processes": flags.DEFINE_integer("num_processes", None, "Processes in the run.", flag_values=flag_values),
      "process_id": flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.",
                                         flag_values=flag_values),
      "heartbeat_timeout_s": flags.DEFINE_integer(
          "heartbeat_timeout_s", 60, "A process silent this long is declared dead and the run ends.",
          flag_values=flag_values),
      "init_timeout_s": flags.DEFINE_integer("init_timeout_s", 300, "How long processes wait for each other at start.",
                                             flag_values=flag_values),
  }


def _train(args: list[str]) -> None:
  flag_values = flags.FlagValues()
  workdir = flags.DEFINE_string("workdir", None, "Directory for the run's outputs.", flag_values=flag_values)
  dist_flags = _distributed_flags(flag_values)
  cfg = config.load(args, flag_values)
  if not workdir.value:
    raise UserError("missing --workdir: pass a directory for the run's outputs, e.g. --workdir=/tmp/run")
  has_run = os.path.exists(os.path.join(workdir.value, "metrics.jsonl"))
  if has_run and not os.path.isdir(os.path.join(workdir.value, "checkpoints")):
    raise UserError(f"--workdir={workdir.value} holds a run without checkpoints to resume from: pass a new "
                      "directory, or delete that one")
  from maxlm.parallel import distributed  # No JAX backend before jax.distributed starts.

  distributed.skip_unusable_tpu()
  distributed.initialize(**{k: f.value for k, f in dist_flags.items()})
  import jax
  from maxlm.parallel import mesh as mesh_lib

  if jax.process_index() > 0:
    logging.getLogger("maxlm").setLevel(logging.WARNING)  # Process 0 reports progress; the others only problems.
  cfg = config.validate(cfg, num_devices=jax.device_count(), process_count=jax.process_count(),
                        platform=jax.devices()[0].platform, num_slices=mesh_lib.num_granules(jax.devices()))
  from maxlm.training import guard, loop

  try:
    loop.run(cfg, workdir.value)
  except guard.Diverged as e:
    raise RunFailed(str(e)) from None


def _bench(args: list[str]) -> None:
  flag_values = flags.FlagValues()
  steps = flags.DEFINE_integer("steps", 10, "Timed steps.", lower_bound=1, flag_values=flag_values)
  warmup = flags.DEFINE_integer("warmup", 3, "Untimed steps first.", lower_bound=1, flag_values=flag_values)
  results_dir = flags.DEFINE_string("results_dir", "benchmarks/results", "Where the JSON and mfu.md go.",
                                    flag_values=flag_values)
  cfg = config.load(args, flag_values)
  from maxlm.parallel import distributed  # Configuration errors above are reported without loading JAX.

  distributed.skip_unusable_tpu()
  import jax

  cfg = config.validate(cfg, num_devices=jax.device_count(), platform=jax.devices()[0].platform)
  from maxlm.perf import bench

  name = os.path.splitext(os.path.basename(config.config_path(flag_values)))[0]
  result = bench.measure(cfg, steps=steps.value, warmup=warmup.value, name=name)
  path = bench.write(result, results_dir.value)
  log.info("%s", bench.summary(result))
  log.info("wrote %s and a row of %s", path, os.path.join(results_dir.value, "mfu.md"))
  print(json.dumps(result))


def _tokenizer(args: list[str]) -> None:
  if not args or args[0] != "train":
    raise UserError("usage: maxlm tokenizer train --input PATH... --vocab-size N --output FILE.model")
  from maxlm.data import corpus, tokenizer  # SentencePiece only; no JAX.

  parser = _ArgumentParser(prog="maxlm tokenizer train", add_help=False)
  parser.add_argument("--input", nargs="+", required=True)
  parser.add_argument("--vocab-size", type=int, required=True)
  parser.add_argument("--output", required=True)
  parser.add_argument("--model-type", default="bpe")
  parser.add_argument("--text-field", default="text")
  a = parser.parse_args(args[1:])
  files, skipped = corpus.expand(a.input), collections.Counter()
  tok = tokenizer.train(corpus.documents(files, skipped, a.text_field), vocab_size=a.vocab_size, output=a.output,
                        model_type=a.model_type)
  for reason, count in sorted(skipped.items()):
    log.warning("skipped %d input(s): %s", count, reason)
  log.info("trained a %d-token %s tokenizer on %d file(s): %s", tok.vocab_size, a.model_type, len(files), a.output)
  print(json.dumps(tok.info()))


def _data(args: list[str]) -> None:
  if not args or args[0] != "prepare":
    raise UserError("usage: maxlm data prepare --input PATH... --tokenizer FILE.model --output DIR")
  from maxlm.data import prepare  # SentencePiece and NumPy only; no JAX.

  parser = _ArgumentParser(prog="maxlm data prepare", add_help=False)
  parser.add_argument("--input", nargs="+", required=True)
  parser.add_argument("--tokenizer", required=True)
  parser.add_argument("--output", required=True)
  parser.add_argument("--val-fraction", type=float, default=0.01)
  parser.add_argument("--text-field", default="text")
  parser.add_argument("--dedup", default="exact")
  parser.add_argument("--near-threshold", type=float, default=0.8)
  parser.add_argument("--shingle-words", type=int, default=5)
  parser.add_argument("--filters", default="default")
  parser.add_argument("--workers", type=int, default=prepare.default_workers())
  a = parser.parse_args(args[1:])
  manifest = prepare.prepare(a.input, a.tokenizer, a.output, val_fraction=a.val_fraction, text_field=a.text_field,
                             dedup=a.dedup, near_threshold=a.near_threshold, shingle_words=a.shingle_words,
                             filters=a.filters, workers=a.workers, progress=True)
  removed = {k: manifest["curation"][k] for k in ("exact_duplicates", "near_duplicates", "filtered")}
  log.info("removed %s (see %s/curation_report.md)", ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in
                                                               removed.items()), a.output)
  for reason, count in manifest["skipped"].items():
    log.warning("skipped %d input(s): %s", count, reason)
  log.info("%s: %s", a.output, ", ".join(f"{k} {v['documents']} documents / {v['tokens']} tokens"
                                         for k, v in manifest["splits"].items()))


def _convert(args: list[str]) -> None:
  usage = ("usage: maxlm convert from-hf --hf_dir=DIR --workdir=OUT | maxlm convert to-hf --workdir=RUN --out=DIR "
           "[--step=N]")
  if not args or args[0] not in ("from-hf", "to-hf"):
    raise UserError(usage)
  parser = _ArgumentParser(prog=f"maxlm convert {args[0]}", add_help=False)
  parser.add_argument("--workdir", required=True)
  if args[0] == "from-hf":
    parser.add_argument("--hf_dir", required=True)
    parser.add_argument("--param_dtype", default="float32")
  else:
    parser.add_argument("--out", required=True)
    parser.add_argument("--step", type=int)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max_shard_size", default="5GB")
  a = parser.parse_args(args[1:])
  from maxlm.interop import hf  # JAX and Orbax; never torch.

  if args[0] == "from-hf":
    summary = hf.from_hf(a.hf_dir, a.workdir, param_dtype=a.param_dtype)
  else:
    summary = hf.to_hf(a.workdir, a.out, step=a.step, dtype=a.dtype, max_shard_bytes=hf.parse_size(a.max_shard_size))
  print(json.dumps(summary))


def _eval(args: list[str]) -> None:
  parser = _ArgumentParser(prog="maxlm eval", add_help=False)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--data")
  parser.add_argument("--step", type=int)
  parser.add_argument("--batches")
  parser.add_argument("--batch_size", type=int)
  parser.add_argument("--seq_len", type=int)
  a = parser.parse_args(args)
  import jax

  from maxlm.interop import evaluate

  cfg = config.load_workdir(a.workdir, platform=jax.devices()[0].platform)
  if a.data:
    datasets = [(a.data, cfg.data.seed)]
  elif cfg.data.source == "prepared":
    datasets = [(p, cfg.data.seed + i) for i, p in enumerate(filter(None, cfg.data.path.split(",")))]
  else:
    raise UserError(f"the run trained on data.source={cfg.data.source!r}: pass a prepared dataset with --data=DIR")
  if a.batches in (None, ""):
    batches = cfg.train.eval_batches
  elif a.batches == "all":
    batches = None
  else:
    try:
      batches = int(a.batches)
    except ValueError:
      raise UserError(f"--batches={a.batches}: use a number of batches or 'all'") from None
  for dataset, seed in datasets:
    result = evaluate.evaluate(cfg, a.workdir, dataset, step=a.step, batches=batches, batch_size=a.batch_size,
                               seq_len=a.seq_len, seed=seed)
    print(json.dumps({"workdir": a.workdir, **result}))


def _sample(args: list[str]) -> None:
  parser = _ArgumentParser(prog="maxlm sample", add_help=False)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--prompt", action="append", required=True)
  parser.add_argument("--max_new_tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--top_k", type=int, default=0)
  parser.add_argument("--top_p", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--step", type=int)
  a = parser.parse_args(args)
  if a.max_new_tokens < 1 or a.temperature < 0 or a.top_k < 0 or not 0 < a.top_p <= 1:
    raise UserError("use --max_new_tokens >= 1, --temperature >= 0, --top_k >= 0 and 0 < --top_p <= 1")
  import jax

  from maxlm.data import tokenizer
  from maxlm.interop import sample
  from maxlm.training import checkpoint

  cfg = config.load_workdir(a.workdir, platform=jax.devices()[0].platform)
  tok, add_bos = tokenizer.for_run(a.workdir)
  if tok is None:
    raise UserError(f"--workdir={a.workdir}: no SentencePiece tokenizer found (neither an imported tokenizer.model "
                      "nor the tokenizer of the run's prepared data)")
  if tok.vocab_size > cfg.model.vocab_size:
    raise UserError(f"the tokenizer has {tok.vocab_size} tokens, more than the model's {cfg.model.vocab_size}")
  model = checkpoint.restore_model(cfg, a.workdir, jax.devices()[:1], a.step)  # One device: sampling is small.
  for result in sample.complete(model, tok, a.prompt, add_bos=add_bos, max_new_tokens=a.max_new_tokens,
                                temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed):
    print(json.dumps(result))


class RunFailed(RuntimeError):
  """The run cannot go on (e.g. the stability guard ran out of rollbacks); the message is the report."""


class DoesNotFit(RuntimeError):
  """`maxlm compile`: the step needs more memory than a device has; the message says how much and what to change."""


def _compile(args: list[str]) -> None:
  flag_values = flags.FlagValues()
  topology = flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:4x4 (default: the local devices).",
                                 flag_values=flag_values)
  num_slices = flags.DEFINE_integer("num_slices", 1, "Slices of --topology (multi-slice over DCN).",
                                    flag_values=flag_values)
  as_json = flags.DEFINE_boolean("json", False, "Print the report as one JSON object.", flag_values=flag_values)
  cfg = config.load(args, flag_values)
  if num_slices.value < 1:
    raise UserError(f"--num_slices={num_slices.value}: use 1 or more")
  if num_slices.value > 1 and not topology.value:
    raise UserError("--num_slices needs --topology (local devices are one slice)")
  from maxlm.parallel import distributed
  from maxlm.perf import aot

  if topology.value:
    distributed.use_platforms(os.environ.get("JAX_PLATFORMS") or "cpu")  # libtpu's compiler, never a TPU backend.
  else:
    distributed.skip_unusable_tpu()
  report = aot.compile_report(cfg, topology.value, num_slices.value)
  print(json.dumps(report, indent=2) if as_json.value else aot.format_report(report))
  if not report["fits"]:
    raise DoesNotFit(aot.does_not_fit_message(report))


COMMANDS = {"train": _train, "bench": _bench, "compile": _compile, "tokenizer": _tokenizer, "data": _data,
            "convert": _convert, "eval": _eval, "sample": _sample}


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(USAGE)
    return 0 if argv else 2
  command, args = argv[0], argv[1:]
  if command not in COMMANDS:
    print(f"maxlm: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
    return 2
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
  logging.getLogger("maxlm").setLevel(logging.INFO)
  hostmem.keep_freed_memory()  # Before any JAX computation: XLA:CPU steps reuse their memory (maxlm/training/hostmem.py).
  try:
    COMMANDS[command](args)
  except UserError as e:
    print(f"maxlm {command}: error: {e}", file=sys.stderr)
    return 2
  except RunFailed as e:
    print(f"maxlm {command}: stopped: {e}", file=sys.stderr)
    return 1
  except DoesNotFit as e:
    print(f"maxlm {command}: does not fit: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
