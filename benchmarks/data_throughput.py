"""Data pipeline throughput on this host: `data prepare` MB/s, loader tokens/s, and loader vs. training.

Corpus: the Python standard library's source (as in `make demo`). Measures:
  tokenizer training time; prepare throughput (input MB/s, demo settings: exact + near dedup and the
  quality rules) with 1 and with 2 worker processes, timing the `maxlm data prepare` command (process
  start included); packed-row loader tokens/s
  (PackedSource -> per-process batches, as training reads it); the demo model's training tokens/s; and the
  ratio loader / training (target >= 20x: data loading must never be what a run waits for).
Writes benchmarks/results/data_throughput_<platform>.json (not with --max-files, a quick check that it runs).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grain  # noqa: E402
import jax  # noqa: E402

from maxlm import config  # noqa: E402
from maxlm.data import corpus, pipeline, stdlib_corpus, tokenizer  # noqa: E402
from maxlm.training import hostmem, loop  # noqa: E402

from timing import step_times  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--max-files", type=int, default=0, help="only the first N stdlib files (a quick check)")
  args = parser.parse_args()
  hostmem.keep_freed_memory()  # As the `maxlm` command does.
  files = stdlib_corpus.files(args.max_files)
  megabytes = sum(os.path.getsize(f) for f in files) / 1e6
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    tok = tokenizer.train(
      corpus.documents(files, collections.Counter()), vocab_size=4096, output=os.path.join(tmp, "tok.model")
    )
    tokenizer_s = time.perf_counter() - t0
    prepare_s = {}
    for workers in (1, 2):  # Same output either way; only the time differs.
      # Timed as users run it: the `maxlm data prepare` command, whose worker processes import only what the
      # command needs (spawned workers re-import the main module, and this script's imports JAX).
      t0 = time.perf_counter()
      subprocess.run(
        [
          sys.executable,
          "-m",
          "maxlm",
          "data",
          "prepare",
          "--input",
          *files,
          "--tokenizer",
          tok.path,
          "--output",
          os.path.join(tmp, f"ds{workers}"),
          "--dedup",
          "near",
          "--workers",
          str(workers),
          "--val_fraction",
          "0.3" if args.max_files else "0.02",
        ],  # a few files still need a val split
        check=True,
        capture_output=True,
        cwd=REPO,
      )
      prepare_s[workers] = time.perf_counter() - t0
    with open(os.path.join(tmp, "ds1", "manifest.json")) as f:
      manifest = json.load(f)
    os.rename(os.path.join(tmp, "ds1"), os.path.join(tmp, "ds"))

    cfg = config.validate(
      config.load(
        [
          f"--config={REPO}/configs/demo.py",
          f"--config.data.path={tmp}/ds",
          "--config.metrics.peak_tflops=1",
          "--config.checkpoint.every_steps=0",
        ]
      ),
      num_devices=1,
    )
    source = pipeline.PackedSource(os.path.join(tmp, "ds"), "train", cfg.data.seq_len, seed=0)
    it = iter(pipeline.batches(grain.MapDataset.source(source), cfg.train.global_batch, 0, 1))
    next(it)
    n, t0 = 200, time.perf_counter()
    for _ in range(n):
      next(it)
    loader_tokens_per_s = n * cfg.train.global_batch * cfg.data.seq_len / (time.perf_counter() - t0)

    session = loop.setup(cfg, jax.devices()[:1])
    _, times = step_times(session, session.program.init(), steps=6, warmup=2)
    train_tokens_per_s = session.tokens_per_step / statistics.median(times)

  device = jax.devices()[0]
  result = {
    "benchmark": "data_throughput",
    "date": datetime.date.today().isoformat(),
    "device": device.device_kind,
    "host_cores": os.cpu_count(),
    "corpus": f"Python {sys.version.split()[0]} standard library, {len(files)} files",
    "corpus_mb": megabytes,
    "tokens": sum(s["tokens"] for s in manifest["splits"].values()),
    "tokenizer_train_s": tokenizer_s,
    **{f"prepare_mb_per_s ({w} worker{'s' * (w > 1)})": megabytes / t for w, t in prepare_s.items()},
    "prepare_settings": "dedup=near (threshold 0.8), filters=default",
    "loader_tokens_per_s": loader_tokens_per_s,
    "train_tokens_per_s (configs/demo.py)": train_tokens_per_s,
    "loader_over_train": loader_tokens_per_s / train_tokens_per_s,
  }
  print(json.dumps(result, indent=2))
  if not args.max_files:
    os.makedirs(f"{REPO}/benchmarks/results", exist_ok=True)
    with open(f"{REPO}/benchmarks/results/data_throughput_{device.platform}.json", "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
