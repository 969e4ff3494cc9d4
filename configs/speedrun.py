"""Speedrun: how fast does the demo model reach a fixed eval loss on the standard-library corpus (CPU)?

The corpus, tokenizer and dataset are built on first use and cached (maxlm/data/stdlib_corpus.py). The eval set is
fixed: the same eval_batches batches of the val split at every eval (data.seed fixed; vary train.seed for repeats).
Every 10 steps the model is evaluated; at the first eval at or below TARGET the run stops, and summary.json records
time_to_target_s (time in train steps only: no compilation, evaluation or start-up), tokens_to_target and
step_to_target. configs/sweeps/speedrun.py runs it over seeds: "is change X faster to the target?" is one sweep.
"""

from configs import demo
from maxlm.data import stdlib_corpus

TARGET = 4.8  # Eval loss (nats/token) the demo model reaches in about 140 of its 400 steps (docs/research.md).


def get_config():
  c = demo.get_config()
  c.data.path = stdlib_corpus.prepared()[0]
  c.train.update(steps=400, eval_every=10, eval_batches=8, log_every=10, target_eval_loss=TARGET, stop_at_target=True)
  c.checkpoint.every_steps = 50
  return c
