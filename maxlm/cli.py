"""`maxlm COMMAND [flags]`: every command, one flag spelling, one way to fail.

Flags are `--name=value` with underscores (`--vocab_size=4096`, `--config.model.num_layers=4`); `--name value` and
hyphens (`--vocab-size`) are accepted too. `maxlm COMMAND --help` prints one command's usage.

Exit codes: 0 done; 2 a problem with the input (`UserError`: config, flags, files, datasets, checkpoints), printed as
one line naming it and the fix; 1 a run that cannot go on (`RunFailed`: divergence, a full disk, a config that does
not fit), printed as its report. What was complete before (checkpoints, datasets) is never touched by a failure.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import difflib
import json
import logging
import os
import sys
from collections.abc import Callable

from absl import flags

from maxlm import config, errors, provenance, storage
from maxlm.errors import RunFailed, UserError
from maxlm.parallel import distributed
from maxlm.training import hostmem

log = logging.getLogger("maxlm")

HEADER = """usage: maxlm COMMAND [flags]       (maxlm COMMAND --help: one command; maxlm --version)

Flags are spelled --name=value with underscores; --name value and --name-with-hyphens work too. Exit status: 0 done,
2 bad input (one line says what and how to fix it), 1 a run that cannot go on (its report says why).
"""


class DoesNotFit(RunFailed):
  """`maxlm compile`: the step needs more memory than a device has; the message says how much and what to change."""


@dataclasses.dataclass
class Command:
  usage: str  # this command's lines of `maxlm --help`
  run: Callable[[list[str]], None]


class _ArgumentParser(argparse.ArgumentParser):
  """argparse, with its errors as one-line UserErrors."""

  def __init__(self, command: str):
    super().__init__(prog=f"maxlm {command}", add_help=False, allow_abbrev=False)
    self.command = command

  def error(self, message):
    raise UserError(f"{message} (see maxlm {self.command} --help)")


def canonical_flags(args: list[str]) -> list[str]:
  """`--vocab-size=8` -> `--vocab_size=8`: one spelling for every command (values are left as they are)."""
  out = []
  for arg in args:
    if arg.startswith("--") and len(arg) > 2:
      name, eq, value = arg[2:].partition("=")
      arg = f"--{name.replace('-', '_')}{eq}{value}"
    out.append(arg)
  return out


# Commands ------------------------------------------------------------------------------------------------------


def _distributed_flags(flag_values: flags.FlagValues) -> dict:
  """The `jax.distributed` flags of `maxlm train` (see maxlm/parallel/distributed.py); values are read after parsing."""
  define = lambda kind, name, default, doc: kind(name, default, doc, flag_values=flag_values)  # noqa: E731
  return {
    "coordinator": define(flags.DEFINE_string, "coordinator", None, "HOST:PORT of process 0's coordination service."),
    "num_processes": define(flags.DEFINE_integer, "num_processes", None, "Processes in the run."),
    "process_id": define(flags.DEFINE_integer, "process_id", None, "This process's index, 0..num_processes-1."),
    "heartbeat_timeout_s": define(
      flags.DEFINE_integer, "heartbeat_timeout_s", 60, "A process silent this long is declared dead; the run ends."
    ),
    "init_timeout_s": define(flags.DEFINE_integer, "init_timeout_s", 300, "How long processes wait for each other."),
  }


def check_new_directory(flag: str, path: str, local_only: str = "") -> None:
  """Fails early, before any work, when `path` cannot become a directory of outputs; `local_only` names what may
  not write to a bucket (a command whose outputs stay on a local or shared disk)."""
  if storage.is_remote(path) and local_only:
    raise UserError(f"{flag}={path}: {local_only} keep their outputs on a local or shared disk; pass a local directory")
  if storage.is_remote(path):
    if storage.isfile(path):
      raise UserError(f"{flag}={path} is an object, not a directory: pass a prefix (gs://bucket/dir)")
    bucket = "gs://" + path.split("://", 1)[1].split("/", 1)[0]
    if not storage.exists(bucket):
      raise UserError(f"{flag}={path}: no bucket {bucket} (or no access to it); create it or pass another")
    return
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"{flag}={path} is a file, not a directory: pass a directory (it is created when missing)")
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise UserError(f"{flag}={path}: {parent} is a file, so no directory can be made there; pass another path")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise UserError(f"{flag}={path}: {parent} is not writable; pass a directory you can write to")


def _train(args: list[str]) -> None:
  flag_values = flags.FlagValues()
  workdir = flags.DEFINE_string("workdir", None, "Directory for the run's outputs.", flag_values=flag_values)
  stop_at_step = flags.DEFINE_integer(
    "stop_at_step",
    None,
    "Stop after this step with a checkpoint (and an eval).",
    lower_bound=1,
    flag_values=flag_values,
  )
  dist_flags = _distributed_flags(flag_values)
  cfg = config.load(args, flag_values)
  if not workdir.value:
    raise UserError("missing --workdir: pass a directory for the run's outputs, e.g. --workdir=/tmp/run")
  check_new_directory("--workdir", workdir.value)
  has_run = storage.exists(storage.join(workdir.value, "metrics.jsonl"))
  if has_run and not storage.isdir(storage.join(workdir.value, "checkpoints")):
    raise UserError(
      f"--workdir={workdir.value} holds a run without checkpoints to resume from: pass a new directory, or delete "
      "that one"
    )
  distributed.initialize(**{k: f.value for k, f in dist_flags.items()})  # Before any other JAX call.
  import jax

  from maxlm.parallel import mesh as mesh_lib
  from maxlm.training import loop

  if jax.process_index() > 0:
    logging.getLogger("maxlm").setLevel(logging.WARNING)  # Process 0 reports progress; the others only problems.
  cfg = config.validate(
    cfg,
    num_devices=jax.device_count(),
    platform=jax.devices()[0].platform,
    num_slices=mesh_lib.num_granules(jax.devices()),
  )
  loop.run(cfg, workdir.value, stop_at_step=stop_at_step.value)


def _bench(args: list[str]) -> None:
  flag_values = flags.FlagValues()
  steps = flags.DEFINE_integer("steps", 10, "Timed steps.", lower_bound=1, flag_values=flag_values)
  warmup = flags.DEFINE_integer("warmup", 3, "Untimed steps first.", lower_bound=1, flag_values=flag_values)
  results_dir = flags.DEFINE_string(
    "results_dir", "benchmarks/results", "Where the JSON and mfu.md go.", flag_values=flag_values
  )
  cfg = config.load(args, flag_values)
  check_new_directory("--results_dir", results_dir.value, local_only="benchmarks")
  import jax

  from maxlm.perf import bench

  cfg = config.validate(cfg, num_devices=jax.device_count(), platform=jax.devices()[0].platform)
  name = os.path.splitext(os.path.basename(config.config_path(flag_values)))[0]
  result = bench.measure(cfg, steps=steps.value, warmup=warmup.value, name=name)
  path = bench.write(result, results_dir.value)
  log.info("%s", bench.summary(result))
  log.info("wrote %s and a row of %s", path, os.path.join(results_dir.value, "mfu.md"))
  print(json.dumps(result))


def _compile(args: list[str]) -> None:
  flag_values = flags.FlagValues()
  topology = flags.DEFINE_string(
    "topology",
    None,
    "TPU topology (v5e:4x4) or GPUs (h100:8, h200:2x8 = 2 nodes x 8); default: the local devices.",
    flag_values=flag_values,
  )
  num_slices = flags.DEFINE_integer(
    "num_slices", 1, "Slices of --topology (multi-slice over DCN).", flag_values=flag_values
  )
  as_json = flags.DEFINE_boolean("json", False, "Print the report as one JSON object.", flag_values=flag_values)
  cfg = config.load(args, flag_values)
  if num_slices.value < 1:
    raise UserError(f"--num_slices={num_slices.value}: use 1 or more")
  if num_slices.value > 1 and not topology.value:
    raise UserError("--num_slices needs --topology (local devices are one slice)")
  from maxlm.perf import aot

  if topology.value:
    # The compilers of libtpu or the CUDA plugin for topology devices; never a TPU or GPU backend.
    distributed.use_platforms(os.environ.get("JAX_PLATFORMS") or "cpu")
  report = aot.compile_report(cfg, topology.value, num_slices.value)
  print(json.dumps(report, indent=2) if as_json.value else aot.format_report(report))
  if not report["fits"]:
    raise DoesNotFit(aot.does_not_fit_message(report))


def _subcommand(command: str, args: list[str], choices: tuple[str, ...]) -> tuple[str, list[str]]:
  if not args or args[0] not in choices:
    got = f"unknown subcommand {args[0]!r}" if args else "missing subcommand"
    raise UserError(f"{got}: use maxlm {command} {' | '.join(choices)} (see maxlm {command} --help)")
  return args[0], args[1:]


def _tokenizer(args: list[str]) -> None:
  _, args = _subcommand("tokenizer", args, ("train",))
  from maxlm.data import corpus, tokenizer  # SentencePiece only; no JAX.

  parser = _ArgumentParser("tokenizer train")
  parser.add_argument("--input", nargs="+", action="extend", required=True)
  parser.add_argument("--vocab_size", type=int, required=True)
  parser.add_argument("--output", required=True)
  parser.add_argument("--model_type", default="bpe", choices=tokenizer.MODEL_TYPES)
  parser.add_argument("--text_field", default="text")
  a = parser.parse_args(args)
  files, skipped = corpus.expand(a.input), collections.Counter()
  tok = tokenizer.train(
    corpus.documents(files, skipped, a.text_field),
    vocab_size=a.vocab_size,
    output=a.output,
    model_type=a.model_type,
  )
  for reason, count in sorted(skipped.items()):
    log.warning("skipped %d input(s): %s", count, reason)
  log.info("trained a %d-token %s tokenizer on %d file(s): %s", tok.vocab_size, a.model_type, len(files), a.output)
  print(json.dumps(tok.info()))


def _data(args: list[str]) -> None:
  _, args = _subcommand("data", args, ("prepare",))
  from maxlm.data import dedup, prepare  # SentencePiece and NumPy only; no JAX.

  parser = _ArgumentParser("data prepare")
  parser.add_argument("--input", nargs="+", action="extend", required=True)
  parser.add_argument("--tokenizer", required=True)
  parser.add_argument("--output", required=True)
  parser.add_argument("--val_fraction", type=float, default=0.01)
  parser.add_argument("--text_field", default="text")
  parser.add_argument("--dedup", default="exact", choices=prepare.DEDUP)
  parser.add_argument("--near_threshold", type=float, default=0.8)
  parser.add_argument("--shingle_words", type=int, default=dedup.SHINGLE_WORDS)
  parser.add_argument("--filters", default="default", choices=prepare.FILTERS)
  parser.add_argument("--workers", type=int, default=prepare.default_workers())
  a = parser.parse_args(args)
  check_new_directory("--output", a.output)
  manifest = prepare.prepare(
    a.input,
    a.tokenizer,
    a.output,
    val_fraction=a.val_fraction,
    text_field=a.text_field,
    dedup=a.dedup,
    near_threshold=a.near_threshold,
    shingle_words=a.shingle_words,
    filters=a.filters,
    workers=a.workers,
    progress=True,
  )
  removed = {k: manifest["curation"][k] for k in ("exact_duplicates", "near_duplicates", "filtered")}
  log.info(
    "removed %s (see %s/curation_report.md)",
    ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in removed.items()),
    a.output,
  )
  for reason, count in manifest["skipped"].items():
    log.warning("skipped %d input(s): %s", count, reason)
  log.info(
    "%s: %s",
    a.output,
    ", ".join(f"{k} {v['documents']} documents / {v['tokens']} tokens" for k, v in manifest["splits"].items()),
  )


def _convert(args: list[str]) -> None:
  direction, args = _subcommand("convert", args, ("from-hf", "to-hf"))
  parser = _ArgumentParser(f"convert {direction}")
  parser.add_argument("--workdir", required=True)
  if direction == "from-hf":
    parser.add_argument("--hf_dir", required=True)
    parser.add_argument("--param_dtype", default="float32")
  else:
    parser.add_argument("--out", required=True)
    parser.add_argument("--step", type=int)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max_shard_size", default="5GB")
  a = parser.parse_args(args)
  from maxlm.interop import hf  # JAX and Orbax; never torch.

  if direction == "from-hf":
    check_new_directory("--workdir", a.workdir)
    summary = hf.from_hf(a.hf_dir, a.workdir, param_dtype=a.param_dtype)
  else:
    check_new_directory("--out", a.out)
    max_shard_bytes = hf.parse_size(a.max_shard_size)
    summary = hf.to_hf(a.workdir, a.out, step=a.step, dtype=a.dtype, max_shard_bytes=max_shard_bytes)
  print(json.dumps(summary))


def _eval(args: list[str]) -> None:
  parser = _ArgumentParser("eval")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--data")
  parser.add_argument("--step", type=int)
  parser.add_argument("--batches")
  parser.add_argument("--batch_size", type=int)
  parser.add_argument("--seq_len", type=int)
  a = parser.parse_args(args)
  cfg = config.load_workdir(a.workdir)  # Before JAX starts: a wrong directory is reported at once.
  import jax

  from maxlm.interop import evaluate

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
  cfg = config.load_workdir(a.workdir, platform=jax.devices()[0].platform)
  for data_dir, seed in datasets:
    result = evaluate.evaluate(
      cfg, a.workdir, data_dir, step=a.step, batches=batches, batch_size=a.batch_size, seq_len=a.seq_len, seed=seed
    )
    print(json.dumps({"workdir": a.workdir, **result}))


def _sample(args: list[str]) -> None:
  parser = _ArgumentParser("sample")
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
  from maxlm.data import tokenizer

  cfg = config.load_workdir(a.workdir)  # Before JAX starts: a wrong directory is reported at once.
  tok, add_bos = tokenizer.for_run(a.workdir)
  if tok is None:
    raise UserError(
      f"--workdir={a.workdir}: no SentencePiece tokenizer found (neither an imported tokenizer.model nor the "
      "tokenizer of the run's prepared data)"
    )
  if tok.vocab_size > cfg.model.vocab_size:
    raise UserError(f"the tokenizer has {tok.vocab_size} tokens, more than the model's {cfg.model.vocab_size}")
  import jax

  from maxlm.interop import sample
  from maxlm.training import checkpoint

  cfg = config.load_workdir(a.workdir, platform=jax.devices()[0].platform)
  model = checkpoint.restore_model(cfg, a.workdir, jax.devices()[:1], a.step)  # One device: sampling is small.
  results = sample.complete(
    model,
    tok,
    a.prompt,
    add_bos=add_bos,
    max_new_tokens=a.max_new_tokens,
    temperature=a.temperature,
    top_k=a.top_k,
    top_p=a.top_p,
    seed=a.seed,
  )
  for result in results:
    print(json.dumps(result))


def _sweep(args: list[str]) -> None:
  parser = _ArgumentParser("sweep")
  parser.add_argument("--sweep", required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--parallel", type=int, default=1)
  parser.add_argument("--dry_run", action="store_true")
  parser.add_argument("--prune", default="none", choices=("none", "halving"))
  parser.add_argument("--prune_eta", type=int, default=2)
  parser.add_argument("--prune_rungs", type=int, default=2)
  parser.add_argument("--retry_failed", action="store_true")
  a, rest = parser.parse_known_args(args)
  from maxlm.research import sweep  # No JAX in this process: the runs are processes of their own.

  if a.parallel < 1 or a.prune_eta < 2 or a.prune_rungs < 1:
    raise UserError("use --parallel >= 1, --prune_eta >= 2 and --prune_rungs >= 1")
  check_new_directory("--workdir", a.workdir, local_only="sweeps")
  s = sweep.Sweep(a.sweep, a.workdir, sweep.parse_base_overrides(rest))
  if a.dry_run:
    print(s.describe())
    return
  rows = sweep.execute(
    s, parallel=a.parallel, prune=a.prune, eta=a.prune_eta, rung_count=a.prune_rungs, retry_failed=a.retry_failed
  )
  counts = collections.Counter(r["status"] for r in rows)
  log.info("%s; results in %s/results.md", ", ".join(f"{n} {k}" for k, n in sorted(counts.items())), a.workdir)
  print(open(os.path.join(a.workdir, "results.md")).read(), end="")


def _compare(args: list[str]) -> None:
  parser = _ArgumentParser("compare")
  parser.add_argument("paths", nargs="+")
  parser.add_argument("--plot")
  a = parser.parse_args(args)
  from maxlm.research import compare

  runs = compare.find_runs(a.paths)
  print(compare.markdown(*compare.table(runs)), end="")
  if a.plot:
    compare.plot(runs, a.plot)
    log.info("wrote %s", a.plot)


def _ladder(args: list[str]) -> None:
  parser = _ArgumentParser("ladder")
  parser.add_argument("--ladder", required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--parallel", type=int, default=1)
  parser.add_argument("--dry_run", action="store_true")
  parser.add_argument("--predict", action="store_true")
  a, rest = parser.parse_known_args(args)
  from maxlm.research import ladder, sweep

  if a.parallel < 1:
    raise UserError("--parallel: use 1 or more")
  check_new_directory("--workdir", a.workdir, local_only="ladders")
  runs = ladder.LadderRuns(a.ladder, a.workdir, sweep.parse_base_overrides(rest))
  if a.dry_run:
    print(runs.describe())
    return
  ladder.execute(runs, parallel=a.parallel)
  result = ladder.fit_directory(a.workdir, plot=os.path.join(a.workdir, "fit.png"))
  law = result["approach3"]
  log.info(
    "fit of %d runs: L = %.3f + %.4g/N^%.3f + %.4g/D^%.3f; wrote %s/fit.json and fit.png",
    law["runs"],
    law["E"],
    law["A"],
    law["alpha"],
    law["B"],
    law["beta"],
    a.workdir,
  )
  if a.predict:
    prediction = ladder.predict_and_check(runs, parallel=a.parallel, plot=os.path.join(a.workdir, "fit.png"))
    log.info(
      "held-out %s: predicted %.4f, actual %.4f, error %+.2f%%",
      prediction["run"],
      prediction["predicted"],
      prediction["actual"],
      100 * prediction["error"],
    )
  print(json.dumps(json.load(open(os.path.join(a.workdir, "fit.json")))))


def _fit(args: list[str]) -> None:
  parser = _ArgumentParser("fit")
  parser.add_argument("directory")
  parser.add_argument("--budget", type=float)
  parser.add_argument("--plot")
  parser.add_argument("--bootstrap", type=int, default=200)
  a = parser.parse_args(args)
  from maxlm.research import ladder

  result = ladder.fit_directory(a.directory, budget=a.budget, bootstrap_samples=a.bootstrap, plot=a.plot)
  print(json.dumps(result))


def _mup_check(args: list[str]) -> None:
  flag_values = flags.FlagValues()
  widths = flags.DEFINE_list("widths", ["32", "64", "128", "256"], "d_model of each model.", flag_values=flag_values)
  steps = flags.DEFINE_integer("steps", 4, "Train steps.", lower_bound=1, flag_values=flag_values)
  lr = flags.DEFINE_float("lr", 1e-2, "Constant learning rate (no warmup).", lower_bound=0.0, flag_values=flag_values)
  plot = flags.DEFINE_string("plot", None, "Write the RMS-vs-width plot here (.png).", flag_values=flag_values)
  cfg = config.load(args, flag_values)
  try:
    sizes = [int(w) for w in widths.value]
  except ValueError:
    raise UserError(f"--widths={','.join(widths.value)}: use comma-separated integers, e.g. 32,64,128,256") from None
  if len(sizes) < 2 or min(sizes) < 1:
    raise UserError("--widths: give at least two positive widths")
  from maxlm.research import mup_check

  result = mup_check.coordinates(cfg, sizes, steps.value, lr.value)
  if plot.value:
    mup_check.plot(result, plot.value)
  growth = mup_check.growth(result, steps.value)
  log.info(
    "RMS at width %d / at width %d after %d steps: %s",
    sizes[-1],
    sizes[0],
    steps.value,
    ", ".join(f"{k} {v:.2f}x" for k, v in growth.items()),
  )
  print(json.dumps({**result, "growth": growth}))


COMMANDS = {
  "train": Command(
    """  train            --config=FILE --workdir=DIR [--config.KEY=VALUE ...]
                   train a model; writes DIR/config.json, DIR/metrics.jsonl, DIR/tb/ and DIR/checkpoints/.
                   Rerunning on a DIR with checkpoints resumes; SIGTERM/SIGINT stop after a checkpoint, as does
                   --stop_at_step=N (after an eval). DIR/summary.json says how the run ended (docs/research.md).
                   e.g. maxlm train --config=configs/tiny.py --workdir=/tmp/run --config.train.steps=50
                   Several processes (multi-host): --coordinator=HOST:PORT --num_processes=N --process_id=I
                   [--heartbeat_timeout_s=60] [--init_timeout_s=300] on each, or nothing under SLURM, Open MPI
                   and on Cloud TPU VMs (docs/multihost.md). Config keys: configs/base.py.""",
    _train,
  ),
  "bench": Command(
    """  bench            --config=FILE [--steps=10] [--warmup=3] [--results_dir=benchmarks/results]
                   [--config.KEY=VALUE ...]
                   time the train step: median step time, tokens/s/device, TFLOP/s/device, MFU, peak memory;
                   writes a JSON and appends a row to RESULTS_DIR/mfu.md""",
    _bench,
  ),
  "compile": Command(
    """  compile          --config=FILE [--topology=v5e:4x4 [--num_slices=2] | h100:8 | h200:2x8] [--json]
                   [--config.KEY=VALUE ...]
                   compile the train step ahead of time (for a TPU topology or GPUs from any host, or for the local
                   devices) and report per-device memory against the device's HBM; exit 1 when it does not fit.""",
    _compile,
  ),
  "tokenizer": Command(
    """  tokenizer train  --input PATH... --vocab_size=N --output=FILE.model [--model_type=bpe|unigram]
                   [--text_field=text]
                   train a SentencePiece tokenizer on .txt/.md/.py/.jsonl(.gz)/.parquet files, directories or globs""",
    _tokenizer,
  ),
  "data": Command(
    """  data prepare     --input PATH... --tokenizer=FILE.model --output=DIR [--val_fraction=0.01] [--workers=N]
                   [--dedup=exact|near|none] [--near_threshold=0.8] [--shingle_words=5]
                   [--filters=default|prose|code|none] [--text_field=text]
                   curate and tokenize documents once into DIR/{train,val}/ with a manifest and a curation
                   report; unreadable inputs are skipped and counted (docs/data.md)""",
    _data,
  ),
  "convert": Command(
    """  convert from-hf  --hf_dir=DIR --workdir=OUT [--param_dtype=float32|bfloat16]
                   import a Hugging Face Llama/Mistral/Mixtral safetensors model into a new workdir (params, config.py,
                   tokenizer); continue training with maxlm train --config=OUT/config.py
  convert to-hf    --workdir=RUN --out=DIR [--step=N] [--dtype=float32|bfloat16] [--max_shard_size=5GB]
                   export a run's newest (or step N) parameters as a LlamaForCausalLM directory (an MoE model:
                   MixtralForCausalLM; docs/interop.md)""",
    _convert,
  ),
  "eval": Command(
    """  eval             --workdir=RUN [--data=DIR] [--step=N] [--batches=N|all] [--batch_size=B] [--seq_len=T]
                   held-out loss, perplexity and bits per byte on a prepared dataset's val split; JSON to stdout""",
    _eval,
  ),
  "sweep": Command(
    """  sweep            --sweep=FILE --workdir=DIR [--parallel=N] [--dry_run] [--prune=none|halving] [--prune_eta=2]
                   [--prune_rungs=2] [--retry_failed] [--config.KEY=VALUE ...]
                   run every run of a sweep file (get_config + get_sweep) as DIR/runs/<name>/, N at a time; reruns
                   skip ended runs and resume the rest; DIR/results.{csv,md} sorted by the metric (docs/research.md)""",
    _sweep,
  ),
  "compare": Command(
    """  compare          PATH... [--plot=FILE.png]
                   runs or sweep directories side by side: the config keys that differ, summary figures, and
                   train/eval loss against steps, tokens and FLOPs""",
    _compare,
  ),
  "ladder": Command(
    """  ladder           --ladder=FILE --workdir=DIR [--parallel=N] [--predict] [--dry_run] [--config.KEY=VALUE ...]
                   train a scaling ladder (sizes x token or FLOP budgets; WSD: one trunk per size with decay
                   branches), fit the laws (DIR/fit.json, fit.png); --predict then predicts a held-out bigger run's
                   loss, trains it and reports the error (docs/research.md)""",
    _ladder,
  ),
  "fit": Command(
    """  fit              DIR [--budget=FLOPS] [--plot=FILE.png] [--bootstrap=200]
                   fit L(N, D) = E + A/N^alpha + B/D^beta (Chinchilla approach 3, bootstrap intervals) and IsoFLOP
                   optima (approach 2) to a ladder's finished runs; the compute-optimal N and D for a budget""",
    _fit,
  ),
  "mup-check": Command(
    """  mup-check        --config=FILE [--widths=32,64,128,256] [--steps=4] [--lr=0.01] [--plot=FILE.png]
                   [--config.KEY=VALUE ...]
                   muP coordinate check: per-layer activation RMS vs width over the first steps (JSON; flat under
                   --config.model.parametrization=mup, growing under sp)""",
    _mup_check,
  ),
  "sample": Command(
    """  sample           --workdir=RUN --prompt=TEXT [--prompt=TEXT ...] [--max_new_tokens=64] [--temperature=1.0]
                   [--top_k=0] [--top_p=1.0] [--seed=0] [--step=N]
                   KV-cache sampling, batched prompts, stops at EOS; one JSON line per prompt""",
    _sample,
  ),
}


def usage(command: str | None = None) -> str:
  if command is None:
    return HEADER + "\n" + "\n".join(c.usage for c in COMMANDS.values()) + "\n"
  lines = COMMANDS[command].usage.splitlines()
  lines = [f"usage: maxlm {' '.join(lines[0].split())}", *lines[1:]]
  return "\n".join(lines) + "\n" + HEADER.split("\n", 1)[1]


def version() -> str:
  """`maxlm VERSION (commit HASH[+dirty])`, the commit when maxlm runs from a git checkout."""
  from maxlm import provenance

  info = provenance.version()
  return f"maxlm {info['version']}" + (f" (commit {info['commit']})" if info.get("commit") else "")


class _QuietLibraryTracebacks(logging.Filter):
  """Orbax logs the tracebacks of its background threads' failures; maxlm reports them itself, in one line. Its
  threads' complaints about an interpreter that is exiting (after maxlm reported an error) are dropped."""

  def filter(self, record: logging.LogRecord) -> bool:
    if "orbax" not in record.pathname:
      return True
    record.exc_info, record.exc_text = None, None
    return "cannot schedule new futures after" not in record.getMessage()


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help", "help"):
    topic = argv[1] if len(argv) > 1 and argv[0] == "help" and argv[1] in COMMANDS else None
    print(usage(topic), end="")
    return 0 if argv else 2
  if argv[0] == "--version":
    print(version())
    return 0
  command, args = argv[0], canonical_flags(argv[1:])
  if command not in COMMANDS:
    close = difflib.get_close_matches(command, COMMANDS, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    print(f"maxlm: unknown command {command!r}; {hint}commands: {', '.join(COMMANDS)}", file=sys.stderr)
    return 2
  if any(a in ("-h", "--help", "--helpfull") for a in args):
    print(usage(command), end="")
    return 0
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
  logging.getLogger("maxlm").setLevel(logging.INFO)
  logging.getLogger("absl").addFilter(_QuietLibraryTracebacks())
  hostmem.keep_freed_memory()  # Before any JAX computation: XLA:CPU steps reuse their memory (training/hostmem.py).
  # Compiled programs that took a second or more are kept on disk: a resumed run, a sweep's or a ladder's runs and
  # the segments of a ladder's trunks start without compiling again. JAX_COMPILATION_CACHE_DIR="" turns it off.
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(provenance.cache_root(), "xla"))
  distributed.skip_unusable_tpu()  # libtpu on a host without a TPU: CPU, without libtpu's error lines.
  try:
    COMMANDS[command].run(args)
  except UserError as e:
    print(f"maxlm {command}: error: {e}", file=sys.stderr)
    return 2
  except DoesNotFit as e:
    print(f"maxlm {command}: does not fit: {e}", file=sys.stderr)
    return 1
  except RunFailed as e:
    print(f"maxlm {command}: stopped: {e}", file=sys.stderr)
    return 1
  except Exception as e:  # The machine's errors (a full disk, permissions) in one line; everything else is a bug.
    problem = errors.environment_problem(e)
    if problem is None:
      raise
    print(
      f"maxlm {command}: stopped: {problem}; free space (or fix the permissions) and rerun: complete checkpoints and "
      "datasets are kept",
      file=sys.stderr,
    )
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
