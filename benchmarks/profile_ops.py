"""Where a train step's time goes, op by op: a profiler trace of the production step joined to its optimized HLO.

Traces `--steps` steps (after warm-up) of `loop.setup`'s compiled step, matches each trace event to the HLO
instruction of the same name, and reports per step: time by kind (matmul: a `dot` or a fusion containing one;
elementwise fusion; other ops by opcode), and the matmuls grouped by source op and output shape with their
FLOPs (2 · output elements · contracted size, from the HLO) and FLOP/s while they run. Event durations are each
op's own wall time; XLA:CPU runs independent ops side by side, so the kinds can add up to more than the step.
On CPU the op events need `--xla_cpu_enable_xprof_traceme=true`, which this script adds to XLA_FLAGS.
Written and tested for XLA:CPU; accelerator traces name device kernels rather than HLO instructions, so there
it reports only the events it can match (none: it says so and exits 1); read those in TensorBoard or Perfetto.
Writes benchmarks/results/profile_<platform>_<config>.json and prints the tables.

  python benchmarks/profile_ops.py --config=configs/cpu_10m.py [--steps 2] [--top 25] [--config.x=y ...]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import json
import math
import os
import re
import sys
import tempfile

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"

import jax  # noqa: E402  (after XLA_FLAGS)
from jax.profiler import ProfileData  # noqa: E402

from maxlm import config, provenance  # noqa: E402
from maxlm.training import hostmem, loop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import step_times  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\((.*)$", re.M)
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) [^\n]*\{\n(.*?)\n\}", re.S | re.M)


def _source(rest: str) -> str:
  """The op_name metadata of an instruction's text after its opcode: the jax op it came from."""
  m = re.search(r'op_name="([^"]+)"', rest)
  return m.group(1) if m else ""


def _dims(shape: str) -> list[int]:
  m = re.match(r"\w+\[([\d,]*)\]", shape)
  return [int(d) for d in m.group(1).split(",") if d] if m else []


class Hlo:
  """The instructions of an optimized HLO module: opcode, shape, what each fusion calls, each dot's FLOPs."""

  def __init__(self, text: str):
    self.computations = {name: body for name, body in _COMPUTATION.findall(text)}
    self.instructions = {name: (shape, op, rest) for name, shape, op, rest in _INSTRUCTION.findall(text)}

  def _dot(self, rest: str, shape: str) -> tuple[float, str]:
    lhs = re.match(r"\s*%([\w.\-]+)", rest)
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
    lhs_dims = _dims(self.instructions[lhs.group(1)][0]) if lhs and lhs.group(1) in self.instructions else []
    contracted = math.prod(lhs_dims[int(c)] for c in contracting.group(1).split(",") if c) if contracting else 0
    return 2.0 * math.prod(_dims(shape)) * contracted, _source(rest)

  def classify(self, name: str) -> tuple[str, float, str]:
    """(kind, FLOPs, source op) of instruction `name`; FLOPs count the dots only."""
    shape, op, rest = self.instructions[name]
    if op == "dot":
      flops, source = self._dot(rest, shape)
      return "matmul", flops, source
    if op == "fusion":
      called = re.search(r"calls=%([\w.\-]+)", rest)
      body = self.computations.get(called.group(1), "") if called else ""
      dots = [(s, r) for _, s, o, r in _INSTRUCTION.findall(body) if o == "dot"]
      if dots:
        results = [self._dot(r, s) for s, r in dots]
        return "matmul", sum(f for f, _ in results), results[0][1]
      return "elementwise fusion", 0.0, _source(rest)
    return op, 0.0, ""


def event_totals(trace_dir: str) -> dict[str, list[int]]:
  """[nanoseconds, events] per event name over every plane and line of the trace in `trace_dir`."""
  paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not paths:
    raise SystemExit(f"profile_ops: the profiler wrote no trace under {trace_dir}")
  totals = collections.defaultdict(lambda: [0, 0])
  for plane in ProfileData.from_file(paths[0]).planes:
    for line in plane.lines:
      for event in line.events:
        totals[event.name][0] += event.duration_ns
        totals[event.name][1] += 1
  return totals


def summarize(hlo: Hlo, totals: dict[str, list[int]], steps: int, step_time_s: float, top: int) -> dict:
  """The report of the module docstring; an instruction inside a loop (scanned layers) counts once per event."""
  kinds = collections.Counter()
  groups = collections.defaultdict(lambda: {"ms": 0.0, "gflop": 0.0, "ops": 0})
  others = collections.defaultdict(lambda: {"ms": 0.0, "ops": 0})
  matched = 0
  for name, (ns, events) in totals.items():
    if name not in hlo.instructions:
      continue
    matched += 1
    kind, flop, source = hlo.classify(name)
    runs, ms = events / steps, ns / steps / 1e6
    kinds[kind] += ms
    shape = hlo.instructions[name][0].split("{")[0]
    source = "/".join(source.split("/")[1:]) if source.startswith("jit(") else source
    if kind != "matmul":
      o = others[(kind, source, shape)]
      o["ms"] += ms
      o["ops"] += runs
    else:
      g = groups[(source.rsplit("/", 1)[0], shape)]
      g["ms"] += ms
      g["gflop"] += flop * runs / 1e9
      g["ops"] += runs
  if not matched:
    raise SystemExit(
      "profile_ops: no trace event names an HLO instruction (on CPU, XLA_FLAGS needs "
      "--xla_cpu_enable_xprof_traceme=true before JAX starts)"
    )
  matmuls = [
    {
      "source": s,
      "shape": shape,
      "ops_per_step": round(g["ops"]),
      "ms_per_step": g["ms"],
      "gflop_per_step": g["gflop"],
      "gflops_while_running": g["gflop"] / g["ms"] * 1e3 if g["ms"] else 0.0,
    }
    for (s, shape), g in groups.items()
  ]
  matmuls.sort(key=lambda m: -m["ms_per_step"])
  matmul_ms, matmul_gflop = kinds["matmul"], sum(m["gflop_per_step"] for m in matmuls)
  return {
    "step_time_ms": 1e3 * step_time_s,
    "op_ms_per_step": sum(kinds.values()),
    "kinds_ms_per_step": dict(kinds.most_common()),
    "matmul_gflop_per_step": matmul_gflop,
    "matmul_gflops_while_running": matmul_gflop / matmul_ms * 1e3 if matmul_ms else 0.0,
    "matmuls": matmuls[:top],
    "other_ops": sorted(
      (
        {"kind": k, "source": src, "shape": shape, "ops_per_step": round(o["ops"]), "ms_per_step": o["ms"]}
        for (k, src, shape), o in others.items()
      ),
      key=lambda o: -o["ms_per_step"],
    )[:top],
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=2, help="traced steps, after 5 warm-up steps")
  parser.add_argument("--top", type=int, default=25, help="matmul groups and other ops listed")
  parser.add_argument("--results_dir", default=os.path.join(REPO, "benchmarks", "results"))
  args, overrides = parser.parse_known_args()
  if args.steps < 1:
    parser.error("--steps must be at least 1")
  config_path = next((o.split("=", 1)[1] for o in overrides if o.startswith("--config=")), None)
  if config_path is None:
    parser.error("--config=configs/NAME.py is required")
  hostmem.keep_freed_memory()
  try:
    cfg = config.load(overrides + ["--config.checkpoint.every_steps=0"])
    cfg = config.validate(cfg, num_devices=1, platform=jax.devices()[0].platform)
  except config.UserError as e:
    raise SystemExit(f"profile_ops: error: {e}") from None
  session = loop.setup(cfg, jax.devices()[:1])
  state, _ = step_times(session, session.program.init(), 0, warmup=5)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    state, times = step_times(session, state, args.steps, warmup=0)
    jax.profiler.stop_trace()
    totals = event_totals(trace_dir)
  result = summarize(Hlo(session.step.as_text()), totals, args.steps, sorted(times)[len(times) // 2], args.top)
  name = os.path.splitext(os.path.basename(config_path))[0]
  device = jax.devices()[0]
  result = {
    "benchmark": "profile_ops",
    "date": datetime.date.today().isoformat(),
    "config": name,
    "overrides": [o for o in overrides if not o.startswith("--config=")],
    "device": device.device_kind,
    "platform": device.platform,
    "host": provenance.host_description(),
    "jax": jax.__version__,
    "flops_per_step_model": session.flops_per_step,
    "traced_steps": args.steps,
    **result,
  }
  os.makedirs(args.results_dir, exist_ok=True)
  path = os.path.join(args.results_dir, f"profile_{device.platform}_{name}.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  print(
    f"{name} on {device.device_kind}: step {result['step_time_ms']:.0f} ms; op time per step by kind "
    "(ops run side by side, so this may exceed the step):"
  )
  for kind, ms in result["kinds_ms_per_step"].items():
    print(f"  {kind:20} {ms:8.1f} ms  {100 * ms / result['op_ms_per_step']:5.1f}%")
  print(
    f"matmuls: {result['matmul_gflop_per_step']:.1f} GFLOP per step (model count "
    f"{session.flops_per_step / 1e9:.1f}), {result['matmul_gflops_while_running']:.1f} GFLOP/s while running"
  )
  print(f"{'ms/step':>8} {'ops':>4} {'GFLOP':>7} {'GFLOP/s':>8}  source, output shape")
  for m in result["matmuls"]:
    print(
      f"{m['ms_per_step']:8.1f} {m['ops_per_step']:4d} {m['gflop_per_step']:7.2f} "
      f"{m['gflops_while_running']:8.1f}  {m['source']} {m['shape']}"
    )
  print(f"{'ms/step':>8} {'ops':>4}  other ops: kind, source, output shape")
  for o in result["other_ops"]:
    print(f"{o['ms_per_step']:8.1f} {o['ops_per_step']:4d}  {o['kind']}, {o['source']} {o['shape']}")
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
