"""`make demo`: a language model trained end to end on this machine's CPU, offline, in a few minutes.

1. corpus: the Python standard library's .py files, test folders left out (every Python install has them);
2. a 4096-token SentencePiece tokenizer, and 3. a prepared dataset (exact and near dedup, code quality
   rules, one worker process per core), both cached under --cache (maxlm/data/stdlib_corpus.py);
4. `maxlm train` with configs/demo.py; 5. a few lines sampled from the trained model.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from maxlm import config  # noqa: E402
from maxlm.data import stdlib_corpus, tokenizer  # noqa: E402
from maxlm.errors import UserError  # noqa: E402
from maxlm.interop import sample  # noqa: E402
from maxlm.parallel import distributed  # noqa: E402
from maxlm.training import checkpoint, hostmem, loop  # noqa: E402

PROMPTS = ["def ", "import ", "class Config", "    return "]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/maxlm-demo")
  parser.add_argument("--cache", default=stdlib_corpus.default_cache())
  parser.add_argument("--max-files", type=int, default=0, help="use only the first N stdlib files (tests)")
  parser.add_argument("--val-fraction", type=float, default=0.02)
  args, overrides = parser.parse_known_args()  # The rest: --config.KEY=VALUE overrides of configs/demo.py.
  if any(not o.startswith("--config.") for o in overrides):
    parser.error(f"unknown arguments {overrides}: only --config.KEY=VALUE overrides may follow")
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
  log = logging.getLogger("maxlm")
  log.setLevel(logging.INFO)
  hostmem.keep_freed_memory()  # As `maxlm train` does, before any JAX computation.

  data_dir, tok_path, manifest = stdlib_corpus.prepared(args.cache, args.max_files, args.val_fraction, progress=True)
  log.info(
    "corpus: %s; removed %s (see %s/curation_report.md)",
    ", ".join(f"{k} {v['documents']} files / {v['tokens']:,} tokens" for k, v in manifest["splits"].items()),
    ", ".join(
      f"{manifest['curation'][k]} {k.replace('_', ' ')}" for k in ("exact_duplicates", "near_duplicates", "filtered")
    ),
    data_dir,
  )

  distributed.skip_unusable_tpu()  # `make test` installs libtpu into the same venv; on a CPU host it is no use here.
  import jax

  cfg = config.load([f"--config={REPO}/configs/demo.py", f"--config.data.path={data_dir}", *overrides])
  cfg = config.validate(cfg, num_devices=jax.device_count(), platform=jax.devices()[0].platform)
  records = loop.run(cfg, args.workdir)
  evals = [r["eval_loss"] for r in records if "eval_loss" in r]
  print(
    f"\nfinal train loss {records[-1]['loss']:.3f}, eval loss {evals[-1]:.3f}, "
    f"MFU {100 * records[-1]['mfu']:.1f}% ({records[-1]['tokens_per_sec']:,.0f} tokens/s)"
  )

  # The same code path as `maxlm sample --workdir=... --temperature=0.8 --top_k=20`.
  model = checkpoint.restore_model(cfg, args.workdir)
  results = sample.complete(
    model, tokenizer.Tokenizer(tok_path), PROMPTS, max_new_tokens=40, temperature=0.8, top_k=20, seed=0
  )
  print("samples (temperature 0.8, top-k 20):")
  for r in results:
    print("  " + repr(r["prompt"] + r["completion"])[1:-1][:160])


if __name__ == "__main__":
  try:
    main()
  except UserError as e:
    print(f"demo: error: {e}", file=sys.stderr)
    sys.exit(2)
