"""`maxlm mup-check`: the coordinate check of muP (Yang et al. 2022): how big each layer's activations are, across
widths, over the first training steps.

For each width w the config's model is widened (d_model = w; heads of the same head dim; kv heads and the MLP in the
same ratio; `model.mup_base_width` kept, so m = w / base) and trained a few steps at a constant learning rate with no
warmup on a fixed batch of its data. After each step it records the RMS of the residual stream after the embedding
and after every block, and of the logits, on that batch. Under muP the curves are flat in width; under the standard
parametrization the logits (and the blocks' updates) grow with it, which is why the best learning rate moves.
"""

from __future__ import annotations

import ml_collections

from maxlm import config
from maxlm.errors import UserError


def widen(cfg: ml_collections.ConfigDict, width: int) -> ml_collections.ConfigDict:
  """`cfg` (resolved) with its model scaled to d_model = `width`: same head dim, same query/kv head and MLP ratios."""
  m = cfg.model
  head_dim, group, mlp_ratio = m.d_model // m.num_heads, m.num_heads // m.num_kv_heads, m.mlp_dim / m.d_model
  if width % head_dim or (width // head_dim) % group:
    raise UserError(
      f"--widths: {width} is not a multiple of head_dim={head_dim} x {group} query heads per kv head; choose widths "
      f"divisible by {head_dim * group}"
    )
  out = ml_collections.ConfigDict(cfg.to_dict())
  heads = width // head_dim
  out.model.update(
    d_model=width,
    num_heads=heads,
    num_kv_heads=heads // group,
    mlp_dim=max(2, int(round(mlp_ratio * width / 2)) * 2),
    mup_base_width=m.mup_base_width or m.d_model,
  )
  return out


def coordinates(cfg: ml_collections.ConfigDict, widths: list[int], steps: int, lr: float, devices=None) -> dict:
  """{"widths", "layers", "rms": [width][step][layer]} for a loaded (not validated) config; see the module docstring."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from maxlm.model import transformer
  from maxlm.training import loop
  from maxlm.training import step as step_lib

  devices = list(jax.devices()[:1] if devices is None else devices)
  table = []
  layers = None
  for width in widths:
    base = ml_collections.ConfigDict(cfg.to_dict())
    base.optim.update(lr=lr, schedule="constant", warmup_steps=0)
    base.train.update(steps=steps, eval_every=0, log_every=1)
    base.checkpoint.every_steps = 0
    base.metrics.tensorboard = False
    base.mesh.update({a: 1 for a in config.MESH_AXES}, data=-1)
    wide = config.validate(widen(config.validate(base, num_devices=len(devices)), width), num_devices=len(devices))
    session = loop.setup(wide, devices)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda wide=wide: transformer.create(wide.model, 0)))

    @jax.jit
    def measure(params, tokens_BxT, graphdef=graphdef):
      model = nnx.merge(graphdef, params)
      xs = model.residuals(tokens_BxT)
      logits = model.logits(model.final_norm(xs[-1]))
      return jnp.stack([jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)))) for x in [*xs, logits]])

    batch = session.next_batch()
    state, rows = session.program.init(), []
    rows.append([float(v) for v in measure(state.params, batch["inputs"])])
    for _ in range(steps):
      state, _ = session.step(state, batch, step_lib.controls())
      rows.append([float(v) for v in measure(state.params, batch["inputs"])])
    table.append(rows)
    layers = ["embedding", *(f"block {i + 1}" for i in range(wide.model.num_layers)), "logits"]
  return {
    "parametrization": cfg.model.parametrization,
    "widths": widths,
    "steps": steps,
    "lr": lr,
    "layers": layers,
    "rms": table,
  }


def growth(result: dict, step: int) -> dict[str, float]:
  """Per layer: RMS at the widest width ÷ RMS at the narrowest, after `step` steps."""
  first, last = result["rms"][0][step], result["rms"][-1][step]
  return {name: b / a for name, a, b in zip(result["layers"], first, last)}


def plot(result: dict, path: str) -> None:
  from matplotlib.figure import Figure

  layers = result["layers"]
  fig = Figure(figsize=(3.2 * len(layers), 3.2), layout="constrained")
  axes = fig.subplots(1, len(layers), squeeze=False)[0]
  for j, name in enumerate(layers):
    for t in range(result["steps"] + 1):
      axes[j].plot(
        result["widths"], [result["rms"][i][t][j] for i in range(len(result["widths"]))], marker=".", label=f"step {t}"
      )
    axes[j].set_xscale("log", base=2)
    axes[j].set_title(name)
    axes[j].set_xlabel("width (d_model)")
  axes[0].set_ylabel(f"RMS ({result['parametrization']}, lr {result['lr']:g})")
  axes[0].legend(fontsize="small")
  fig.savefig(path, dpi=100)
