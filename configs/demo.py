"""`make demo`: a 2.4M-parameter Llama trained for a few minutes on the Python standard library (CPU).

tools/demo.py prepares the corpus and sets data.path; the tokenizer has 4096 tokens.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.update(
    vocab_size=4096, d_model=192, num_layers=4, num_heads=6, num_kv_heads=2, mlp_dim=512, scan_layers=False
  )
  c.data.update(source="prepared", seq_len=256)
  c.train.update(steps=200, global_batch=8, eval_every=100, eval_batches=8, log_every=20)
  c.optim.update(lr=3e-3, warmup_steps=25)
  c.checkpoint.every_steps = 100
  return c
