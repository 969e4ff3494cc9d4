"""Building a sweep's runs in plain Python: each run is a dict of config overrides, `{"optim.lr": 3e-3, ...}`.

  sweep("optim.lr", [1e-3, 3e-3])                 -> [{"optim.lr": 1e-3}, {"optim.lr": 3e-3}]
  product(sweep(...), sweep(...))                 every combination (the first list varies slowest)
  zipped(sweep(...), sweep(...))                  element by element (equal lengths)
  chain(a, b)                                     a's runs, then b's
  fixed(**{"train.steps": 500})                   one run (combine with product to add keys to every run)
  random_search(8, seed=0, lr=log_uniform("optim.lr", 1e-4, 1e-2), width=choice("model.d_model", [64, 128]))
                                                  8 runs drawn from the spaces, the same for the same seed

The same style as big_vision's and scenic's `get_hyper`, written as functions over lists of dicts.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import numpy as np

Run = dict[str, object]


def sweep(key: str, values: Sequence) -> list[Run]:
  return [{key: v} for v in values]


def fixed(**overrides) -> list[Run]:
  return [dict(overrides)]


def product(*sweeps: list[Run]) -> list[Run]:
  runs = []
  for combination in itertools.product(*sweeps):
    merged: Run = {}
    for part in combination:
      _merge(merged, part)
    runs.append(merged)
  return runs


def zipped(*sweeps: list[Run]) -> list[Run]:
  lengths = {len(s) for s in sweeps}
  if len(lengths) > 1:
    raise ValueError(f"zipped() needs sweeps of one length, got lengths {sorted(lengths)}")
  runs = []
  for parts in zip(*sweeps):
    merged: Run = {}
    for part in parts:
      _merge(merged, part)
    runs.append(merged)
  return runs


def chain(*sweeps: list[Run]) -> list[Run]:
  return [dict(run) for s in sweeps for run in s]


def _merge(into: Run, part: Run) -> None:
  for key, value in part.items():
    if key in into and into[key] != value:
      raise ValueError(f"two parts of one run set {key}: {into[key]!r} and {value!r}")
    into[key] = value


@dataclasses.dataclass(frozen=True)
class Space:
  """A distribution of one config key's value in `random_search`."""

  key: str
  kind: str  # uniform | log_uniform | int_uniform | choice
  low: float = 0.0
  high: float = 0.0
  options: tuple = ()

  def draw(self, rng: np.random.Generator):
    if self.kind == "uniform":
      return float(rng.uniform(self.low, self.high))
    if self.kind == "log_uniform":
      return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
    if self.kind == "int_uniform":
      return int(rng.integers(self.low, self.high + 1))
    return self.options[int(rng.integers(len(self.options)))]


def uniform(key: str, low: float, high: float) -> Space:
  return Space(key, "uniform", low, high)


def log_uniform(key: str, low: float, high: float) -> Space:
  if not 0 < low < high:
    raise ValueError(f"log_uniform({key!r}) needs 0 < low < high, got {low}, {high}")
  return Space(key, "log_uniform", low, high)


def int_uniform(key: str, low: int, high: int) -> Space:
  """An integer in [low, high], both included."""
  return Space(key, "int_uniform", low, high)


def choice(key: str, options: Sequence) -> Space:
  return Space(key, "choice", options=tuple(options))


def random_search(n: int, *, seed: int, **spaces: Space) -> list[Run]:
  """`n` runs, each drawing every space once from one generator seeded with `seed` (keyword order = draw order)."""
  rng = np.random.default_rng(seed)
  return [{space.key: space.draw(rng) for space in spaces.values()} for _ in range(n)]
