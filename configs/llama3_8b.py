"""Llama 3 8B shapes (untied embeddings, GQA 32/8, rope_theta 5e5), seq 8192, FSDP over all devices."""

from configs import base


def get_config():
  c = base.get_config()
  c.model.update(
    vocab_size=128256,
    d_model=4096,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    mlp_dim=14336,
    rope_theta=500_000.0,
    tie_embeddings=False,
    remat="full",
  )
  c.mesh.update(data=1, fsdp=-1)
  c.data.seq_len = 8192
  c.train.update(steps=100000, global_batch=512, eval_every=1000, log_every=10)
  c.train.loss_chunk = 512  # 128K vocab: f32 logits of one 8192-token row are 4 GiB; chunk them.
  c.optim.update(lr=3e-4, warmup_steps=2000)
  return c
