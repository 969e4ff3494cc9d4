"""A scaling ladder on the demo corpus for a 2-core CPU: 6 sizes (65K to 0.9M matmul weights) x 1.5, 3 and 6 tokens
per parameter, one WSD trunk per size with decay branches, and a held-out prediction for a bigger model.

  maxlm ladder --ladder=configs/ladders/tiny.py --workdir=/tmp/ladder --parallel=2 [--predict]

The corpus is the Python standard library with a 1024-token tokenizer (prepared on first use), so the blocks, not
the embedding, hold most of the weights even at these sizes. Results: docs/research.md.
"""

from configs import base
from maxlm.data import stdlib_corpus
from maxlm.research import ladder

SHAPES = [(2, 32), (2, 48), (2, 64), (3, 80), (3, 96), (4, 112)]  # (num_layers, d_model), head dim 16


def get_config():
  c = base.get_config()
  c.model.update(vocab_size=1024, scan_layers=False)
  c.data.update(source="prepared", path=stdlib_corpus.prepared(vocab_size=1024)[0], seq_len=128)
  c.optim.update(schedule="wsd", decay_fraction=0.2, warmup_steps=10, min_lr_ratio=0.0)
  c.train.update(global_batch=16, eval_every=100_000, eval_batches=16, log_every=20)
  c.checkpoint.update(every_steps=100_000, keep=10)
  return c


def get_ladder():
  return ladder.Ladder(
    sizes=ladder.depth_width(SHAPES, head_dim=16),
    tokens_per_param=[1.5, 3.0, 6.0],
    lr=lambda n: min(1e-2, 1e-2 * (n / 1e5) ** -0.25),
    predict={"size": ladder.depth_width([(4, 128)], head_dim=16)[0], "tokens_per_param": 3.0},
  )
