"""Scaling-law fits of a ladder's runs (Hoffmann et al. 2022, "Chinchilla").

Approach 3: L(N, D) = E + A / N^α + B / D^β, fitted by minimising the Huber loss (δ = 1e-3) of
log L̂ − log L with L̂ = LSE(a − α log N, b − β log D, e) (A = e^a, B = e^b, E = e^e), by L-BFGS-B (analytic
gradient) from a grid of starting points: a short descent from the 48 with the lowest objective, the best 8 of
those to convergence, the best kept. Confidence intervals: the fit repeated on bootstrap resamples of the runs
(from the best fit's parameters), 2.5th to 97.5th percentiles.

Compute-optimal size for C = 6·N·D FLOPs (approach 3): N_opt = G·(C/6)^(β/(α+β)), D_opt = (C/6)^(α/(α+β)) / G with
G = (α·A / (β·B))^(1/(α+β)).

Approach 2: for each IsoFLOP budget (runs tagged with the same `flops_budget`), a parabola of L against log N; its
minimum is N_opt(C), and D_opt = C / (6·N_opt); log N_opt and log D_opt are then fitted as lines in log C.

N is the number of weights in matmuls (maxlm/model/flops.py `matmul_params`), D the tokens trained on, L the final
eval loss (nats per token).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
from scipy import optimize, special

HUBER_DELTA = 1e-3
DESCENDED, REFINED = 48, 8  # grid starts with a short descent (the lowest objective first); of those, to convergence
GRID = {  # starting points of L-BFGS-B (Chinchilla's grid, coarser)
  "a": (0.0, 5.0, 10.0, 15.0, 20.0),
  "b": (0.0, 5.0, 10.0, 15.0, 20.0),
  "e": (-1.0, 0.0, 1.0),
  "alpha": (0.2, 0.5, 1.0),
  "beta": (0.2, 0.5, 1.0),
}


@dataclasses.dataclass(frozen=True)
class Law:
  E: float
  A: float
  B: float
  alpha: float
  beta: float

  def loss(self, N, D):
    return self.E + self.A / np.asarray(N, float) ** self.alpha + self.B / np.asarray(D, float) ** self.beta

  def optimal(self, C: float) -> tuple[float, float]:
    """(N_opt, D_opt) minimising the loss at C = 6·N·D FLOPs."""
    a, b = self.alpha, self.beta
    G = (a * self.A / (b * self.B)) ** (1.0 / (a + b))
    return G * (C / 6.0) ** (b / (a + b)), (C / 6.0) ** (a / (a + b)) / G

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def _objective(theta, log_N, log_D, log_L):
  """The Huber loss of the log residuals and its gradient in (a, b, e, alpha, beta)."""
  a, b, e, alpha, beta = theta
  terms = np.stack([a - alpha * log_N, b - beta * log_D, np.full_like(log_N, e)])
  predicted = special.logsumexp(terms, axis=0)
  weights = np.exp(terms - predicted)  # d predicted / d term
  r = predicted - log_L
  small = np.abs(r) <= HUBER_DELTA
  value = np.where(small, 0.5 * r**2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA)).sum()
  slope = np.where(small, r, HUBER_DELTA * np.sign(r))
  grad = np.array(
    [
      (slope * weights[0]).sum(),
      (slope * weights[1]).sum(),
      (slope * weights[2]).sum(),
      -(slope * weights[0] * log_N).sum(),
      -(slope * weights[1] * log_D).sum(),
    ]
  )
  return value / HUBER_DELTA, grad / HUBER_DELTA  # Scaled: residuals of ~1e-3 must not look converged at once.


def _law(theta) -> Law:
  a, b, e, alpha, beta = theta
  return Law(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)


def _minimize(start, log_N, log_D, log_L, rough: bool = False):
  bounds = [(-10, 40), (-10, 40), (-5, 5), (0.0, 3.0), (0.0, 3.0)]
  options = {"maxiter": 60} if rough else {"ftol": 1e-15, "gtol": 1e-10, "maxiter": 2000}
  return optimize.minimize(
    _objective, start, args=(log_N, log_D, log_L), jac=True, method="L-BFGS-B", bounds=bounds, options=options
  )


def fit_law(N, D, L) -> tuple[Law, float]:
  """(the approach-3 law, its objective) for runs of N parameters trained on D tokens to final loss L."""
  log_N, log_D, log_L = np.log(np.asarray(N, float)), np.log(np.asarray(D, float)), np.log(np.asarray(L, float))
  if len(log_L) < 5:
    raise ValueError(f"a fit of 5 parameters needs at least 5 runs, got {len(log_L)}")
  # The objective at every grid point, a short descent from the best ones, the best of those to convergence.
  starts = sorted(itertools.product(*GRID.values()), key=lambda s: _objective(np.array(s), log_N, log_D, log_L)[0])
  rough = [_minimize(np.array(s), log_N, log_D, log_L, rough=True) for s in starts[:DESCENDED]]
  rough.sort(key=lambda r: r.fun)
  best = min((_minimize(r.x, log_N, log_D, log_L) for r in rough[:REFINED]), key=lambda r: r.fun)
  return _law(best.x), float(best.fun)


def bootstrap(N, D, L, law: Law, samples: int = 200, seed: int = 0) -> list[Law]:
  """The law refitted on `samples` resamples (with replacement) of the runs, each started from `law`."""
  N, D, L = (np.asarray(x, float) for x in (N, D, L))
  rng = np.random.default_rng(seed)
  start = np.array([math.log(law.A), math.log(law.B), math.log(law.E), law.alpha, law.beta])
  out = []
  for _ in range(samples):
    i = rng.integers(0, len(L), len(L))
    out.append(_law(_minimize(start, np.log(N[i]), np.log(D[i]), np.log(L[i])).x))
  return out


def interval(values, level: float = 0.95) -> list[float]:
  lo = (1 - level) / 2 * 100
  return [float(np.percentile(values, lo)), float(np.percentile(values, 100 - lo))]


def isoflop(budgets: dict[float, list[tuple[float, float, float]]]) -> dict:
  """Approach 2 from {C: [(N, D, L), ...]}: per budget the parabola's optimum, then power laws N_opt(C), D_opt(C)."""
  optima = []
  for C, runs in sorted(budgets.items()):
    if len(runs) < 3:
      continue
    x, y = np.log([r[0] for r in runs]), np.array([r[2] for r in runs])
    c2, c1, c0 = np.polyfit(x, y, 2)
    if c2 <= 0:
      continue  # No minimum inside: the budget's sizes do not bracket its optimum.
    x_opt = -c1 / (2 * c2)
    optima.append(
      {
        "C": C,
        "N_opt": float(np.exp(x_opt)),
        "D_opt": float(C / (6 * np.exp(x_opt))),
        "L_opt": float(c0 + c1 * x_opt + c2 * x_opt**2),
        "parabola": [float(c2), float(c1), float(c0)],
      }
    )
  result = {"budgets": optima}
  if len(optima) >= 2:
    log_C = np.log([o["C"] for o in optima])
    n_slope, n_intercept = np.polyfit(log_C, np.log([o["N_opt"] for o in optima]), 1)
    d_slope, d_intercept = np.polyfit(log_C, np.log([o["D_opt"] for o in optima]), 1)
    result.update(
      N_opt_exponent=float(n_slope),
      N_opt_coefficient=float(np.exp(n_intercept)),
      D_opt_exponent=float(d_slope),
      D_opt_coefficient=float(np.exp(d_intercept)),
    )
  return result
