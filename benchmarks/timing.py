"""Timing the production train step (`train.setup`) one blocked step at a time, for the benchmarks."""

from __future__ import annotations

import time

import jax

from maxlm import train


def timed_step(session: train.Session, state: train.TrainState) -> tuple[train.TrainState, float]:
  """Runs one plain step on the next batch; returns the new state and the step's seconds (data load excluded)."""
  batch = session.next_batch()
  jax.block_until_ready(batch)
  t0 = time.perf_counter()
  state, metrics = session.step(state, batch, train.controls())
  jax.block_until_ready((state, metrics))
  return state, time.perf_counter() - t0


def step_times(session: train.Session, state: train.TrainState, steps: int, warmup: int = 3):
  """(state, seconds of each step after `warmup` steps of allocation and cache warm-up)."""
  times = []
  for i in range(warmup + steps):
    state, dt = timed_step(session, state)
    if i >= warmup:
      times.append(dt)
  return state, times
