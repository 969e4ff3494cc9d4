"""model.parametrization='mup': per-parameter learning-rate multipliers, 1/Dh attention, 1/m logits; the coordinate
check (activations flat in width under mup, logits growing under sp); a mup model exports to a Llama that computes
the same logits in transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from maxlm import config
from maxlm.interop import hf
from maxlm.model import attention, transformer
from maxlm.research import mup_check
from maxlm.training import checkpoint, loop, optim

from conftest import make_config

MUP = {"model.parametrization": "mup", "model.mup_base_width": 16}  # the tiny model (d_model 64) is m = 4


def _paths(tree) -> dict[str, object]:
  return {
    jax.tree_util.keystr(p, simple=True, separator="/").removesuffix("/value"): v
    for p, v in jax.tree_util.tree_leaves_with_path(tree)
  }


def test_learning_rate_multipliers_per_parameter():
  cfg = make_config(**MUP, **{"model.tie_embeddings": False, "model.qk_norm": True})
  m = transformer.width_multiplier(cfg.model)
  assert m == 4.0
  _, params = nnx.split(transformer.create(cfg.model, 0))
  multipliers = _paths(optim.lr_multipliers(params, m))
  assert multipliers == {
    "blocks/attn/q_proj": 0.25,
    "blocks/attn/k_proj": 0.25,
    "blocks/attn/v_proj": 0.25,
    "blocks/attn/o_proj": 0.25,
    "blocks/mlp/gate_proj": 0.25,
    "blocks/mlp/up_proj": 0.25,
    "blocks/mlp/down_proj": 0.25,
    "embed": 1.0,
    "lm_head": 1.0,
    "final_norm/scale": 1.0,
    "blocks/attn_norm/scale": 1.0,
    "blocks/mlp_norm/scale": 1.0,
    "blocks/attn/q_norm/scale": 1.0,
    "blocks/attn/k_norm/scale": 1.0,
  }
  # The optimizer applies them: same gradients, a quarter of the AdamW step for the matrices, the same for the rest.
  o = make_config(**{"optim.warmup_steps": 0, "optim.weight_decay": 0.0, "optim.clip_norm": 0.0}).optim
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(2), p.shape), params)
  steps = {}
  for width in (1.0, m):
    tx, _ = optim.make(o, 10, width)
    updates, _ = tx.update(grads, tx.init(params), params)
    steps[width] = _paths(updates)
  for name, k in multipliers.items():
    np.testing.assert_allclose(np.asarray(steps[m][name][...]), k * np.asarray(steps[1.0][name][...]), rtol=1e-6)


def test_attention_scores_are_scaled_by_one_over_head_dim():
  cfg = make_config(**MUP, **{"model.num_layers": 1})
  sp = make_config(**{"model.num_layers": 1})
  got = transformer.create(cfg.model, 0).blocks
  layer = jax.tree.map(lambda a: a[0], nnx.split(got)[1])
  block = nnx.merge(nnx.split(got)[0], layer)
  x = jax.random.normal(jax.random.key(0), (1, 16, 64))
  positions, segments = jnp.arange(16)[None], jnp.ones((1, 16), jnp.int32)
  q, k, v = block.attn._project(x, positions)  # q already carries the extra Dh^-1/2
  reference = nnx.merge(nnx.split(transformer.create(sp.model, 0).blocks)[0], layer).attn
  q_sp, k_sp, _ = reference._project(x, positions)
  np.testing.assert_allclose(q, q_sp * 16**-0.5, rtol=1e-6)
  np.testing.assert_allclose(k, k_sp, rtol=1e-6)
  out = attention.xla_attention(q, k, v, segments)
  scores = jnp.einsum("bthd,bshd->bhts", q_sp, jnp.repeat(k, 2, axis=2)) / 16  # 1/Dh, Dh = 16
  causal = jnp.tril(jnp.ones((16, 16), bool))
  probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
  want = jnp.einsum("bhts,bshd->bthd", probs, jnp.repeat(v, 2, axis=2))
  np.testing.assert_allclose(out, want, atol=2e-6)


def test_logits_carry_the_output_multiplier():
  cfg = make_config(**MUP)
  model = transformer.create(cfg.model, 0)
  x = jax.random.normal(jax.random.key(0), (1, 4, 64))
  np.testing.assert_allclose(model.logits(x), jnp.einsum("btd,vd->btv", x, model.embed[...]) / 4, rtol=1e-5)


@pytest.fixture(scope="module")
def coordinates():
  out = {}
  for parametrization in ("sp", "mup"):
    cfg = config.load(
      [
        "--config=configs/tiny.py",
        f"--config.model.parametrization={parametrization}",
        "--config.metrics.peak_tflops=1",
        "--config.data.seq_len=32",
        "--config.train.global_batch=8",
      ]
    )
    out[parametrization] = mup_check.coordinates(cfg, [32, 128, 256], steps=3, lr=1e-2, devices=jax.devices()[:1])
  return out


def test_coordinate_check_under_mup_activations_stay_within_2x_over_8x_width(coordinates):
  result = coordinates["mup"]
  assert result["layers"] == ["embedding", "block 1", "block 2", "logits"]
  for step in range(4):
    growth = mup_check.growth(result, step)
    for layer in ("embedding", "block 1", "block 2"):
      assert 0.5 < growth[layer] < 2.0, (step, growth)
  assert 0.5 < mup_check.growth(result, 3)["logits"] < 2.0


def test_coordinate_check_under_sp_the_logits_grow_with_width(coordinates):
  growth = mup_check.growth(coordinates["sp"], 3)
  assert growth["logits"] > 2.5, growth
  assert growth["logits"] > 2 * mup_check.growth(coordinates["mup"], 3)["logits"]


def test_a_mup_model_exports_to_a_llama_with_the_same_logits(tmp_path):
  cfg = make_config(
    **MUP,
    **{
      "train.steps": 2,
      "train.eval_every": 0,
      "checkpoint.every_steps": 2,
      "metrics.tensorboard": False,
      "metrics.peak_tflops": 1.0,
      "model.init_std": 0.3,
    },
  )
  loop.run(cfg, str(tmp_path / "run"), devices=jax.devices()[:1])
  summary = hf.to_hf(str(tmp_path / "run"), str(tmp_path / "hf"))
  assert summary["files"] == ["model.safetensors"]
  model = checkpoint.restore_model(config.load_workdir(str(tmp_path / "run")), str(tmp_path / "run"), jax.devices()[:1])
  tokens = np.random.default_rng(0).integers(0, 256, (2, 24))
  want = np.asarray(model(jnp.asarray(tokens)))
  llama = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
  assert llama.config.tie_word_embeddings is False  # the input embedding keeps its scale; the head takes 1/m
  with torch.no_grad():
    got = llama(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(got, want, atol=1e-4)
