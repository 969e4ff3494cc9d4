"""Load a run config (an ml-collections file plus `--config.key=value` overrides) and validate it.

Every problem is a `UserError` whose message is one line naming the key and the fix; the CLI prints it
and exits with code 2. `configs/base.py` is the schema: a key it lacks is unknown, and a value must have
the type of the base default.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from collections.abc import Iterator, Sequence

import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from configs import base
from maxlm import storage
from maxlm.errors import UserError
from maxlm.files import read_json_object

MESH_AXES = ("diloco", "stage", "data", "fsdp", "expert", "context", "tensor")
DCN_AXES = ("diloco", "data", "fsdp")  # Mesh axes that may also span slices: `mesh.dcn_<axis>` slices each.

# (key, lowest allowed value); a key listed here must be >= its bound.
MINIMA = {
  "model.vocab_size": 1,
  "model.d_model": 1,
  "model.num_layers": 1,
  "model.num_heads": 1,
  "model.num_kv_heads": 1,
  "model.mlp_dim": 1,
  "model.rope_theta": 1e-9,
  "model.norm_eps": 0.0,
  "model.init_std": 0.0,
  "model.rope_scaling.factor": 1.0,
  "model.rope_scaling.low_freq_factor": 1e-9,
  "model.rope_scaling.original_max_len": 1,
  "model.max_position_embeddings": 0,
  "model.mup_base_width": 0,
  "model.pipeline_repeats": 1,
  "model.moe.num_experts": 0,
  "model.moe.top_k": 1,
  "model.moe.mlp_dim": 0,
  "model.moe.shared_experts": 0,
  "model.moe.first_dense": 0,
  "model.moe.every": 1,
  "model.moe.capacity_factor": 0.0,
  "model.moe.lb_weight": 0.0,
  "model.moe.router_z_weight": 0.0,
  "model.moe.bias_update_rate": 0.0,
  "data.seq_len": 1,
  "data.num_workers": 0,
  "optim.lr": 0.0,
  "optim.warmup_steps": 0,
  "optim.decay_fraction": 0.0,
  "optim.min_lr_ratio": 0.0,
  "optim.weight_decay": 0.0,
  "optim.clip_norm": 0.0,
  "optim.muon_lr": 0.0,
  "optim.muon_momentum": 0.0,
  "optim.eps": 0.0,
  "train.steps": 1,
  "train.global_batch": 1,
  "train.microbatches": 1,
  "train.pipeline_microbatches": 0,
  "train.diloco.replicas": 1,
  "train.diloco.sync_every": 1,
  "train.diloco.outer_lr": 0.0,
  "train.diloco.outer_momentum": 0.0,
  "train.diloco.fragments": 1,
  "train.z_loss": 0.0,
  "train.loss_chunk": 0,
  "train.log_every": 1,
  "train.eval_every": 0,
  "train.eval_batches": 1,
  "train.target_eval_loss": 0.0,
  "metrics.peak_tflops": 0.0,
  "checkpoint.every_steps": 0,
  "checkpoint.every_minutes": 0.0,
  "checkpoint.keep": 1,
  "checkpoint.keep_every": 0,
  "train.inject_nan_at_step": 0,
  "train.inject_spike_at_step": 0,
  "train.guard.spike_z": 0.0,
  "train.guard.window": 2,
  "train.guard.max_rollbacks": 0,
  "train.guard.rollback_lr_scale": 0.0,
  "train.guard.rollback_lr_steps": 0,
  "mesh.dcn_diloco": 1,
  "mesh.dcn_data": 1,
  "mesh.dcn_fsdp": 1,
}
MAXIMA = {
  "optim.decay_fraction": 1.0,
  "optim.min_lr_ratio": 1.0,
  "optim.b1": 1.0,
  "optim.b2": 1.0,
  "optim.muon_momentum": 1.0,
  "data.eval_fraction": 0.5,
}


def load(args: Sequence[str], flag_values: flags.FlagValues | None = None) -> ml_collections.ConfigDict:
  """Loads `--config=FILE[:ARG]` and applies `--config.a.b=value` overrides, in absl/ml-collections syntax.

  `flag_values` may define a command's other flags (e.g. --workdir); they are parsed from `args` too.
  """
  flag_values = flags.FlagValues() if flag_values is None else flag_values
  argv = ["maxlm", *args]
  holder = config_flags.DEFINE_config_file("config", flag_values=flag_values, lock_config=True, sys_argv=argv)
  try:
    flag_values(argv)
  except Exception as e:  # absl and ml-collections raise several types; all become one line.
    raise UserError(_explain_flag_error(e, args)) from None
  if not flag_values["config"].present:
    raise UserError("missing --config: pass a config file, e.g. --config=configs/tiny.py")
  path = config_flags.get_config_filename(flag_values["config"])
  if not os.path.isfile(path):
    raise UserError(f"--config={path}: no such file; pass a file from configs/, e.g. --config=configs/tiny.py")
  try:
    cfg = holder.value
  except Exception as e:  # The config file itself failed (syntax error, bad assignment, ...).
    raise UserError(f"--config={path}: cannot load: {_one_line(e)}") from None
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise UserError(f"--config={path}: get_config() must return an ml_collections.ConfigDict")
  return cfg


def config_path(flag_values: flags.FlagValues) -> str:
  """The config file named by --config (after `load`), without its :ARG."""
  return config_flags.get_config_filename(flag_values["config"])


def _one_line(error: Exception) -> str:
  return " ".join(str(error).replace("\\n", " ").split()).strip("'\"")


def _explain_flag_error(error: Exception, args: Sequence[str]) -> str:
  known = flat_keys(base.get_config())
  for arg in args:
    if arg.startswith("--config.") and "=" in arg:
      key = arg[len("--config.") :].split("=", 1)[0]
      if key not in known:
        return _unknown_key_message(key, known)
  path = _config_argument(args)
  problem = _config_file_problem(path) if path and os.path.isfile(path) else None
  if problem:
    return f"--config={path}: cannot load: {problem}"
  return f"bad argument: {_one_line(error)}"


def _config_argument(args: Sequence[str]) -> str | None:
  """The file of `--config=FILE[:ARG]` (or `--config FILE`) in `args`."""
  for i, arg in enumerate(args):
    value = arg[len("--config=") :] if arg.startswith("--config=") else None
    if arg == "--config" and i + 1 < len(args):
      value = args[i + 1]
    if value is not None:
      return value if os.path.isfile(value) else value.rsplit(":", 1)[0]
  return None


def _config_file_problem(path: str) -> str | None:
  """Why the config file itself cannot be used (it does not run, or has no get_config), or None."""
  try:
    module = load_python(path, "--config")
  except UserError as e:
    return str(e).split(": cannot load: ", 1)[-1]
  if not callable(getattr(module, "get_config", None)):
    return "it defines no get_config() (see configs/tiny.py)"
  return None


def load_python(path: str, flag: str):
  """Runs a user's Python file (a config, sweep or ladder file) as a module; its failure is a UserError line."""
  if not os.path.isfile(path):
    raise UserError(f"{flag}={path}: no such file")
  try:
    spec = importlib.util.spec_from_file_location(f"maxlm_user_{os.path.basename(path).removesuffix('.py')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  except Exception as e:  # noqa: BLE001  Whatever the file raises is the user's to fix.
    raise UserError(f"{flag}={path}: cannot load: {_one_line(e)}") from None
  return module


def _unknown_key_message(key: str, known: Sequence[str]) -> str:
  close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
  hint = f"did you mean '{close[0]}'?" if close else "see configs/base.py for the keys"
  return f"unknown config key '{key}': {hint}"


def flat_keys(cfg: ml_collections.ConfigDict | dict, prefix: str = "") -> dict[str, object]:
  """{"model.d_model": 64, ...}: the leaves of a config (or of a saved config's dict) by dotted key."""
  out = {}
  for k, v in cfg.items():
    if isinstance(v, (ml_collections.ConfigDict, dict)):
      out.update(flat_keys(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def validate(
  cfg: ml_collections.ConfigDict,
  *,
  num_devices: int,
  platform: str = "cpu",
  num_slices: int = 1,
  check_paths: bool = True,
) -> ml_collections.ConfigDict:
  """Checks `cfg` against the schema and itself; returns a resolved copy (mesh sizes filled, dtype chosen).

  `num_slices`: how many groups the DCN axes split the devices into (`maxlm.parallel.mesh.num_granules`): TPU
  slices, or processes elsewhere. `check_paths=False` skips the checks of files the config names
  (data.path, train.init_from).
  """
  schema = flat_keys(base.get_config())
  values = flat_keys(cfg)
  for key in values:
    if key not in schema:
      raise UserError(_unknown_key_message(key, list(schema)))
  for key, default in schema.items():
    if key not in values:
      raise UserError(f"config key '{key}' is missing: named configs must start from configs/base.get_config()")
    check_type(key, values[key], default)
  for key, options in base.CHOICES.items():
    if values[key] not in options:
      raise UserError(f"{key}={values[key]!r} is not one of {', '.join(options)}")
  for key, low in MINIMA.items():
    if values[key] < low:
      raise UserError(f"{key}={values[key]} must be >= {low}")
  for key, high in MAXIMA.items():
    if values[key] > high:
      raise UserError(f"{key}={values[key]} must be <= {high}")

  resolved = ml_collections.ConfigDict(cfg.to_dict())
  m = resolved.model
  if m.d_model % m.num_heads:
    raise UserError(
      f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}: choose num_heads dividing d_model"
    )
  if (m.d_model // m.num_heads) % 2:
    raise UserError(
      f"head_dim = model.d_model/model.num_heads = {m.d_model // m.num_heads} is odd: RoPE needs an even head_dim"
    )
  if m.num_heads % m.num_kv_heads:
    raise UserError(
      f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}: "
      "choose num_kv_heads dividing num_heads"
    )
  _check_moe(m)
  r = m.rope_scaling
  if r.type == "llama3" and r.high_freq_factor <= r.low_freq_factor:
    raise UserError(
      f"model.rope_scaling.high_freq_factor={r.high_freq_factor} must be > low_freq_factor={r.low_freq_factor}"
    )
  if m.compute_dtype == "auto":
    m.compute_dtype = "float32" if platform == "cpu" else "bfloat16"
  _resolve_attention(m, platform, resolved.data.seq_len)
  if m.moe.grouped_matmul == "auto":  # Megablox has no quantized form: quantized experts take qwix's ragged_dot.
    m.moe.grouped_matmul = "megablox" if platform == "tpu" and m.quantization == "none" else "ragged_dot"
  elif m.moe.grouped_matmul == "megablox" and platform == "gpu":
    raise UserError("model.moe.grouped_matmul='megablox' is a TPU kernel: use 'auto' or 'ragged_dot' on a GPU")
  elif m.moe.grouped_matmul == "megablox" and m.quantization != "none":
    raise UserError(
      f"model.moe.grouped_matmul='megablox' has no {m.quantization} form: use 'auto' or 'ragged_dot' with "
      "model.quantization"
    )

  _check_diloco(resolved, num_slices)
  dcn = int(np.prod([resolved.mesh[f"dcn_{a}"] for a in DCN_AXES]))
  dcn_keys = "*".join(f"mesh.dcn_{a}" for a in DCN_AXES)
  if dcn > 1 and dcn != num_slices:
    raise UserError(
      f"{dcn_keys}={dcn} but the devices form {num_slices} slice(s) (TPU slices, "
      "or processes elsewhere): make the product match, or set them all to 1"
    )
  if dcn == 1 and platform == "tpu" and num_slices > 1:
    raise UserError(
      f"the devices span {num_slices} TPU slices: set mesh.dcn_data (or mesh.dcn_fsdp, or "
      f"train.diloco.replicas for replicas across slices) so that {dcn_keys}={num_slices}"
    )
  sizes = resolve_mesh_sizes(resolved.mesh, num_devices // dcn)
  for axis, size in zip(MESH_AXES, sizes):
    resolved.mesh[axis] = size
  tensor = resolved.mesh.tensor
  widths = {"num_heads": m.num_heads, "num_kv_heads": m.num_kv_heads, "mlp_dim": m.mlp_dim}
  if m.moe.num_experts:
    widths["moe.mlp_dim"] = m.moe.mlp_dim or m.mlp_dim
  for key, value in widths.items():
    if value % tensor:
      raise UserError(f"model.{key}={value} is not divisible by mesh.tensor={tensor}: choose mesh.tensor dividing it")
  expert = resolved.mesh.expert
  if m.moe.num_experts % expert:
    raise UserError(
      f"model.moe.num_experts={m.moe.num_experts} is not divisible by mesh.expert={expert}: "
      "choose mesh.expert dividing the number of experts"
    )

  _check_context(resolved, platform)

  t = resolved.train
  replicas = resolved.train.diloco.replicas
  dcn_dp = resolved.mesh.dcn_data * resolved.mesh.dcn_fsdp
  dp = resolved.mesh.data * resolved.mesh.fsdp * resolved.mesh.expert * dcn_dp * replicas
  dp_keys = (
    "mesh.data*mesh.fsdp*mesh.expert"
    + ("*mesh.dcn_data*mesh.dcn_fsdp" if dcn_dp > 1 else "")
    + ("*train.diloco.replicas" if replicas > 1 else "")
  )
  if t.global_batch % t.microbatches:
    raise UserError(f"train.global_batch={t.global_batch} is not divisible by train.microbatches={t.microbatches}")
  micro = t.global_batch // t.microbatches
  if micro % dp:
    raise UserError(
      f"train.global_batch/train.microbatches={micro} is not divisible by the data-parallel size "
      f"{dp_keys}={dp}: make global_batch a multiple of {dp * t.microbatches}"
    )
  _check_pipeline(resolved, micro // dp)
  if t.loss_chunk and resolved.data.seq_len % t.loss_chunk:
    raise UserError(
      f"train.loss_chunk={t.loss_chunk} does not divide data.seq_len={resolved.data.seq_len}: "
      "choose a divisor of seq_len, or 0 for no chunking"
    )

  profile_steps(resolved.metrics.profile_steps)  # Raises on a malformed range.
  if t.stop_at_target and not (t.target_eval_loss > 0 and t.eval_every > 0):
    raise UserError(
      "train.stop_at_target needs train.target_eval_loss > 0 and evals (train.eval_every > 0): set both, or turn it off"
    )
  if t.guard.policy == "rollback" and resolved.checkpoint.every_steps == 0:
    raise UserError(
      "train.guard.policy='rollback' needs checkpoints: set checkpoint.every_steps > 0, or use "
      "train.guard.policy='skip'"
    )
  if not check_paths:
    return resolved
  if t.init_from and not storage.isdir(t.init_from):
    raise UserError(
      f"train.init_from={t.init_from!r}: no such directory; pass a maxlm workdir (a trained run, or "
      "a model imported with maxlm convert from-hf)"
    )
  d = resolved.data
  if d.source == "tokens":
    if not d.path:
      raise UserError("data.source='tokens' needs data.path: pass --config.data.path=FILE")
    if not storage.isfile(d.path):
      raise UserError(f"data.path={d.path!r}: no such file")
  if d.source in ("array_record", "parquet"):
    if not d.path:
      raise UserError(f"data.source={d.source!r} needs data.path: pass --config.data.path=FILES (files, dirs or globs)")
    if not d.tokenizer:
      raise UserError(f"data.source={d.source!r} tokenizes as it reads: pass --config.data.tokenizer=FILE.model")
    if not storage.isfile(d.tokenizer):
      raise UserError(f"data.tokenizer={d.tokenizer!r}: no such file; pass a SentencePiece .model")
    if d.num_workers:
      raise UserError(
        f"data.num_workers={d.num_workers}: data.source={d.source!r} reads in the training process; set it to 0 "
        "(or prepare the data with maxlm data prepare for worker processes)"
      )
  if d.source == "prepared":
    paths = [p for p in d.path.split(",") if p]
    if not paths:
      raise UserError("data.source='prepared' needs data.path: pass --config.data.path=DIR[,DIR...]")
    for path in paths:
      if not storage.isfile(storage.join(path, "manifest.json")):
        raise UserError(
          f"data.path: {path!r} is not a prepared dataset (no manifest.json): make one with "
          "maxlm data prepare, or pass its directory"
        )
    if d.weights:
      try:
        weights = [float(w) for w in d.weights.split(",")]
      except ValueError:
        raise UserError(f"data.weights={d.weights!r}: use comma-separated numbers, e.g. 0.7,0.3") from None
      if len(weights) != len(paths) or min(weights) <= 0:
        raise UserError(f"data.weights={d.weights!r}: give one positive weight per dataset in data.path ({len(paths)})")
  return resolved


def _check_moe(m: ml_collections.ConfigDict) -> None:
  e = m.moe
  if e.num_experts == 0:
    return
  if e.top_k > e.num_experts:
    raise UserError(f"model.moe.top_k={e.top_k} exceeds model.moe.num_experts={e.num_experts}: choose top_k <= experts")
  moe_layers = m.num_layers - e.first_dense
  if moe_layers <= 0 or moe_layers % e.every:
    raise UserError(
      f"model.num_layers={m.num_layers} - model.moe.first_dense={e.first_dense} must be a positive multiple of "
      f"model.moe.every={e.every} (each group of `every` layers ends in an MoE layer)"
    )


def _check_diloco(cfg: ml_collections.ConfigDict, num_slices: int) -> None:
  """DiLoCo's constraints; sets mesh.diloco (replicas per slice) from train.diloco.replicas and, on several slices
  with no DCN axis chosen, spreads the replicas over the slices (mesh.dcn_diloco)."""
  d, m, mesh = cfg.train.diloco, cfg.model, cfg.mesh
  if num_slices > 1 and d.replicas % num_slices == 0 and all(mesh[f"dcn_{a}"] == 1 for a in DCN_AXES):
    mesh.dcn_diloco = num_slices
  if d.replicas % mesh.dcn_diloco:
    raise UserError(
      f"train.diloco.replicas={d.replicas} is not divisible by mesh.dcn_diloco={mesh.dcn_diloco} (the slices the "
      "replicas span): make replicas a multiple of it"
    )
  per_slice = d.replicas // mesh.dcn_diloco
  if mesh.diloco not in (1, per_slice):
    raise UserError(
      f"mesh.diloco={mesh.diloco} but train.diloco.replicas={d.replicas}: set the replicas with "
      "train.diloco.replicas only"
    )
  mesh.diloco = per_slice
  if d.replicas == 1:
    return
  if cfg.mesh.stage > 1:
    raise UserError("train.diloco.replicas > 1 with mesh.stage > 1 is not supported yet: use one of them")
  if d.sync_every % d.fragments:
    raise UserError(
      f"train.diloco.sync_every={d.sync_every} is not divisible by train.diloco.fragments={d.fragments}: each "
      "fragment syncs once per period, at staggered steps"
    )
  e = m.moe  # MoE layers as maxlm.model.moe.is_moe_layer places them
  moe = sum(i >= e.first_dense and (i - e.first_dense + 1) % e.every == 0 for i in range(m.num_layers)) * bool(
    e.num_experts
  )
  for name, layers in (("dense", m.num_layers - moe), ("MoE", moe)):
    if layers % d.fragments:
      raise UserError(
        f"the model's {layers} {name} layers do not split into train.diloco.fragments={d.fragments} fragments: "
        "choose fragments dividing the layer count"
      )


def _check_pipeline(cfg: ml_collections.ConfigDict, rows_per_replica: int) -> None:
  """Pipeline parallelism's constraints; resolves train.pipeline_microbatches=0 to one per stage."""
  stages, repeats, m, t = cfg.mesh.stage, cfg.model.pipeline_repeats, cfg.model, cfg.train
  if stages == 1:
    return
  if m.moe.num_experts:
    raise UserError("mesh.stage > 1 does not run MoE models yet: set mesh.stage=1 (use mesh.expert and mesh.fsdp)")
  if cfg.mesh.context > 1:
    raise UserError("mesh.stage > 1 with mesh.context > 1 is not supported yet: use one of them")
  if m.num_layers % (stages * repeats):
    raise UserError(
      f"model.num_layers={m.num_layers} is not divisible by mesh.stage*model.pipeline_repeats={stages * repeats}: "
      "every stage runs the same number of layers in each repeat"
    )
  t.pipeline_microbatches = t.pipeline_microbatches or stages
  pm = t.pipeline_microbatches
  if repeats > 1 and pm < stages:
    raise UserError(
      f"train.pipeline_microbatches={pm} < mesh.stage={stages}: the circular schedule (model.pipeline_repeats > 1) "
      "needs at least one microbatch per stage"
    )
  if rows_per_replica % pm:
    raise UserError(
      f"train.pipeline_microbatches={pm} does not divide the {rows_per_replica} rows each data-parallel replica gets "
      "per microbatch: choose a divisor, or raise train.global_batch"
    )


def _check_context(cfg: ml_collections.ConfigDict, platform: str) -> None:
  """Context parallelism's constraints on the sequence and the loss chunks."""
  context, seq_len, chunk = cfg.mesh.context, cfg.data.seq_len, cfg.train.loss_chunk
  if context == 1:
    return
  if seq_len % (2 * context):
    raise UserError(
      f"data.seq_len={seq_len} is not divisible by 2*mesh.context={2 * context}: context parallelism cuts each row "
      "into 2*context chunks; choose a mesh.context with 2*context dividing seq_len"
    )
  m = cfg.model
  splash = m.attention == "splash" and m.context_attention == "all_gather"
  if splash and (seq_len % (context * context) or (platform == "tpu" and (seq_len // context) % 128)):
    raise UserError(
      f"splash attention over {context} context shards needs data.seq_len={seq_len} divisible by "
      f"mesh.context²={context * context}"
      + (" and seq_len/context by 128" if platform == "tpu" else "")
      + ": change seq_len or mesh.context, or set model.attention=xla"
    )
  if chunk and chunk % context:
    raise UserError(
      f"train.loss_chunk={chunk} is not divisible by mesh.context={context}: each loss chunk spans every context "
      "shard; choose a multiple of mesh.context, or 0"
    )


def _resolve_attention(m: ml_collections.ConfigDict, platform: str, seq_len: int) -> None:
  """Chooses the kernel for model.attention='auto' and checks an explicit choice fits the platform."""
  if m.attention == "auto":
    m.attention = {"tpu": "splash", "gpu": "cudnn"}.get(platform, "xla")
    if m.attention == "cudnn" and m.compute_dtype != "bfloat16":
      m.attention = "xla"  # cuDNN flash attention has no float32 kernel.
    if m.attention == "splash" and seq_len % 128:
      m.attention = "xla"  # TPU tiles are 128-aligned.
    return
  if m.attention == "cudnn" and (platform != "gpu" or m.compute_dtype != "bfloat16"):
    raise UserError(
      f"model.attention='cudnn' needs a GPU and model.compute_dtype='bfloat16' (have {platform}, "
      f"{m.compute_dtype}): use model.attention='auto' or 'xla'"
    )
  if m.attention == "splash" and platform == "gpu":
    raise UserError("model.attention='splash' is a TPU kernel: use model.attention='auto' or 'cudnn' on a GPU")
  if m.attention == "splash" and platform == "tpu" and seq_len % 128:
    raise UserError(
      f"model.attention='splash' needs data.seq_len divisible by 128 (have {seq_len}): change "
      "seq_len or use model.attention='xla'"
    )


def profile_steps(spec: str) -> tuple[int, int] | None:
  """metrics.profile_steps "FIRST-LAST" or "N" -> (first, last), or None when empty."""
  if not spec:
    return None
  first, dash, last = spec.partition("-")
  try:
    steps = int(first), int(last if dash else first)
  except ValueError:
    steps = (0, -1)
  if not 1 <= steps[0] <= steps[1]:
    raise UserError(f"metrics.profile_steps={spec!r}: use FIRST-LAST with 1 <= FIRST <= LAST (e.g. 10-12), or N")
  return steps


def load_workdir(workdir: str, *, platform: str = "cpu") -> ml_collections.ConfigDict:
  """The config of a trained run or an imported model (`<workdir>/config.json`), validated for one device.

  Inference commands choose their own devices, so the saved mesh is reset to `data=-1` (and DiLoCo to one
  replica); the files the config names are not checked (eval checks its data itself). Keys added to the schema
  after the run was written take their defaults.
  """
  path = storage.join(workdir, "config.json")
  saved = read_saved(workdir)

  def merged(defaults: dict, values: dict) -> dict:
    return {k: merged(v, values.get(k, {})) if isinstance(v, dict) else values.get(k, v) for k, v in defaults.items()}

  unknown = sorted(set(flat_keys(ml_collections.ConfigDict(saved))) - set(flat_keys(base.get_config())))
  if unknown:
    raise UserError(f"{path}: unknown config key '{unknown[0]}' (written by another maxlm version?)")
  cfg = ml_collections.ConfigDict(merged(base.get_config().to_dict(), saved))
  cfg.mesh.update({a: 1 for a in (*MESH_AXES, *(f"dcn_{a}" for a in DCN_AXES))}, data=-1)
  cfg.train.diloco.replicas = 1  # A DiLoCo run's checkpoints hold its outer model as the parameters.
  try:
    return validate(cfg, num_devices=1, platform=platform, check_paths=False)
  except UserError as e:
    raise UserError(f"{path}: {e}") from None


def read_saved(workdir: str, flag: str = "--workdir") -> dict:
  """The resolved config a run or an imported model saved (`<workdir>/config.json`), as a dict of groups; `flag`
  names where the directory came from in messages."""
  path = storage.join(workdir, "config.json")
  if not storage.isfile(path):
    why = "no such directory" if not storage.isdir(workdir) else "no config.json"
    raise UserError(f"{flag}={workdir}: {why}; pass a maxlm run or a model imported with maxlm convert from-hf")
  saved = read_json_object(path, "the run's config was damaged; restore it")
  if not all(isinstance(v, dict) for v in saved.values()):
    raise UserError(f"{path} is not a maxlm config (a JSON object of groups such as model, data, train)")
  return saved


def lineage(workdir: str) -> Iterator[tuple[str, dict]]:
  """(workdir, its saved config) for the workdir and the chain of `train.init_from` it started from."""
  seen = set()
  while workdir and storage.resolve(workdir) not in seen and storage.isfile(storage.join(workdir, "config.json")):
    seen.add(storage.resolve(workdir))
    saved = read_saved(workdir)
    yield workdir, saved
    workdir = saved.get("train", {}).get("init_from", "")


def check_type(key: str, value: object, default: object) -> None:
  if isinstance(default, bool):
    ok = isinstance(value, bool)
  elif isinstance(default, int):
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif isinstance(default, float):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  else:
    ok = isinstance(value, type(default))
  if not ok:
    raise UserError(
      f"{key}={value!r} has type {type(value).__name__}; expected {type(default).__name__} like the default {default!r}"
    )


def resolve_mesh_sizes(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Mesh axis sizes with at most one -1 filled so that the product equals `num_devices`."""
  sizes = [mesh_cfg[a] for a in MESH_AXES]
  for axis, size in zip(MESH_AXES, sizes):
    if size == 0 or size < -1:
      raise UserError(f"mesh.{axis}={size}: use a positive size, or -1 to fill the remaining devices")
  fill = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  if len(fill) > 1:
    raise UserError(f"mesh.{fill[0]} and mesh.{fill[1]} are both -1: at most one mesh axis may fill")
  fixed = 1
  for s in sizes:
    fixed *= s if s != -1 else 1
  if fill:
    if num_devices % fixed:
      raise UserError(
        f"mesh sizes {dict(zip(MESH_AXES, sizes))} cannot fill {num_devices} devices: the fixed "
        f"axes' product {fixed} must divide the device count"
      )
    sizes[MESH_AXES.index(fill[0])] = num_devices // fixed
  elif fixed != num_devices:
    raise UserError(
      f"mesh sizes {dict(zip(MESH_AXES, sizes))} multiply to {fixed} but there are {num_devices} "
      "devices: make the product match, or set one axis to -1"
    )
  return tuple(sizes)
