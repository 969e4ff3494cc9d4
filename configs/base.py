"""The config schema: every key maxlm reads, with its default. Named configs override what differs.

Override any key on the command line: `--config.model.num_layers=4`. Keys are validated at load
(maxlm/config.py): unknown keys, wrong types, values outside `CHOICES` and inconsistent shapes exit with code 2.
"""

import ml_collections

# Keys that take one of a fixed set of values, written only here: validation reads `CHOICES`, and the tables of the
# code that acts on them (attention implementations, remat policies, schedules) are tested to match them.
PARAM_DTYPES = ("float32", "bfloat16")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")  # auto: bfloat16 on GPU/TPU, float32 on CPU.
# auto: splash on TPU (data.seq_len % 128 == 0), cudnn on GPU with bfloat16, else xla; xla: block-causal einsums
# (any platform); cudnn: cuDNN flash attention (GPU, bfloat16); splash: Pallas splash attention (TPU).
ATTENTION = ("auto", "xla", "cudnn", "splash")
QUANTIZATIONS = ("none", "fp8", "int8")  # maxlm/model/quant.py
ROPE_SCALING = (
  "none",
  "llama3",
)  # llama3: Llama 3.1/3.2 (long wavelengths stretched by `factor`, smooth band between).
# none: keep every activation for the backward pass; full: recompute each block's forward in the backward pass;
# dots: keep only matmul outputs; dots_no_batch: keep only matmul outputs without a batch dimension (weights-like).
REMAT = ("none", "full", "dots", "dots_no_batch")
# learnable walk | flat token file | maxlm data prepare output | text records tokenized as read (maxlm/data/records.py).
DATA_SOURCES = ("synthetic", "tokens", "prepared", "array_record", "parquet")
TOKEN_DTYPES = ("uint16", "uint32")
SCHEDULES = ("cosine", "wsd", "constant")  # warmup + cosine | warmup-stable-decay | warmup + flat.
# sp: standard parametrization; mup: maximal update (Yang et al. 2022): with m = d_model / model.mup_base_width, block
# matrices' Adam learning rate x 1/m, logits x 1/m, attention scores / Dh, so hyperparameters tuned at the base width
# transfer to wider models (init: fan-in already; embeddings, norms and the head unchanged).
PARAMETRIZATIONS = ("sp", "mup")
# softmax: softmax over the experts' logits (Mixtral); sigmoid: independent sigmoid scores (DeepSeek-V3).
ROUTERS = ("softmax", "sigmoid")
# Dropless MoE's grouped matmuls. auto: megablox on TPU, ragged_dot elsewhere; ragged_dot: jax.lax.ragged_dot (XLA);
# megablox: the Pallas TPU kernel (jax.experimental.pallas.ops.tpu.megablox; interpreted off TPU: slow, for tests).
GROUPED_MATMULS = ("auto", "ragged_dot", "megablox")
# How context-parallel attention (mesh.context > 1, maxlm/parallel/context.py) sees the other shards' keys.
# all_gather: K and V gathered over the context axis at once; ring: passed around the ring block by block (ppermute).
CONTEXT_ATTENTION = ("all_gather", "ring")
# DiLoCo's outer optimizer on the replicas' mean drift: nesterov: SGD with Nesterov momentum (DiLoCo); sgd: heavy ball.
OUTER_OPTIMIZERS = ("nesterov", "sgd")
DILOCO_COMM_DTYPES = ("float32", "bfloat16", "int8")  # the dtype the replicas' drifts cross in (int8: gathered)
# adamw: AdamW everywhere; muon: Muon for the blocks' projection matrices, AdamW for embeddings, norms and the head.
OPTIMIZERS = ("adamw", "muon")
# none: no checks; skip: reject a non-finite or spiking update and go on; rollback: reject it, then restore the last
# checkpoint and skip the data that led there.
GUARD_POLICIES = ("none", "skip", "rollback")

CHOICES = {
  "model.param_dtype": PARAM_DTYPES,
  "model.compute_dtype": COMPUTE_DTYPES,
  "model.attention": ATTENTION,
  "model.quantization": QUANTIZATIONS,
  "model.rope_scaling.type": ROPE_SCALING,
  "model.remat": REMAT,
  "model.context_attention": CONTEXT_ATTENTION,
  "model.parametrization": PARAMETRIZATIONS,
  "model.moe.router": ROUTERS,
  "model.moe.grouped_matmul": GROUPED_MATMULS,
  "data.source": DATA_SOURCES,
  "data.token_dtype": TOKEN_DTYPES,
  "optim.schedule": SCHEDULES,
  "optim.name": OPTIMIZERS,
  "train.guard.policy": GUARD_POLICIES,
  "train.diloco.outer_optimizer": OUTER_OPTIMIZERS,
  "train.diloco.comm_dtype": DILOCO_COMM_DTYPES,
}


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 256  # Tokens in the vocabulary (embedding rows and output logits).
  m.d_model = 64  # Residual stream width D.
  m.num_layers = 2  # Transformer blocks N.
  m.num_heads = 4  # Query heads H; head_dim = d_model / num_heads (must be even for RoPE).
  m.num_kv_heads = 2  # Key/value heads K for grouped-query attention; num_heads % num_kv_heads == 0.
  m.mlp_dim = 192  # SwiGLU hidden width F.
  m.rope_theta = 10_000.0  # RoPE base frequency (Llama 2: 1e4, Llama 3: 5e5).
  m.rope_scaling = r = ml_collections.ConfigDict()  # RoPE frequency scaling for long context (HF rope_scaling).
  r.type = "none"  # One of ROPE_SCALING.
  r.factor = 8.0  # llama3: frequencies with wavelength > original_max_len / low_freq_factor are divided by this.
  r.low_freq_factor = 1.0  # llama3: bounds the stretched band (see above).
  r.high_freq_factor = 4.0  # llama3: wavelengths < original_max_len / high_freq_factor are kept; > low_freq_factor.
  r.original_max_len = 8192  # llama3: the context length the model was pre-trained at.
  m.max_position_embeddings = 0  # Context length the model is meant for (HF max_position_embeddings); 0 = data.seq_len.
  m.tie_embeddings = True  # Output projection reuses the token embedding matrix.
  m.qk_norm = False  # RMSNorm on queries and keys (per head) before RoPE.
  m.norm_eps = 1e-5  # RMSNorm epsilon.
  m.init_std = 0.02  # Std of the normal init of embeddings; projections use 1/sqrt(fan_in).
  m.param_dtype = "float32"  # Stored (master) parameter dtype, one of PARAM_DTYPES.
  m.compute_dtype = "auto"  # Matmul/activation dtype, one of COMPUTE_DTYPES.
  m.attention = "auto"  # Attention implementation, one of ATTENTION.
  # Projection matmuls (attention, MLP, experts) in low precision, one of QUANTIZATIONS (maxlm/model/quant.py): fp8
  # for H100/H200, int8 for TPU; embedding, router, output head and attention scores stay in compute_dtype.
  m.quantization = "none"
  m.scan_layers = True  # jax.lax.scan over layers (fast compile); False unrolls. Parameter layout is the same.
  m.remat = "none"  # Rematerialisation per block, one of REMAT.
  m.pipeline_repeats = 1  # With mesh.stage > 1: 1 = GPipe, R > 1 = circular (each stage runs R blocks of layers).
  # With mesh.context > 1, one of CONTEXT_ATTENTION; all_gather runs model.attention=splash's kernel, else einsums.
  m.context_attention = "all_gather"
  m.parametrization = "sp"  # One of PARAMETRIZATIONS (maxlm/training/optim.py and the model read it).
  m.mup_base_width = 0  # mup: the d_model whose tuned hyperparameters transfer (0 = this model's d_model, m = 1).
  m.moe = e = ml_collections.ConfigDict()  # Mixture of Experts (maxlm/model/moe.py); num_experts=0: a dense model.
  e.num_experts = 0  # Routed experts E in each MoE layer (0 = no MoE layers); mesh.expert must divide it.
  e.top_k = 2  # Experts each token is sent to.
  e.mlp_dim = 0  # SwiGLU width of one routed expert (0 = model.mlp_dim).
  e.shared_experts = 0  # Always-on experts beside the routed ones (DeepSeek): one SwiGLU of shared_experts·moe.mlp_dim.
  e.first_dense = 0  # Leading layers that stay dense (DeepSeek-MoE: 1).
  e.every = 1  # After those, every k-th layer is MoE (the last of each group of k): 1 = all, 2 = every other.
  e.capacity_factor = 0.0  # Expert slots per device = ceil(factor·tokens·top_k/E), overflow dropped; 0 = dropless.
  e.router = "softmax"  # Routing scores, one of ROUTERS.
  e.grouped_matmul = "auto"  # Dropless grouped-matmul kernel, one of GROUPED_MATMULS.
  e.renormalize = True  # Divide the top_k routing weights by their sum (Mixtral; DeepSeek's norm_topk_prob).
  e.lb_weight = 0.01  # Weight of the load-balance loss E·Σ f_e·p_e (1 when balanced; Switch/GShard).
  e.router_z_weight = 0.001  # Weight of the router z-loss mean(logsumexp(router logits)²) (ST-MoE).
  e.bias_update_rate = 0.0  # Auxiliary-loss-free balancing (DeepSeek-V3): per-step bias step γ (1e-3); 0 = off.

  c.mesh = ml_collections.ConfigDict()
  c.mesh.diloco = 1  # DiLoCo replicas: set from train.diloco.replicas by validation (leave it at 1).
  # Pipeline parallel: the layers split into stages (maxlm/parallel/pipeline.py; dense models); num_layers must divide
  # by stage*model.pipeline_repeats. -1 fills.
  c.mesh.stage = 1
  c.mesh.data = -1  # Pure data-parallel axis (replicated params); -1 fills the remaining devices.
  c.mesh.fsdp = 1  # Data parallel with parameters and optimizer state sharded (ZeRO-3); -1 fills.
  c.mesh.expert = 1  # Expert parallel: MoE experts split over it, and a data-parallel axis elsewhere; -1 fills.
  # Context parallel: every row's sequence split (load-balanced for the causal mask), attention by
  # model.context_attention; parameters sharded over it like fsdp. data.seq_len must divide by 2*context; -1 fills.
  c.mesh.context = 1
  c.mesh.tensor = 1  # Tensor (Megatron) parallel over heads, MLP width and vocab; -1 fills.
  c.mesh.dcn_data = (
    1  # Slices the data axis spans over DCN (multi-slice TPU; processes off TPU); mesh.data is per slice.
  )
  c.mesh.dcn_fsdp = 1  # Slices the fsdp axis spans over DCN; dcn_diloco*dcn_data*dcn_fsdp = number of slices (or 1).
  # Slices DiLoCo's replicas span (train.diloco.replicas a multiple of it); on several slices with every dcn_* at 1,
  # validation sets it to the number of slices when the replicas divide by it.
  c.mesh.dcn_diloco = 1

  c.data = d = ml_collections.ConfigDict()
  d.source = "synthetic"  # Where training rows come from, one of DATA_SOURCES.
  d.path = (
    ""  # tokens: a file of little-endian ints (data.token_dtype); prepared: dataset dir(s); array_record/parquet:
    # files, directories or globs; all comma-separated, local or gs://.
  )
  d.tokenizer = ""  # source=array_record/parquet: the SentencePiece .model that tokenizes the records.
  d.text_field = "text"  # source=parquet: the text column; array_record: the field of JSON records (else raw text).
  d.weights = ""  # source=prepared with several datasets: mixing weights, comma-separated (empty = equal).
  d.token_dtype = "uint16"  # Element type of the token file, one of TOKEN_DTYPES.
  d.eval_fraction = (
    0.01  # source=tokens: last fraction of the file held out for eval; array_record/parquet: of records.
  )
  d.seq_len = 64  # Tokens per training row T.
  d.seed = 0  # Data order seed (independent of the parameter init seed train.seed).
  d.num_workers = 0  # Grain worker processes for loading (0 = in the training process).

  c.optim = o = ml_collections.ConfigDict()
  o.name = "adamw"  # Optimizer, one of OPTIMIZERS (maxlm/training/optim.py).
  o.lr = 3e-3  # Peak learning rate.
  o.schedule = "cosine"  # Learning-rate schedule, one of SCHEDULES.
  o.warmup_steps = 20  # Linear warmup from 0 to optim.lr.
  o.decay_fraction = 0.2  # wsd: fraction of train.steps spent in the final linear decay.
  o.min_lr_ratio = 0.1  # Final learning rate as a fraction of optim.lr (cosine and wsd).
  o.b1 = 0.9  # AdamW beta1.
  o.b2 = 0.95  # AdamW beta2.
  o.eps = 1e-8  # AdamW epsilon.
  o.weight_decay = 0.1  # Decoupled weight decay on matrices; never on norm scales.
  o.decay_embeddings = False  # Also apply weight decay to the token embedding.
  o.clip_norm = 1.0  # Clip gradients to this global L2 norm (0 disables).
  o.muon_lr = 0.02  # muon: peak learning rate of the block matrices (same schedule shape); optim.lr is the rest's.
  o.muon_momentum = 0.95  # muon: Nesterov momentum of the block matrices.

  c.train = t = ml_collections.ConfigDict()
  t.steps = 200  # Optimizer steps.
  t.global_batch = 16  # Rows per step over all devices; divisible by microbatches × (mesh.data × mesh.fsdp).
  t.microbatches = 1  # Gradient accumulation: the step runs global_batch/microbatches rows at a time.
  t.pipeline_microbatches = 0  # With mesh.stage > 1: pieces of each microbatch's rows in flight; 0 = mesh.stage.
  # DiLoCo (maxlm/training/diloco.py): replicas train apart and average their drift every sync_every steps.
  t.diloco = dl = ml_collections.ConfigDict()
  dl.replicas = 1  # Model replicas over a `diloco` mesh axis (the outermost: processes or hosts); 1 = off.
  dl.sync_every = 50  # Inner steps H between outer steps.
  dl.outer_optimizer = "nesterov"  # One of OUTER_OPTIMIZERS.
  dl.outer_lr = 0.7  # Outer learning rate.
  dl.outer_momentum = 0.9  # Outer momentum (0: none).
  dl.fragments = 1  # Streaming DiLoCo: parameter fragments (layer groups) synced at staggered steps; 1 = all at once.
  dl.comm_dtype = "float32"  # One of DILOCO_COMM_DTYPES.
  t.seed = 0  # Parameter init seed.
  t.init_from = (
    ""  # A maxlm workdir (imported or trained) whose parameters start a run without checkpoints; fresh optimizer.
  )
  t.z_loss = 0.0  # Weight of the z-loss term mean(logsumexp(logits)^2) (PaLM uses 1e-4).
  t.loss_chunk = 0  # Positions per cross-entropy chunk (divides data.seq_len); 0 = the full [B, T, V] logits at once.
  t.log_every = 10  # Steps between metrics.jsonl / progress updates.
  t.eval_every = 100  # Steps between evals on the held-out split (0 disables).
  t.eval_batches = 4  # Global batches per eval.
  t.target_eval_loss = 0.0  # Eval loss counted as reached: summary.json has time/tokens/step to it (0 = none).
  t.stop_at_target = False  # End the run (finished) at the first eval at or below train.target_eval_loss.
  t.inject_nan_at_step = 0  # Fault injection: make this step's loss and gradients NaN (0 = off).
  t.inject_spike_at_step = 0  # Fault injection: multiply this step's loss and gradients by 100 (0 = off).

  t.guard = g = ml_collections.ConfigDict()  # Stability guard: a rejected step never changes the state.
  g.policy = "skip"  # One of GUARD_POLICIES.
  g.spike_z = 6.0  # A loss above mean + spike_z·std of the last `window` accepted losses is a spike (0 = off).
  g.window = 50  # Accepted steps in the spike statistics; detection starts once the window is full.
  g.max_rollbacks = 3  # rollback: give up (exit 1) after this many rollbacks in one run.
  g.rollback_lr_scale = 0.5  # rollback: learning-rate factor for the steps right after a rollback.
  g.rollback_lr_steps = 100  # rollback: how many steps the lowered learning rate lasts.

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 100  # Save every N steps, at the last step and on SIGTERM/SIGINT; 0 = no checkpoints.
  c.checkpoint.every_minutes = 0.0  # Also save once this many minutes passed since the last save (0 = off).
  c.checkpoint.keep = 3  # Newest checkpoints kept; older ones are deleted after a newer save completes.
  c.checkpoint.keep_every = 0  # Also keep, permanently, checkpoints whose step is a multiple of this (0 = off).

  c.metrics = ml_collections.ConfigDict()
  c.metrics.peak_tflops = 0.0  # Per-device peak for MFU; 0 = device table, or a measured matmul rate on CPU.
  c.metrics.tensorboard = True  # Write TensorBoard events to <workdir>/tb/.
  c.metrics.profile_steps = ""  # JAX profiler trace of steps "FIRST-LAST" (or one step "N") into <workdir>/profile/.
  return c
