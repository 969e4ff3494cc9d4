"""~10M-parameter Llama for CPU throughput measurements (benchmarks/step_throughput.py)."""

from configs import base


def get_config():
  c = base.get_config()
  c.model.update(
    vocab_size=4096,
    d_model=256,
    num_layers=10,
    num_heads=8,
    num_kv_heads=4,
    mlp_dim=768,
    tie_embeddings=False,
    scan_layers=False,
  )  # Unrolled: 42% vs 36% of the matmul rate (NOTES.md).
  c.data.seq_len = 256
  c.train.global_batch = 8
  c.optim.lr = 1e-3
  return c
