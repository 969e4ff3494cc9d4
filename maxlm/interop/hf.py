"""Hugging Face interop: Llama-family and Mixtral safetensors checkpoints <-> maxlm workdirs, without torch.

`from_hf` reads `config.json` and the safetensors weights of a `LlamaForCausalLM`, `MistralForCausalLM` or
`MixtralForCausalLM` directory and writes a maxlm workdir: `config.json` (the maxlm config), `config.py` (the same
as a config file for `maxlm train`, with `train.init_from` pointing here), `params/` (an Orbax checkpoint of the
parameters, see `maxlm.training.checkpoint.save_params`), `tokenizer.model` when the directory has a SentencePiece
model, and `hf/`: the small Hugging Face files (config, tokenizer and generation configs, `tokenizer.json`),
kept verbatim for provenance and carried back out by `to_hf`.

`to_hf` writes `config.json`, `generation_config.json`, `model.safetensors` (or `model-0000i-of-0000n.safetensors`
shards with `model.safetensors.index.json` above `max_shard_bytes`) and the tokenizer files.

Layout (HF Linear weights are [out, in]; maxlm stores [in..., out...] and stacks layers on axis 0):
  model.embed_tokens.weight [V, D]                  embed [V, D]
  layers.i.self_attn.{q,k,v}_proj.weight [H·Dh, D]  blocks.attn.{q,k,v}_proj[i] [D, H, Dh] (K heads for k, v)
  layers.i.self_attn.o_proj.weight [D, H·Dh]        blocks.attn.o_proj[i] [H, Dh, D]
  layers.i.mlp.{gate,up}_proj.weight [F, D]         blocks.mlp.{gate,up}_proj[i] [D, F]
  layers.i.mlp.down_proj.weight [D, F]              blocks.mlp.down_proj[i] [F, D]
  layers.i.{input,post_attention}_layernorm.weight  blocks.{attn,mlp}_norm.scale[i] [D]
  model.norm.weight [D]                             final_norm.scale [D]
  lm_head.weight [V, D]                             lm_head [D, V] (absent when tied)
Mixtral (every layer MoE, maxlm's `moe_blocks` in place of `blocks`; E experts; the hub's layout, which
transformers 5 also writes):
  layers.i.block_sparse_moe.gate.weight [E, D]      moe_blocks.mlp.router[i] [D, E]
  layers.i.block_sparse_moe.experts.j.w1.weight [F, D]  moe_blocks.mlp.w_gate[i, j] [D, F]  (w3: w_up)
  layers.i.block_sparse_moe.experts.j.w2.weight [D, F]  moe_blocks.mlp.w_down[i, j] [F, D]
  (maxlm's balancing bias `router_bias` has no HF tensor: zero on import, and export needs it zero or refuses.)
Both sides use the half-split ("rotate_half") RoPE pairing, so Q and K need no permutation; the stacked
layer axis is the same whether `model.scan_layers` is on or off, so the scan setting never changes a file.

Memory: one tensor at a time. Import reads each HF tensor (safetensors is memory-mapped), writes it into a
memory-mapped stacked array on disk, then streams those to Orbax; export restores one stacked array at a
time and writes its layers straight into the safetensors files, whose headers are computed up front.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
import shutil
import struct
from typing import NamedTuple

import jax
import ml_collections
import ml_dtypes
import numpy as np
from safetensors import safe_open  # framework="numpy" below: the conversion never imports torch

from configs import base
from maxlm import config, files, storage
from maxlm.data import tokenizer
from maxlm.errors import UserError
from maxlm.model import transformer
from maxlm.training import checkpoint

log = logging.getLogger("maxlm")

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM")
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM"}
REFUSED = {
  "Qwen2ForCausalLM": "Qwen2 has q/k/v projection biases, which the maxlm model does not have",
  "Qwen3ForCausalLM": "Qwen3 sets head_dim apart from hidden_size / num_attention_heads",
  "GemmaForCausalLM": "Gemma uses GeGLU, (1 + weight) norms and a scaled embedding",
  "Phi3ForCausalLM": "Phi-3 fuses q/k/v and gate/up projections",
}
SIDE_FILES = (
  "config.json",
  "generation_config.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "tokenizer.json",
)
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": "bfloat16"}  # safetensors name -> NumPy
EXPORT_DTYPES = {"float32": "F32", "bfloat16": "BF16"}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


class Tensor(NamedTuple):
  """One maxlm parameter and its Hugging Face tensors (one per layer for stacked parameters, and per expert)."""

  name: str  # maxlm parameter, e.g. blocks.attn.q_proj
  hf: str  # HF tensor name; {i} stands for the layer, {j} for the expert
  shape: tuple[int, ...]  # maxlm shape of one layer's (one expert's) tensor; the whole array if not stacked
  n_in: int  # leading maxlm dims that are the HF "in" dim (transposed); 0: copied as is
  stacked: bool
  experts: int = 0  # > 0: one HF tensor per expert, stacked after the layer axis in maxlm

  def hf_shape(self) -> tuple[int, ...]:
    if not self.n_in:
      return self.shape
    return (math.prod(self.shape[self.n_in :]), math.prod(self.shape[: self.n_in]))

  def to_maxlm(self, w: np.ndarray) -> np.ndarray:
    return w.T.reshape(self.shape) if self.n_in else w

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    return x.reshape(self.hf_shape()[::-1]).T if self.n_in else x


def is_mixtral(m: ml_collections.ConfigDict) -> bool:
  """An MoE model in Mixtral's layout: every layer MoE, softmax routing renormalised, no shared experts."""
  e = m.moe
  return e.num_experts > 0 and e.first_dense == 0 and e.every == 1


def tensors(m: ml_collections.ConfigDict) -> list[Tensor]:
  V, D, H, K, F = m.vocab_size, m.d_model, m.num_heads, m.num_kv_heads, m.mlp_dim
  Dh = D // H
  layer = "model.layers.{i}."
  blocks = "moe_blocks" if is_mixtral(m) else "blocks"
  out = [
    Tensor("embed", "model.embed_tokens.weight", (V, D), 0, False),
    Tensor(f"{blocks}.attn.q_proj", layer + "self_attn.q_proj.weight", (D, H, Dh), 1, True),
    Tensor(f"{blocks}.attn.k_proj", layer + "self_attn.k_proj.weight", (D, K, Dh), 1, True),
    Tensor(f"{blocks}.attn.v_proj", layer + "self_attn.v_proj.weight", (D, K, Dh), 1, True),
    Tensor(f"{blocks}.attn.o_proj", layer + "self_attn.o_proj.weight", (H, Dh, D), 2, True),
  ]
  if is_mixtral(m):
    E, Fe = m.moe.num_experts, m.moe.mlp_dim or F
    expert = layer + "block_sparse_moe.experts.{j}."
    out += [
      Tensor("moe_blocks.mlp.router", layer + "block_sparse_moe.gate.weight", (D, E), 1, True),
      Tensor("moe_blocks.mlp.w_gate", expert + "w1.weight", (D, Fe), 1, True, E),
      Tensor("moe_blocks.mlp.w_up", expert + "w3.weight", (D, Fe), 1, True, E),
      Tensor("moe_blocks.mlp.w_down", expert + "w2.weight", (Fe, D), 1, True, E),
    ]
  else:
    out += [
      Tensor("blocks.mlp.gate_proj", layer + "mlp.gate_proj.weight", (D, F), 1, True),
      Tensor("blocks.mlp.up_proj", layer + "mlp.up_proj.weight", (D, F), 1, True),
      Tensor("blocks.mlp.down_proj", layer + "mlp.down_proj.weight", (F, D), 1, True),
    ]
  out += [
    Tensor(f"{blocks}.attn_norm.scale", layer + "input_layernorm.weight", (D,), 0, True),
    Tensor(f"{blocks}.mlp_norm.scale", layer + "post_attention_layernorm.weight", (D,), 0, True),
    Tensor("final_norm.scale", "model.norm.weight", (D,), 0, False),
  ]
  if not m.tie_embeddings:
    out.append(Tensor("lm_head", "lm_head.weight", (D, V), 1, False))
  return out


def stacked_shape(t: Tensor, num_layers: int) -> tuple[int, ...]:
  """The shape of the whole maxlm array behind `t`: [layers, (experts,) ...] or `t.shape`."""
  return ((num_layers,) if t.stacked else ()) + ((t.experts,) if t.experts else ()) + t.shape


def _layers(t: Tensor, num_layers: int) -> list[tuple[tuple[int, ...], str]]:
  """(index into the maxlm array, HF name) for each HF tensor of `t`: () for an unstacked one, (layer,) or
  (layer, expert)."""
  if not t.stacked:
    return [((), t.hf)]
  if t.experts:
    return [((i, j), t.hf.format(i=i, j=j)) for i in range(num_layers) for j in range(t.experts)]
  return [((i,), t.hf.format(i=i)) for i in range(num_layers)]


# Config mapping -------------------------------------------------------------------------------------------


# config.json keys the mapping reads, with the JSON types they must have (required keys first).
REQUIRED_KEYS = {
  "vocab_size": int,
  "hidden_size": int,
  "num_hidden_layers": int,
  "num_attention_heads": int,
  "intermediate_size": int,
}
OPTIONAL_KEYS = {
  "num_key_value_heads": int,
  "max_position_embeddings": int,
  "head_dim": int,
  "rms_norm_eps": float,
  "rope_theta": float,
  "initializer_range": float,
  "tie_word_embeddings": bool,
  "hidden_act": str,
  "architectures": list,
  "model_type": str,
  "rope_scaling": dict,
  "rope_parameters": dict,
  "sliding_window": int,
  "pretraining_tp": int,
  "num_local_experts": int,
  "num_experts_per_tok": int,
  "router_aux_loss_coef": float,
}


def read_hf_config(hf_dir: str) -> dict:
  """`<hf_dir>/config.json`, checked for the keys and types the mapping reads."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isdir(hf_dir):
    raise UserError(f"--hf_dir={hf_dir}: no such directory; pass a Hugging Face model directory")
  if not os.path.isfile(path):
    raise UserError(f"--hf_dir={hf_dir}: no config.json; pass a Hugging Face model directory")
  hf = files.read_json_object(path, "not a model config; download the model again")
  names = hf.get("architectures")
  if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
    raise UserError(f"{path}: architectures={names!r} should be a list of class names")
  _check_architecture(hf)  # Before the keys: an unsupported family is the more useful message.
  missing = [k for k in REQUIRED_KEYS if k not in hf]
  if missing:
    raise UserError(f"{path} lacks {', '.join(missing)}: not a complete transformers model config")
  for key, kind in {**REQUIRED_KEYS, **OPTIONAL_KEYS}.items():
    value = hf.get(key)
    if value is None and key not in REQUIRED_KEYS:
      continue
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float:
      ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or (key in REQUIRED_KEYS and value < 1):
      want = "a positive integer" if key in REQUIRED_KEYS else f"a JSON {kind.__name__}"
      raise UserError(f"{path}: {key}={value!r} should be {want}")
  return hf


def architecture(hf: dict) -> str:
  return (hf.get("architectures") or [MODEL_TYPES.get(hf.get("model_type"), f"model_type {hf.get('model_type')!r}")])[0]


def _check_architecture(hf: dict) -> str:
  arch = architecture(hf)
  if arch not in ARCHITECTURES:
    why = REFUSED.get(arch, "only Llama-family decoders with the Llama layout are")
    raise UserError(
      f"config.json: architecture {arch} is not supported ({why}); maxlm converts {' and '.join(ARCHITECTURES)}"
    )
  return arch


def model_config_from_hf(hf: dict) -> dict:
  """maxlm `model.*` values for a Hugging Face config.json; anything maxlm cannot reproduce is a UserError."""
  arch = _check_architecture(hf)
  D, H = hf["hidden_size"], hf["num_attention_heads"]
  refuse = []
  if hf.get("head_dim") not in (None, D // H) or D % H:
    refuse.append(f"head_dim={hf.get('head_dim')} is not hidden_size/num_attention_heads={D}/{H}")
  if hf.get("hidden_act", "silu") != "silu":
    refuse.append(f"hidden_act={hf['hidden_act']!r} (maxlm's MLP is SwiGLU: silu)")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      refuse.append(f"{key}=true (the maxlm model has no projection biases)")
  if hf.get("pretraining_tp", 1) not in (1, None):
    refuse.append(f"pretraining_tp={hf['pretraining_tp']} (save the model again with pretraining_tp=1)")
  max_len = hf.get("max_position_embeddings", 2048)
  window = hf.get("sliding_window")
  if window is not None and hf.get("use_sliding_window", True) and window < max_len:
    refuse.append(
      f"sliding_window={window} < max_position_embeddings={max_len} (maxlm attends over the whole "
      "context, so it would differ beyond the window)"
    )
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
  if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
    refuse.append("partial_rotary_factor != 1 (maxlm rotates the whole head)")
  scaling = {"type": "none"}
  if rope_type == "llama3":
    scaling = {
      "type": "llama3",
      "factor": float(rope["factor"]),
      "low_freq_factor": float(rope["low_freq_factor"]),
      "high_freq_factor": float(rope["high_freq_factor"]),
      "original_max_len": int(rope.get("original_max_position_embeddings", max_len)),
    }
  elif rope_type != "default":
    refuse.append(f"rope scaling type {rope_type!r} (maxlm supports default RoPE and llama3 scaling)")
  moe = {}
  if arch == "MixtralForCausalLM":
    experts, top_k = hf.get("num_local_experts", 8), hf.get("num_experts_per_tok", 2)
    if not (isinstance(experts, int) and isinstance(top_k, int) and 1 <= top_k <= experts):
      refuse.append(f"num_experts_per_tok={top_k} and num_local_experts={experts} (need 1 <= top_k <= experts)")
    # HF's balance loss sums over the top_k slots: top_k times maxlm's (1 when balanced), so the weight is scaled.
    coef = float(hf.get("router_aux_loss_coef", 0.02))
    moe = {"num_experts": experts, "top_k": top_k, "router": "softmax", "renormalize": True, "lb_weight": coef * top_k}
    moe["router_z_weight"] = 0.0  # Mixtral trains without one.
  if refuse:
    raise UserError(f"config.json ({arch}) is not supported: {'; '.join(refuse)}")
  return {
    "moe": moe,
    "vocab_size": hf["vocab_size"],
    "d_model": D,
    "num_layers": hf["num_hidden_layers"],
    "num_heads": H,
    "num_kv_heads": hf.get("num_key_value_heads") or H,
    "mlp_dim": hf["intermediate_size"],
    "rope_theta": float(theta),
    "rope_scaling": scaling,
    "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    "qk_norm": False,
    "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
    "init_std": float(hf.get("initializer_range", 0.02)),
    "max_position_embeddings": int(max_len),
  }


def hf_config(cfg: ml_collections.ConfigDict, dtype: str, token_ids: dict) -> dict:
  """A `LlamaForCausalLM` (`MixtralForCausalLM` for an MoE model) config.json for a maxlm config. Legacy key names
  (rope_theta, rope_scaling, torch_dtype) are used because every transformers version reads them; 5.x maps them to
  rope_parameters."""
  m = cfg.model
  if m.qk_norm:
    raise UserError("model.qk_norm=true has no Llama equivalent: this model cannot be exported as a LlamaForCausalLM")
  e = m.moe
  if e.num_experts and not (is_mixtral(m) and e.shared_experts == 0 and e.router == "softmax" and e.renormalize):
    raise UserError(
      "this MoE model has no Mixtral equivalent (Mixtral: every layer MoE, model.moe.first_dense=0, every=1, "
      "shared_experts=0, router=softmax, renormalize=true): it cannot be exported"
    )
  if e.num_experts and (e.mlp_dim or m.mlp_dim) != m.mlp_dim:
    raise UserError("model.moe.mlp_dim differs from model.mlp_dim, which Mixtral cannot express: it cannot be exported")
  r = m.rope_scaling
  scaling = None
  if r.type == "llama3":
    scaling = {
      "rope_type": "llama3",
      "factor": r.factor,
      "low_freq_factor": r.low_freq_factor,
      "high_freq_factor": r.high_freq_factor,
      "original_max_position_embeddings": r.original_max_len,
    }
  moe = {}
  if e.num_experts:
    moe = {
      "num_local_experts": e.num_experts,
      "num_experts_per_tok": e.top_k,
      "router_aux_loss_coef": e.lb_weight / e.top_k,
      "router_jitter_noise": 0.0,
      "output_router_logits": False,
      "sliding_window": None,
    }
  return {
    "architectures": ["MixtralForCausalLM" if e.num_experts else "LlamaForCausalLM"],
    "model_type": "mixtral" if e.num_experts else "llama",
    "vocab_size": m.vocab_size,
    "hidden_size": m.d_model,
    "intermediate_size": m.mlp_dim,
    "num_hidden_layers": m.num_layers,
    "num_attention_heads": m.num_heads,
    "num_key_value_heads": m.num_kv_heads,
    "head_dim": m.d_model // m.num_heads,
    "hidden_act": "silu",
    "max_position_embeddings": m.max_position_embeddings or cfg.data.seq_len,
    "rms_norm_eps": m.norm_eps,
    "rope_theta": m.rope_theta,
    "rope_scaling": scaling,
    "tie_word_embeddings": m.tie_embeddings,
    "attention_bias": False,
    "mlp_bias": False,
    "attention_dropout": 0.0,
    "pretraining_tp": 1,
    "initializer_range": m.init_std,
    "use_cache": True,
    "torch_dtype": dtype,
    **moe,
    **token_ids,
  }


# Import ---------------------------------------------------------------------------------------------------


class _Weights:
  """The safetensors files of an HF directory, opened lazily by tensor name."""

  def __init__(self, hf_dir: str):
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      file_names = sorted(set(weight_map.values()))
    else:
      file_names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(hf_dir, "*.safetensors")))
      weight_map = None
    if not file_names:
      found = [
        os.path.basename(p) for p in glob.glob(os.path.join(hf_dir, "*.bin")) + glob.glob(os.path.join(hf_dir, "*.pth"))
      ]
      hint = (
        (
          f" (found {', '.join(sorted(found)[:3])}: load it in transformers and save_pretrained() it again, which "
          "writes safetensors)"
        )
        if found
        else ""
      )
      raise UserError(
        f"--hf_dir={hf_dir}: no safetensors weights (model.safetensors or model.safetensors.index.json){hint}"
      )
    self.files, self.where = {}, {}
    for name in file_names:
      path = os.path.join(hf_dir, name)
      if not os.path.isfile(path):
        raise UserError(f"--hf_dir={hf_dir}: model.safetensors.index.json names {name}, which is missing")
      try:
        self.files[name] = safe_open(path, framework="numpy")
      except Exception as e:  # noqa: BLE001  A truncated or foreign file: say which.
        raise UserError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())[:200]})") from None
      for key in self.files[name].keys():  # noqa: SIM118  a safetensors file, not a dict
        self.where[key] = name
    if weight_map is not None:
      missing = sorted(set(weight_map) - set(self.where))
      if missing:
        raise UserError(
          f"--hf_dir={hf_dir}: the index names {missing[0]} in {weight_map[missing[0]]}, which does not hold it"
        )

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.files[self.where[name]].get_slice(name).get_shape())

  def dtype(self, name: str) -> str:
    return self.files[self.where[name]].get_slice(name).get_dtype()

  def get(self, name: str) -> np.ndarray:
    return self.files[self.where[name]].get_tensor(name)


def _check_weights(weights: _Weights, m: ml_collections.ConfigDict, hf_dir: str) -> None:
  """Every expected tensor is there with its shape and a float dtype, and nothing else is."""
  expected = {}
  for t in tensors(m):
    for _, name in _layers(t, m.num_layers):
      expected[name] = t.hf_shape()
  ignorable = re.compile(r".*rotary_emb\.inv_freq$")  # Buffers old transformers versions saved.
  if m.tie_embeddings:
    ignorable = re.compile(r".*rotary_emb\.inv_freq$|^lm_head\.weight$")  # A tied copy some exports keep.
  extra = sorted(k for k in weights.where if k not in expected and not ignorable.match(k))
  if extra:
    why = " (projection biases are not supported)" if any(k.endswith(".bias") for k in extra) else ""
    raise UserError(
      f"--hf_dir={hf_dir}: unexpected tensor {extra[0]}{why}{f' and {len(extra) - 1} more' if len(extra) > 1 else ''}"
    )
  for name, shape in expected.items():
    if name not in weights.where:
      hint = " (config.json says tie_word_embeddings=false)" if name == "lm_head.weight" else ""
      raise UserError(f"--hf_dir={hf_dir}: tensor {name} is missing{hint}")
    if weights.shape(name) != shape:
      raise UserError(
        f"--hf_dir={hf_dir}: tensor {name} has shape {list(weights.shape(name))}, but config.json implies {list(shape)}"
      )
    if weights.dtype(name) not in DTYPES:
      raise UserError(
        f"--hf_dir={hf_dir}: tensor {name} has dtype {weights.dtype(name)}; only float32, float16 "
        "and bfloat16 weights are supported (no quantized checkpoints)"
      )


def from_hf(hf_dir: str, workdir: str, *, param_dtype: str = "float32") -> dict:
  """Imports a Hugging Face Llama/Mistral directory into a new maxlm workdir; returns a summary."""
  if param_dtype not in base.PARAM_DTYPES:
    raise UserError(f"--param_dtype={param_dtype}: choose one of {', '.join(base.PARAM_DTYPES)}")
  hf_dir = storage.local_copy(hf_dir, "Hugging Face model")  # From a bucket: read from a local copy.
  hf = read_hf_config(hf_dir)
  workdir = storage.resolve(workdir)
  if storage.listdir(workdir):
    raise UserError(f"--workdir={workdir} exists and is not empty: choose a new directory")
  try:
    mapped = model_config_from_hf(hf)
  except (KeyError, TypeError, ValueError) as e:  # e.g. a llama3 rope_scaling without its factors
    what = f"lacks {e}" if isinstance(e, KeyError) else f"has a value of the wrong type ({e})"
    raise UserError(f"{hf_dir}/config.json {what}: not a complete transformers model config") from None
  cfg = base.get_config()
  cfg.model.update({k: v for k, v in mapped.items() if k not in ("rope_scaling", "moe")})
  cfg.model.rope_scaling.update(mapped["rope_scaling"])
  cfg.model.moe.update(mapped["moe"])
  cfg.model.param_dtype = param_dtype
  cfg.data.seq_len = min(cfg.model.max_position_embeddings, 2048)
  cfg.train.init_from = workdir
  try:
    resolved = config.validate(cfg, num_devices=1, check_paths=False)
  except UserError as e:
    raise UserError(f"config.json maps to an invalid maxlm model: {e}") from None
  weights = _Weights(hf_dir)
  _check_weights(weights, cfg.model, hf_dir)
  sp_path = os.path.join(hf_dir, "tokenizer.model")
  tok = tokenizer.Tokenizer(sp_path) if os.path.isfile(sp_path) else None

  with files.partial_directory(workdir, last=("config.json",)) as partial:
    scratch = os.path.join(partial, "scratch")
    os.makedirs(scratch)
    _, abstract = checkpoint.abstract_params(resolved.model)
    names = checkpoint.param_names(abstract)
    dtype = np.dtype(ml_dtypes.bfloat16 if param_dtype == "bfloat16" else param_dtype)
    arrays = {}
    m = cfg.model
    for t in tensors(m):
      arrays[t.name] = np.lib.format.open_memmap(
        os.path.join(scratch, t.name + ".npy"), mode="w+", dtype=dtype, shape=stacked_shape(t, m.num_layers)
      )
      files.reserve(os.path.join(scratch, t.name + ".npy"), arrays[t.name].offset + arrays[t.name].nbytes)
      for index, name in _layers(t, m.num_layers):
        arrays[t.name][index] = t.to_maxlm(weights.get(name)).astype(dtype)
      arrays[t.name].flush()
    leaves, treedef = jax.tree_util.tree_flatten(abstract)
    for name, leaf in zip(names, leaves):
      if name.endswith("router_bias"):  # Not an HF tensor: the balancing bias starts at zero.
        arrays[name] = np.zeros(leaf.shape, leaf.dtype)
    checkpoint.save_params(
      os.path.join(partial, checkpoint.PARAMS_DIR), jax.tree_util.tree_unflatten(treedef, [arrays[n] for n in names])
    )
    del arrays
    shutil.rmtree(scratch)

    os.makedirs(os.path.join(partial, "hf"))
    for name in SIDE_FILES:
      if os.path.isfile(os.path.join(hf_dir, name)):
        shutil.copyfile(os.path.join(hf_dir, name), os.path.join(partial, "hf", name))
    if tok is not None:
      shutil.copyfile(sp_path, os.path.join(partial, "tokenizer.model"))
    with open(os.path.join(partial, "config.json"), "w") as f:
      f.write(cfg.to_json(indent=2))
    with open(os.path.join(partial, "config.py"), "w") as f:
      f.write(_config_file(cfg, os.path.abspath(hf_dir), architecture(hf)))
  summary = {
    "workdir": workdir,
    "architecture": architecture(hf),
    "parameters": int(sum(math.prod(a.shape) for n, a in zip(names, leaves) if not n.endswith("router_bias"))),
    "param_dtype": param_dtype,
    "tokenizer": "tokenizer.model" if tok is not None else None,
  }
  log.info(
    "imported %s (%s, %.1fM parameters) into %s", hf_dir, summary["architecture"], summary["parameters"] / 1e6, workdir
  )
  return summary


def _config_file(cfg: ml_collections.ConfigDict, hf_dir: str, arch: str) -> str:
  m = cfg.model
  model = {k: v for k, v in m.items() if k not in ("rope_scaling", "moe")}  # All: the file must not drift with base.
  lines = [
    f'"""{arch} imported from {hf_dir} by `maxlm convert from-hf`.',
    "",
    "Continue training from it (fresh optimizer state), here or in a new workdir:",
    f"  maxlm train --config={cfg.train.init_from}/config.py --workdir=RUN --config.data.source=prepared \\",
    "      --config.data.path=DATA ...",
    '"""',
    "",
    "from configs import base",
    "",
    "",
    "def get_config():",
    "  c = base.get_config()",
    f"  c.model.update({_kwargs(model)})",
    f"  c.model.rope_scaling.update({_kwargs(m.rope_scaling.to_dict())})",
    f"  c.model.moe.update({_kwargs(m.moe.to_dict())})",
  ]
  lines += [
    f"  c.data.seq_len = {cfg.data.seq_len}",
    f"  c.train.init_from = {cfg.train.init_from!r}",
    "  return c",
    "",
  ]
  return "\n".join(lines)


def _kwargs(values: dict) -> str:
  return ", ".join(f"{k}={v!r}" for k, v in values.items())


# Export ---------------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
  """'5GB' -> 5·10^9 bytes (also KB, MB, GiB, ..., or a plain number of bytes)."""
  match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(I?)B?\s*", text.upper())
  if not match:
    raise UserError(f"--max_shard_size={text}: use a size like 5GB, 500MB or 2GiB")
  number, unit, binary = match.groups()
  return int(float(number) * (1024 if binary else 1000) ** " KMGT".index(unit or " "))


def _side_file(workdir: str, name: str) -> str | None:
  for directory, _ in config.lineage(workdir):
    path = storage.join(directory, "hf", name)
    if storage.isfile(path):
      return path
  return None


def to_hf(
  workdir: str,
  out: str,
  *,
  step: int | None = None,
  dtype: str = "float32",
  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> dict:
  """Exports a workdir's parameters (newest checkpoint, `step`, or imported params) as a Hugging Face
  LlamaForCausalLM directory; returns a summary."""
  if dtype not in EXPORT_DTYPES:
    raise UserError(f"--dtype={dtype}: choose one of {', '.join(EXPORT_DTYPES)}")
  if max_shard_bytes < 1:
    raise UserError("--max_shard_size must be positive")
  cfg = config.load_workdir(workdir)
  directory, found_step = checkpoint.params_location(workdir, step)
  tok, _ = tokenizer.for_run(workdir)
  token_ids = {}
  if tok is not None:
    token_ids = {k + "_token_id": getattr(tok.sp, k + "_id")() for k in ("bos", "eos", "pad")}
    token_ids = {k: v for k, v in token_ids.items() if v >= 0}
  elif _side_file(workdir, "config.json"):
    imported = json.loads(storage.read_text(_side_file(workdir, "config.json")))
    token_ids = {
      k: imported[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if imported.get(k) is not None
    }
  source_model = cfg.model
  cfg = _as_exported(cfg)
  hf = hf_config(cfg, dtype, token_ids)
  out = storage.resolve(out)
  if storage.listdir(out):
    raise UserError(f"--out={out} exists and is not empty: choose a new directory")
  m = cfg.model
  np_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
  plan = [(t, index, name) for t in tensors(m) for index, name in _layers(t, m.num_layers)]
  nbytes = [math.prod(t.hf_shape()) * np_dtype.itemsize for t, _, _ in plan]
  shards = _split(nbytes, max_shard_bytes)
  names = (
    ["model.safetensors"]
    if len(shards) == 1
    else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
  )
  with files.partial_directory(out, last=("config.json",)) as partial:
    _write_tensors(partial, names, shards, plan, directory, source_model, np_dtype, EXPORT_DTYPES[dtype])
    if len(shards) > 1:
      weight_map = {plan[j][2]: names[k] for k, shard in enumerate(shards) for j in shard}
      with open(os.path.join(partial, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(nbytes)}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(partial, "config.json"), "w") as f:
      json.dump(hf, f, indent=2)
    _write_tokenizer_files(partial, workdir, tok, hf)
  summary = {
    "out": out,
    "step": found_step,
    "source": directory,
    "dtype": dtype,
    "files": names,
    "bytes": sum(nbytes),
    "tokenizer": tok is not None,
  }
  log.info("exported %s to %s (%d file(s), %.1f MB)", directory, out, len(names), sum(nbytes) / 1e6)
  return summary


def _split(nbytes: list[int], limit: int) -> list[list[int]]:
  """Consecutive groups of tensor indices of at most `limit` bytes (a bigger tensor gets its own shard)."""
  shards, size = [[]], 0
  for j, n in enumerate(nbytes):
    if shards[-1] and size + n > limit:
      shards.append([])
      size = 0
    shards[-1].append(j)
    size += n
  return shards


def _as_exported(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config of the Llama that computes what `cfg`'s model computes: a muP model's output multiplier 1/m moves into
  an untied lm_head (tied embeddings are untied: the input embedding keeps its scale) and its attention's 1/Dh into
  q_proj (× Dh^-1/2, so Llama's 1/sqrt(Dh) gives 1/Dh); `_exported_value` applies both. An sp model is itself."""
  if cfg.model.parametrization != "mup":
    return cfg
  out = ml_collections.ConfigDict(cfg.to_dict())
  out.model.update(parametrization="sp", mup_base_width=0, tie_embeddings=False)
  return out


def _exported_value(t: Tensor, source: ml_collections.ConfigDict, directory: str, abstract) -> np.ndarray:
  """The maxlm array behind HF tensor `t` of the exported model (see `_as_exported`), restored from `directory`."""
  mup = source.parametrization == "mup"
  name = "embed" if t.name == "lm_head" and source.tie_embeddings else t.name
  array = checkpoint.restore_params(directory, abstract, names=[name])[name]
  if name == "embed" and t.name == "lm_head":
    array = array.T
  if mup and t.name == "lm_head":
    array = array * np.asarray(1.0 / transformer.width_multiplier(source), array.dtype)
  if t.name == "moe_blocks.mlp.router":
    bias = checkpoint.restore_params(directory, abstract, names=["moe_blocks.mlp.router_bias"])
    if np.any(bias["moe_blocks.mlp.router_bias"] != 0):
      raise UserError(
        "the routers' balancing bias (model.moe.bias_update_rate) is not zero and Mixtral has none: "
        "this model cannot be exported"
      )
  if mup and t.name.endswith("attn.q_proj"):
    array = array * np.asarray((source.d_model // source.num_heads) ** -0.5, array.dtype)
  return array


def _write_tensors(partial, files, shards, plan, directory, source, np_dtype, st_dtype) -> None:
  """Writes the safetensors files: each header from the plan first, then the tensors in plan order, each
  stacked maxlm array restored once (as a host NumPy array: a JAX array would cost another copy) and
  written layer by layer. `source` is the model config of the checkpoint (see `_as_exported`)."""
  _, abstract = checkpoint.abstract_params(source)
  current, array = None, None
  for file, shard in zip(files, shards):
    with open(os.path.join(partial, file), "wb") as f:
      header, offset = {"__metadata__": {"format": "pt"}}, 0
      for j in shard:
        t, _, name = plan[j]
        n = math.prod(t.hf_shape()) * np_dtype.itemsize
        header[name] = {"dtype": st_dtype, "shape": list(t.hf_shape()), "data_offsets": [offset, offset + n]}
        offset += n
      blob = json.dumps(header, separators=(",", ":")).encode()
      blob += b" " * (-len(blob) % 8)  # The format pads the header so the data starts 8-byte aligned.
      f.write(struct.pack("<Q", len(blob)) + blob)
      for j in shard:
        t, index, _ = plan[j]
        if t.name != current:
          current, array = t.name, None
          array = _exported_value(t, source, directory, abstract)
        value = t.to_hf(array[index]).astype(np_dtype)
        f.write(np.ascontiguousarray(value).tobytes())


def _write_tokenizer_files(partial: str, workdir: str, tok: tokenizer.Tokenizer | None, hf: dict) -> None:
  """tokenizer.model and the HF side files: those carried from an import, else minimal LlamaTokenizer ones."""
  for name in SIDE_FILES[1:]:
    carried = _side_file(workdir, name)
    if carried:
      with open(os.path.join(partial, name), "wb") as f:
        f.write(storage.Path(carried).read_bytes())
  if tok is not None:
    with open(os.path.join(partial, "tokenizer.model"), "wb") as f:
      f.write(tok.model_bytes)
  piece = lambda i: tok.sp.id_to_piece(i) if tok is not None and i >= 0 else None  # noqa: E731
  if tok is not None and not os.path.exists(os.path.join(partial, "tokenizer_config.json")):
    special = {k + "_token": piece(getattr(tok.sp, k + "_id")()) for k in ("bos", "eos", "unk", "pad")}
    special = {k: v for k, v in special.items() if v is not None}
    with open(os.path.join(partial, "tokenizer_config.json"), "w") as f:
      # maxlm's prepared data has no BOS, so neither do these prompts; clean-up would change decoded text.
      json.dump(
        {
          "tokenizer_class": "LlamaTokenizer",
          "add_bos_token": False,
          "add_eos_token": False,
          "clean_up_tokenization_spaces": False,
          "model_max_length": hf["max_position_embeddings"],
          **special,
        },
        f,
        indent=2,
      )
    with open(os.path.join(partial, "special_tokens_map.json"), "w") as f:
      json.dump(special, f, indent=2)
  if not os.path.exists(os.path.join(partial, "generation_config.json")):
    with open(os.path.join(partial, "generation_config.json"), "w") as f:
      json.dump({k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf}, f, indent=2)
