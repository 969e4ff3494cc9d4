"""DeepSeek-MoE 16B shapes (16.4B parameters, 2.8B active): 28 layers, the first dense (width 10944), then 64
fine-grained routed experts (width 1408) with top-6 softmax routing (not renormalised) and 2 shared experts; MHA 16
heads, vocab 102400; seq 4096."""

from configs import base


def get_config():
  c = base.get_config()
  c.model.update(
    vocab_size=102400,
    d_model=2048,
    num_layers=28,
    num_heads=16,
    num_kv_heads=16,
    mlp_dim=10944,
    tie_embeddings=False,
    remat="full",
    norm_eps=1e-6,
  )
  c.model.moe.update(
    num_experts=64, top_k=6, mlp_dim=1408, shared_experts=2, first_dense=1, renormalize=False, lb_weight=0.001
  )
  c.data.seq_len = 4096
  c.mesh.update(data=1, fsdp=-1, expert=8)
  c.train.update(steps=20000, global_batch=256, eval_every=1000, log_every=10, loss_chunk=1024)
  c.optim.update(lr=4.2e-4, warmup_steps=2000)
  return c
