"""Timing the production train step (`maxlm.training.loop.setup`) one blocked step at a time, for the benchmarks."""

from __future__ import annotations

import statistics
import time

import jax

from maxlm.training import loop
from maxlm.training import step as step_lib


def timed_step(session: loop.Session, state: step_lib.TrainState) -> tuple[step_lib.TrainState, float]:
  """Runs one plain step on the next batch; returns the new state and the step's seconds (data load excluded)."""
  batch = session.next_batch()
  jax.block_until_ready(batch)
  t0 = time.perf_counter()
  state, metrics = session.step(state, batch, step_lib.controls())
  jax.block_until_ready((state, metrics))
  return state, time.perf_counter() - t0


def step_times(session: loop.Session, state: step_lib.TrainState, steps: int, warmup: int = 3):
  """(state, seconds of each step after `warmup` steps of allocation and cache warm-up)."""
  times = []
  for i in range(warmup + steps):
    state, dt = timed_step(session, state)
    if i >= warmup:
      times.append(dt)
  return state, times


def median_seconds(fn, operands, repeats: int) -> float:
  """Median seconds of fn(*operands) over `repeats` calls after one untimed call; JAX results are waited for."""
  jax.block_until_ready(fn(*operands))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*operands))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)
