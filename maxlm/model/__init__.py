"""The model: the transformer, its attention implementations and kernels, the fused loss, and FLOP counts.

  transformer  Llama-style decoder (RMSNorm, RoPE, GQA, SwiGLU), training and KV-cache forward passes
  attention    attention in plain einsums (training, with a hand-written VJP; KV-cache decoding)
  kernels      fused attention: cuDNN (GPU), Pallas splash (TPU)
  moe          Mixture-of-Experts layers: routing, expert-parallel dispatch, balancing terms
  loss         chunked cross-entropy fused with its gradient
  flops        model FLOPs per token, device peaks, for MFU

Shape suffixes name every tensor's dimensions, joined by `x` (`x_BxTxD`), here and wherever model tensors
are handled (the train step, sampling, evaluation); tests/test_style.py checks that this legend covers them:

  B     batch rows                        D     model width (d_model)
  T     query positions (sequence)        H     query heads
  S     key positions                     K     key/value heads
  P     prompt positions (sampling)       G     query heads per kv head, H/K
  C     positions of one loss chunk       Dh    head dim, D/H
  n     loss chunks of a row, T/C
  Q     query rows of an attention block: G·t for t positions (the G heads of a kv head folded in)
  Half  Dh/2 (RoPE pairs)                 F     MLP width
  V     vocabulary                        N     layers
  b, k, h  the part of B, K, H on one device (inside shard_map)
  X     tokens on one device, b·T (MoE)   E     routed experts
  A     experts chosen per token, top_k   e     the experts on one device, E/Ep
  R     routed copies of tokens, X·A      Ep    devices on the expert mesh axis
  M     rows a device receives, Ep·R      Cap   slots per expert (capacity)
  Nm    MoE layers
  g, t  groups of a grouped matmul; rows of a tile of its CPU form (n tiles, P segments)
  1, 2  literal sizes: 1 a broadcast axis, 2 the stacked gate and up projections
"""
