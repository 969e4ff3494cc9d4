"""Llama 3.2 1B at 32K context: the sequence split over mesh.context (maxlm/parallel/context.py).

Llama 3.2's long-context RoPE (llama3 scaling, factor 32 from an 8K original); 16 rows of 32K tokens per step
(512K tokens). Parameters and optimizer state split over fsdp × context; on a v5p-16 (8 chips) everything is
context-parallel: `maxlm compile --config=configs/llama_1b_32k.py --topology=v5p:2x2x2`.
"""

from configs import llama_1b


def get_config():
  c = llama_1b.get_config()
  c.model.rope_scaling.update(type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0)
  c.model.rope_scaling.original_max_len = 8192
  c.model.remat = "full"  # Per layer only its input is kept: at 32K a layer's activations are GiBs per row.
  c.data.seq_len = 32768
  c.train.update(global_batch=16, microbatches=16, loss_chunk=1024)
  c.mesh.update(data=1, fsdp=1, context=-1)
  return c
