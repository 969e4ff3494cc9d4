"""How much an asynchronous checkpoint save stalls training, and how long saves and restores take.

For a config (default: the ~10M CPU model), measured in one process:
  step time       median of steps with no save,
  save call       the blocking part of a save (device-to-host copy, metadata): the time added to the step
                  that triggers the save; target <= 5% of a step,
  contention      extra time of the steps that overlap the background write (their time minus the median
                  step time): on a small CPU host the writer competes with training for cores,
  write           a save with no training beside it, from the call until the checkpoint is complete,
  restore         restoring the newest checkpoint (state + data iterator) into the same shardings.
The first save is reported apart (it sets up the writer).
Writes benchmarks/results/checkpoint_stall_<platform>.json.

  python benchmarks/checkpoint_stall.py [--config cpu_10m] [--saves 5]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import tempfile
import time

import jax

from maxlm import config
from maxlm.model import flops
from maxlm.training import hostmem, loop
from maxlm.training.checkpoint import Checkpointer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import timed_step  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="cpu_10m")
  parser.add_argument("--saves", type=int, default=5)
  parser.add_argument("--steps_between", type=int, default=3)
  args = parser.parse_args()
  hostmem.keep_freed_memory()  # As the `maxlm` command does.
  cfg = config.validate(
    config.load([f"--config={REPO}/configs/{args.config}.py", "--config.metrics.peak_tflops=1"]),
    num_devices=jax.device_count(),
    platform=jax.devices()[0].platform,
  )
  session = loop.setup(cfg)
  state = session.program.init()
  step = functools.partial(timed_step, session)

  with tempfile.TemporaryDirectory() as workdir:
    ckpt = Checkpointer(workdir, cfg)
    plain, calls, contention = [], [], []
    for _ in range(3):
      state, _ = step(state)  # warm-up
    for _ in range(args.saves + 1):
      for _ in range(args.steps_between):
        state, dt = step(state)
        plain.append(dt)
      t0 = time.perf_counter()
      ckpt.save(int(state.step), state, session.data_iterator)
      calls.append(time.perf_counter() - t0)
      after = []
      for _ in range(args.steps_between):  # Steps that overlap the background write.
        state, dt = step(state)
        after.append(dt)
      ckpt.wait()
      contention.append(sum(after) - len(after) * statistics.median(plain))
    writes = []
    for _ in range(3):
      state, _ = step(state)
      t0 = time.perf_counter()
      ckpt.save(int(state.step), state, session.data_iterator, wait=True)
      writes.append(time.perf_counter() - t0)
    step_time = statistics.median(plain)
    t0 = time.perf_counter()
    restored = ckpt.restore_latest(session.program.abstract_state, session.data_iterator, cfg.model)
    jax.block_until_ready(restored[0])
    restore_s = time.perf_counter() - t0
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ckpt.directory) for f in fs)
    ckpt.close()

  device = jax.devices()[0]
  save_call = statistics.median(calls[1:])
  result = {
    "benchmark": "checkpoint_stall",
    "date": datetime.date.today().isoformat(),
    "device": device.device_kind,
    "platform": device.platform,
    "devices": jax.device_count(),
    "host_cores": os.cpu_count(),
    "jax": jax.__version__,
    "config": args.config,
    "params_m": flops.param_count(cfg.model) / 1e6,
    "step_time_s": step_time,
    "first_save_call_s": calls[0],
    "save_call_s_median": save_call,
    "save_call_s_all": calls[1:],
    "save_call_pct_of_step": 100 * save_call / step_time,
    "contention_s_median": statistics.median(contention[1:]),
    "contention_s_all": contention[1:],
    "contention_pct_of_step": 100 * statistics.median(contention[1:]) / step_time,
    "write_s_median": statistics.median(writes),
    "restore_s": restore_s,
    "checkpoint_dir_mb": size / 2**20,
  }
  os.makedirs(f"{REPO}/benchmarks/results", exist_ok=True)
  path = f"{REPO}/benchmarks/results/checkpoint_stall_{device.platform}.json"
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
