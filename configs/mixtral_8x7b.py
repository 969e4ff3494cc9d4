"""Mixtral 8x7B shapes (46.7B parameters, 12.9B active): 32 MoE layers of 8 SwiGLU experts (width 14336), top-2,
softmax routing renormalised over the two, GQA 32/8, rope_theta 1e6, untied; seq 4096. Experts split over
mesh.expert, the rest FSDP."""

from configs import base


def get_config():
  c = base.get_config()
  c.model.update(
    vocab_size=32000,
    d_model=4096,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    mlp_dim=14336,
    rope_theta=1_000_000.0,
    tie_embeddings=False,
    remat="full",
    max_position_embeddings=32768,
  )
  c.model.moe.update(num_experts=8, top_k=2, router="softmax", renormalize=True, lb_weight=0.04, router_z_weight=0.0)
  c.data.seq_len = 4096
  c.mesh.update(data=1, fsdp=-1, expert=8)
  c.train.update(steps=20000, global_batch=256, eval_every=1000, log_every=10, loss_chunk=1024)
  c.optim.update(lr=3e-4, warmup_steps=2000)
  return c
