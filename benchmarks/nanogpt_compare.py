"""maxlm vs a nanoGPT-style PyTorch trainer on the same model shape, batch and sequence, side by side.

The PyTorch side is written the way nanoGPT writes its model and loop (one `nn.Module` per block part,
`F.scaled_dot_product_attention`, `torch.compile`, bf16 autocast over f32 master weights, fused AdamW,
gradient clipping), but with maxlm's Llama block (RMSNorm, half-split RoPE, grouped-query attention,
SwiGLU, tied or untied embedding) so that both sides do the same FLOPs: the script checks the parameter
counts agree. Each side runs in its own process, on the same random-token batch shape, and both processes stay
alive: after compiling and `--warmup` steps each, they take turns, `--steps` synchronised steps at a time, for
`--rounds` rounds (the first side alternating), so that a host whose speed drifts over minutes (shared CPUs) slows
both sides alike. The ratio reported is the median over rounds of the ratio within a round. On a GPU the JAX side
takes at most 45% of the memory (XLA_PYTHON_CLIENT_MEM_FRACTION), leaving the rest to PyTorch.

  python benchmarks/nanogpt_compare.py --config gpt2_124m --batch 16 [--steps 10] [--rounds 3] [--no-compile]
  python benchmarks/nanogpt_compare.py --config cpu_10m --batch 8 --config.model.num_kv_heads=8 ...

Writes benchmarks/results/nanogpt_compare_<device>_<config>.json with both sides' records, the per-round ratios and
`maxlm_over_torch` = maxlm tokens/s ÷ PyTorch tokens/s.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "@@nanogpt_compare "  # Marks a child's protocol lines on its stdout.
SHAPE_KEYS = (
  "d_model",
  "num_heads",
  "num_kv_heads",
  "mlp_dim",
  "vocab_size",
  "num_layers",
  "norm_eps",
  "rope_theta",
  "tie_embeddings",
  "init_std",
)


def torch_side(shape: dict, batch: int, seq_len: int, warmup: int, compile_model: bool):
  import torch
  import torch.nn as nn
  import torch.nn.functional as F

  device = "cuda" if torch.cuda.is_available() else "cpu"
  D, H, K, F_, V, L = (
    shape[k] for k in ("d_model", "num_heads", "num_kv_heads", "mlp_dim", "vocab_size", "num_layers")
  )
  Dh = D // H

  class RMSNorm(nn.Module):
    def __init__(self, dim):
      super().__init__()
      self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
      x32 = x.float()
      return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + shape["norm_eps"]) * self.weight).type_as(x)

  def rope(x, cos, sin):  # x: (B, heads, T, Dh); pairs (i, i + Dh/2)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)

  class Attention(nn.Module):
    def __init__(self):
      super().__init__()
      self.q_proj, self.o_proj = nn.Linear(D, H * Dh, bias=False), nn.Linear(H * Dh, D, bias=False)
      self.k_proj, self.v_proj = nn.Linear(D, K * Dh, bias=False), nn.Linear(D, K * Dh, bias=False)

    def forward(self, x, cos, sin):
      B, T, _ = x.shape
      q = self.q_proj(x).view(B, T, H, Dh).transpose(1, 2)
      k = self.k_proj(x).view(B, T, K, Dh).transpose(1, 2)
      v = self.v_proj(x).view(B, T, K, Dh).transpose(1, 2)
      y = F.scaled_dot_product_attention(rope(q, cos, sin), rope(k, cos, sin), v, is_causal=True, enable_gqa=H != K)
      return self.o_proj(y.transpose(1, 2).contiguous().view(B, T, H * Dh))

  class MLP(nn.Module):
    def __init__(self):
      super().__init__()
      self.gate, self.up, self.down = (
        nn.Linear(D, F_, bias=False),
        nn.Linear(D, F_, bias=False),
        nn.Linear(F_, D, bias=False),
      )

    def forward(self, x):
      return self.down(F.silu(self.gate(x)) * self.up(x))

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.ln_1, self.attn, self.ln_2, self.mlp = RMSNorm(D), Attention(), RMSNorm(D), MLP()

    def forward(self, x, cos, sin):
      x = x + self.attn(self.ln_1(x), cos, sin)
      return x + self.mlp(self.ln_2(x))

  class Llama(nn.Module):
    def __init__(self):
      super().__init__()
      self.wte = nn.Embedding(V, D)
      self.h = nn.ModuleList(Block() for _ in range(L))
      self.ln_f = RMSNorm(D)
      self.lm_head = nn.Linear(D, V, bias=False)
      if shape["tie_embeddings"]:
        self.lm_head.weight = self.wte.weight  # https://paperswithcode.com/method/weight-tying
      inv_freq = shape["rope_theta"] ** (-torch.arange(Dh // 2, dtype=torch.float32) / (Dh // 2))
      angle = torch.arange(seq_len, dtype=torch.float32)[:, None] * inv_freq
      self.register_buffer("cos", angle.cos(), persistent=False)
      self.register_buffer("sin", angle.sin(), persistent=False)

    def forward(self, idx, targets):
      x = self.wte(idx)
      for block in self.h:
        x = block(x, self.cos, self.sin)
      logits = self.lm_head(self.ln_f(x))
      return F.cross_entropy(logits.float().view(-1, V), targets.view(-1))

  torch.manual_seed(0)
  net = Llama().to(device)
  with torch.no_grad():  # maxlm's init: embedding N(0, init_std), projections N(0, 1/fan_in).
    for name, p in net.named_parameters():
      if p.dim() == 2:
        p.normal_(0.0, shape["init_std"] if name == "wte.weight" else p.shape[1] ** -0.5)
  n_params = sum(p.numel() for p in net.parameters())
  decay = [p for p in net.parameters() if p.dim() >= 2]
  no_decay = [p for p in net.parameters() if p.dim() < 2]
  opt = torch.optim.AdamW(
    [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
    lr=3e-4,
    betas=(0.9, 0.95),
    fused=device == "cuda",
  )
  model = torch.compile(net) if compile_model else net
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.backends.cudnn.allow_tf32 = True
  autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda")
  gen = torch.Generator().manual_seed(0)
  idx = torch.randint(0, V, (batch, seq_len + 1), generator=gen).to(device)
  inputs, targets = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()

  def step():
    with autocast:
      loss = model(inputs, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  t0 = time.perf_counter()
  first_loss = float(step())
  for _ in range(warmup - 1):
    step()
  sync()
  warmup_s = time.perf_counter() - t0

  class Runner:
    last_loss = first_loss

    def blocked(self, n):
      times = []
      for _ in range(n):
        t0 = time.perf_counter()
        self.last_loss = step()
        sync()
        times.append(time.perf_counter() - t0)
      return times

    def pipelined(self, n):
      t0 = time.perf_counter()
      for _ in range(n):
        self.last_loss = step()
      sync()
      return (time.perf_counter() - t0) / n

    def record(self, blocked, pipelined):
      return {
        "framework": f"torch {torch.__version__}",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "compiled": compile_model,
        "threads": torch.get_num_threads(),
        "params": n_params,
        "first_loss": first_loss,
        "final_loss": float(self.last_loss),
        "warmup_s": warmup_s,
        "step_time_s_median": statistics.median(blocked),
        "step_time_s_pipelined": pipelined,
        "tokens_per_sec": batch * seq_len / statistics.median(blocked),
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
      }

  return Runner()


def maxlm_side(config_args: list[str], warmup: int):
  """The production step (`maxlm.perf.bench.Runner`) after `warmup` steps, as `torch_side` returns its trainer."""
  from maxlm.training import hostmem

  hostmem.keep_freed_memory()  # As the `maxlm` command does, before any JAX computation.
  import jax

  from maxlm import config
  from maxlm.perf import bench

  cfg = config.validate(config.load(config_args), num_devices=jax.device_count(), platform=jax.devices()[0].platform)
  runner = bench.Runner(cfg)
  runner.blocked(warmup)
  return runner


def serve(runner, **record_args) -> None:
  """Answers the parent's commands on stdin, one JSON line each on stdout (prefixed, so library output is
  skipped): `blocked N` -> N step times, `pipelined N` -> mean step time, `record B P` -> the side's record."""
  print(PREFIX + json.dumps("ready"), flush=True)
  for line in sys.stdin:
    command, *rest = line.split(maxsplit=1)
    if command == "blocked":
      answer = runner.blocked(int(rest[0]))
    elif command == "pipelined":
      answer = runner.pipelined(int(rest[0]))
    else:  # record
      blocked, pipelined = json.loads(rest[0])
      answer = runner.record(blocked, pipelined, **record_args)
    print(PREFIX + json.dumps(answer), flush=True)


class Child:
  """One side's process, driven line by line; its stderr goes to a file shown when it fails."""

  def __init__(self, name: str, cmd: list[str], env: dict):
    self.name, self.log = name, tempfile.TemporaryFile(mode="w+")
    self.proc = subprocess.Popen(
      cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env
    )
    self.ask(None)  # "ready": compiled and warmed up.

  def ask(self, command: str | None):
    if command is not None:
      self.proc.stdin.write(command + "\n")
      self.proc.stdin.flush()
    for line in self.proc.stdout:
      if line.startswith(PREFIX):
        return json.loads(line[len(PREFIX) :])
    self.proc.wait()
    self.log.seek(0)
    sys.exit(f"the {self.name} side failed (exit {self.proc.returncode}):\n{self.log.read()[-3000:]}")

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="gpt2_124m")
  parser.add_argument("--batch", type=int, default=16, help="rows per step on both sides (no accumulation)")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per side per round")
  parser.add_argument("--rounds", type=int, default=3, help="rounds, the sides alternating (which goes first too)")
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--no-compile", dest="compile", action="store_false", help="PyTorch eager (CPU smoke runs)")
  parser.add_argument("--results_dir", default=os.path.join(REPO, "benchmarks", "results"))
  parser.add_argument("--side", choices=("torch", "maxlm"), help=argparse.SUPPRESS)  # Internal: one side's process.
  parser.add_argument("--spec", help=argparse.SUPPRESS)
  parser.add_argument("overrides", nargs="*", help="--config.KEY=VALUE overrides for both sides")
  args, extra = parser.parse_known_args()
  if args.steps < 1 or args.rounds < 1 or args.warmup < 1:
    parser.error("--steps, --rounds and --warmup must be at least 1")
  overrides = [*args.overrides, *extra, f"--config.train.global_batch={args.batch}", "--config.train.microbatches=1"]
  config_args = [f"--config={REPO}/configs/{args.config}.py", *overrides]
  if args.side == "torch":
    spec = json.loads(args.spec)
    serve(torch_side(spec["shape"], args.batch, spec["seq_len"], args.warmup, args.compile))
    return
  if args.side == "maxlm":
    serve(maxlm_side(config_args, args.warmup), name=args.config, warmup=args.warmup)
    return

  from maxlm import config  # JAX is imported, but no backend is started in this process.
  from maxlm.model import flops
  from maxlm.perf import bench

  raw = config.load(config_args)
  shape = {k: raw.model[k] for k in SHAPE_KEYS}
  seq_len = raw.data.seq_len
  expected = flops.param_count(raw.model)
  env = {**os.environ, "PYTHONPATH": REPO}
  common = [sys.executable, os.path.abspath(__file__), f"--config={args.config}", f"--batch={args.batch}"]
  common += [f"--warmup={args.warmup}", *([] if args.compile else ["--no-compile"])]
  spec = json.dumps({"shape": shape, "seq_len": seq_len})
  # Both processes stay alive, each idle while the other runs; on a GPU, JAX takes under half its memory.
  sides = {"torch": Child("PyTorch", [*common, "--side=torch", f"--spec={spec}"], env)}
  sides["maxlm"] = Child(
    "maxlm", [*common, "--side=maxlm", *overrides], {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.45", **env}
  )
  times = {name: [] for name in sides}
  round_ratios = []
  for r in range(args.rounds):
    order = list(sides) if r % 2 == 0 else list(sides)[::-1]
    for name in order:
      times[name].append(sides[name].ask(f"blocked {args.steps}"))
    round_ratios.append(statistics.median(times["torch"][-1]) / statistics.median(times["maxlm"][-1]))
    print(f"round {r + 1}/{args.rounds}: maxlm / PyTorch tokens/s = {round_ratios[-1]:.3f}", flush=True)
  records = {}
  for name, side in sides.items():
    blocked = [t for rnd in times[name] for t in rnd]
    records[name] = side.ask(f"record {json.dumps([blocked, side.ask(f'pipelined {args.steps}')])}")
    side.close()
  pt, mx = records["torch"], records["maxlm"]
  if pt["params"] != expected:
    sys.exit(f"parameter counts differ: PyTorch {pt['params']}, maxlm {expected}: the models are not the same shape")
  flops_per_step = flops.training_flops_per_token(raw.model, seq_len) * args.batch * seq_len
  for side in (pt, mx):
    side["model_tflops"] = flops_per_step / side["step_time_s_median"] / 1e12
  result = {
    "benchmark": "nanogpt_compare",
    "date": datetime.date.today().isoformat(),
    "config": args.config,
    "overrides": [*args.overrides, *extra],
    "device": mx["device"],
    "host": mx["host"],
    "batch": args.batch,
    "seq_len": seq_len,
    "params": expected,
    "flops_per_step": flops_per_step,
    "peak_tflops_per_device": mx["peak_tflops_per_device"],
    "rounds": args.rounds,
    "steps_per_round": args.steps,
    "torch": pt,
    "maxlm": mx,
    "round_ratios": round_ratios,
    # Median over rounds of the ratio within a round: the host's drift between rounds cancels.
    "maxlm_over_torch": statistics.median(round_ratios),
    "loss_at_init_ln_v": math.log(raw.model.vocab_size),
  }
  os.makedirs(args.results_dir, exist_ok=True)
  slug = bench.device_slug(mx["device"])
  path = os.path.join(args.results_dir, f"nanogpt_compare_{slug}_{args.config}.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  peak = mx["peak_tflops_per_device"]
  for name, side, tps in (("PyTorch", pt, pt["tokens_per_sec"]), ("maxlm", mx, mx["tokens_per_sec_per_device"])):
    print(
      f"{name:8} {1e3 * side['step_time_s_median']:9.1f} ms/step {tps:12,.0f} tokens/s "
      f"{side['model_tflops']:8.3g} TFLOP/s  MFU {100 * side['model_tflops'] / peak:5.1f}%"
    )
  print(
    f"maxlm / PyTorch tokens/s = {result['maxlm_over_torch']:.2f} (median of {args.rounds} rounds: "
    f"{', '.join(f'{x:.2f}' for x in round_ratios)}); wrote {path}"
  )


if __name__ == "__main__":
  main()
