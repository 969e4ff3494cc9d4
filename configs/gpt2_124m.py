"""GPT-2-124M shape on the Llama block (RoPE, SwiGLU, RMSNorm), the nanoGPT baseline size.

SwiGLU uses three matrices, so mlp_dim = 2048 keeps the MLP parameter count of GPT-2's 4·D = 3072.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.update(
    vocab_size=50304, d_model=768, num_layers=12, num_heads=12, num_kv_heads=12, mlp_dim=2048, tie_embeddings=True
  )
  c.data.seq_len = 1024
  c.train.update(steps=5000, global_batch=512, microbatches=8, eval_every=250, log_every=10)
  c.train.loss_chunk = 256  # 50K vocab: f32 logits of one 1024-token row are 206 MB; 4 chunks never hold them all.
  c.optim.update(lr=6e-4, warmup_steps=700)
  return c
