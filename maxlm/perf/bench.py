"""`maxlm bench`: the production train step (`maxlm.training.loop.setup`) timed on this machine.

Reports, for one resolved config: compile time; the median step time over `steps` timed steps after
`warmup` (each step blocked on, so a step's time is its own) and the mean step time of the same number
of steps dispatched back to back (what a training loop sees); tokens/s per device; model TFLOP/s per
device from `maxlm/model/flops.py` (`6·N_matmul + 6·L·H·Dh·T` per token, remat not counted); MFU against the
device peak (datasheet bf16 for accelerators, a measured matmul on CPU: see `flops.peak_tflops_per_device`);
and memory: the device allocator's peak where the backend reports one (GPU, TPU), else the compiled
step's own figure (arguments + outputs + temporaries - aliased), plus the host's peak RSS.

Writes `<results_dir>/bench_<device>_<config>.json` and appends a row to `<results_dir>/mfu.md`.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import resource
import statistics
import sys
import time

import jax
import ml_collections

from maxlm import provenance
from maxlm.model import flops
from maxlm.training import loop
from maxlm.training import step as step_lib

TABLE_HEADER = (
  "| date | device | jax | config | params | tokens/step | step ms (median) | step ms (pipelined) | "
  "tokens/s/device | TFLOP/s/device | MFU | peak memory GiB | peak source |\n"
  "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n"
)


class Runner:
  """The production train step on batches loaded up front (the step is timed, not data): `blocked` times steps one
  at a time, `pipelined` dispatches them back to back; `record` is the result `measure` reports."""

  def __init__(self, cfg: ml_collections.ConfigDict, devices=None, batches: int = 8):
    self.cfg = cfg
    self.session = loop.setup(cfg, devices)
    self.state, self.controls = self.session.program.init(), step_lib.controls()
    self.batches = [self.session.next_batch() for _ in range(batches)]
    jax.block_until_ready(self.batches)
    self.metrics, self.steps_run = None, 0

  def _step(self):
    batch = self.batches[self.steps_run % len(self.batches)]
    self.state, self.metrics = self.session.step(self.state, batch, self.controls)
    self.steps_run += 1

  def blocked(self, n: int) -> list[float]:
    """Seconds of each of `n` steps, each blocked on before the next starts."""
    times = []
    for _ in range(n):
      t0 = time.perf_counter()
      self._step()
      jax.block_until_ready((self.state, self.metrics))
      times.append(time.perf_counter() - t0)
    return times

  def pipelined(self, n: int) -> float:
    """Mean seconds per step of `n` steps dispatched back to back."""
    t0 = time.perf_counter()
    for _ in range(n):
      self._step()
    jax.block_until_ready((self.state, self.metrics))
    return (time.perf_counter() - t0) / n

  def record(self, blocked: list[float], pipelined: float, *, name: str, warmup: int) -> dict:
    session, cfg = self.session, self.cfg
    n_dev = session.mesh.size
    step_time = statistics.median(blocked)
    tflops = session.flops_per_step / step_time / n_dev / 1e12
    device = session.mesh.devices.flat[0]
    peak_bytes, peak_source = _peak_memory(device, session.step)
    return {
      "benchmark": "bench",
      "date": datetime.date.today().isoformat(),
      "config": name,
      "device": device.device_kind,
      "platform": device.platform,
      "devices": n_dev,
      "mesh": {k: int(v) for k, v in session.mesh.shape.items()},
      "host": provenance.host_description(),
      "jax": jax.__version__,
      "python": sys.version.split()[0],
      "params_m": flops.param_count(cfg.model) / 1e6,
      "tokens_per_step": session.tokens_per_step,
      "flops_per_token": session.flops_per_step / session.tokens_per_step,
      "compute_dtype": cfg.model.compute_dtype,
      "attention": cfg.model.attention,
      "remat": cfg.model.remat,
      "scan_layers": cfg.model.scan_layers,
      "loss_chunk": cfg.train.loss_chunk,
      "compile_s": session.compile_s,
      "warmup_steps": warmup,
      "timed_steps": len(blocked),
      "step_time_s_median": step_time,
      "step_time_s_spread": [min(blocked), max(blocked)],
      "step_time_s_pipelined": pipelined,
      "tokens_per_sec_per_device": session.tokens_per_step / step_time / n_dev,
      "tflops_per_device": tflops,
      "peak_tflops_per_device": session.peak_tflops,
      "mfu": tflops / session.peak_tflops,
      "mfu_pipelined": session.flops_per_step / pipelined / n_dev / 1e12 / session.peak_tflops,
      "peak_memory_bytes": peak_bytes,
      "peak_memory_source": peak_source,
      "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "final_loss": float(self.metrics["loss"]),
    }


def measure(cfg: ml_collections.ConfigDict, *, steps: int, warmup: int, name: str, devices=None) -> dict:
  """Times `steps` train steps after `warmup` steps; returns the result record (see the module doc)."""
  runner = Runner(cfg, devices, batches=min(steps, 8))
  runner.blocked(warmup)
  blocked = runner.blocked(steps)
  return runner.record(blocked, runner.pipelined(steps), name=name, warmup=warmup)


def _peak_memory(device: jax.Device, compiled) -> tuple[int, str]:
  stats = device.memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "allocator peak"
  m = compiled.memory_analysis()
  total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  return int(total), "compiled step (args + outputs + temps - aliased)"


def device_slug(device_kind: str) -> str:
  """'NVIDIA H100 80GB HBM3' -> 'nvidia_h100_80gb_hbm3', for result file names."""
  return re.sub(r"[^A-Za-z0-9]+", "_", device_kind).strip("_").lower()


def write(result: dict, results_dir: str) -> str:
  """Writes the JSON record and appends its row to `mfu.md`; returns the JSON path."""
  os.makedirs(results_dir, exist_ok=True)
  path = os.path.join(results_dir, f"bench_{device_slug(result['device'])}_{result['config']}.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  r = result
  append_table_rows(
    os.path.join(results_dir, "mfu.md"),
    "# `maxlm bench` results\n\nOne row per run, appended by `maxlm bench` (see maxlm/perf/bench.py for what "
    "each column means).\n\n" + TABLE_HEADER,
    [
      f"| {r['date']} | {r['devices']}× {r['device']} | {r['jax']} | {r['config']} | {r['params_m']:.1f}M | "
      f"{r['tokens_per_step']} | {1e3 * r['step_time_s_median']:.1f} | {1e3 * r['step_time_s_pipelined']:.1f} | "
      f"{r['tokens_per_sec_per_device']:,.0f} | {r['tflops_per_device']:.3g} | {100 * r['mfu']:.1f}% | "
      f"{r['peak_memory_bytes'] / 2**30:.2f} | {r['peak_memory_source']} |"
    ],
  )
  return path


def append_table_rows(path: str, heading: str, rows: list[str]) -> None:
  """Appends markdown table rows to `path`, writing `heading` (title, text, table header) first if it is new."""
  new = not os.path.exists(path)
  with open(path, "a") as f:
    f.write((heading if new else "") + "".join(row + "\n" for row in rows))


def summary(r: dict) -> str:
  return (
    f"{r['config']} on {r['devices']}x {r['device']}: step {1e3 * r['step_time_s_median']:.1f} ms median "
    f"({1e3 * r['step_time_s_pipelined']:.1f} ms pipelined), {r['tokens_per_sec_per_device']:,.0f} tokens/s/device, "
    f"{r['tflops_per_device']:.3g} TFLOP/s/device, MFU {100 * r['mfu']:.1f}% of {r['peak_tflops_per_device']:.4g}, "
    f"peak memory {r['peak_memory_bytes'] / 2**30:.2f} GiB ({r['peak_memory_source']})"
  )
