"""The model: the transformer, its attention implementations and kernels, the fused loss, and FLOP counts.

  transformer  Llama-style decoder (RMSNorm, RoPE, GQA, SwiGLU), training and KV-cache forward passes
  attention    attention in plain einsums (training, with a hand-written VJP; KV-cache decoding)
  kernels      fused attention: cuDNN (GPU), Pallas splash (TPU)
  loss         chunked cross-entropy fused with its gradient
  flops        model FLOPs per token, device peaks, for MFU
"""
