"""Llama 3.2 1B shapes (tied embeddings, rope_theta 5e5), seq 2048."""

from configs import base


def get_config():
  c = base.get_config()
  c.model.update(
    vocab_size=128256,
    d_model=2048,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    mlp_dim=8192,
    rope_theta=500_000.0,
    tie_embeddings=True,
    remat="dots_no_batch",
  )
  c.data.seq_len = 2048
  c.train.update(steps=20000, global_batch=256, eval_every=1000, log_every=10)
  c.train.loss_chunk = 512  # 128K vocab: f32 logits of one 2048-token row are 1 GiB; chunk them.
  c.optim.update(lr=3e-4, warmup_steps=2000)
  return c
