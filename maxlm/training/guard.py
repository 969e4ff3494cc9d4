"""Stability guard: the host-side half of loss-spike and non-finite detection.

The train step itself rejects a bad update (it keeps the old state) when the loss or gradient norm is
not finite or the loss exceeds `max_loss`, so no state that went through a bad step is ever saved. This
class supplies `max_loss` from the recent accepted losses and turns rejected steps into events:

  spike threshold = mean + spike_z · max(std, 0.01·mean) over the last `window` accepted losses

(the std floor keeps a flat plateau's tiny noise from counting as a spike). Detection starts once the
window is full. Policies: `skip` drops the update and goes on; `rollback` also restores the newest
checkpoint, leaves the data that led to the spike behind, and scales the learning rate by
`rollback_lr_scale` for `rollback_lr_steps` steps, at most `max_rollbacks` times.
"""

from __future__ import annotations

import collections
import math

import ml_collections

from maxlm.errors import RunFailed


class Diverged(RunFailed):
  """The run keeps failing the guard after the allowed rollbacks; the message is the report."""


class Guard:
  def __init__(self, cfg: ml_collections.ConfigDict):
    self.cfg = cfg
    self.losses = collections.deque(maxlen=cfg.window)
    self.rollbacks = 0
    self.lowered_lr_until = 0

  @property
  def enabled(self) -> bool:
    return self.cfg.policy != "none"

  def max_loss(self) -> float:
    if not self.enabled or self.cfg.spike_z <= 0 or len(self.losses) < self.cfg.window:
      return math.inf
    mean = sum(self.losses) / len(self.losses)
    std = math.sqrt(sum((x - mean) ** 2 for x in self.losses) / len(self.losses))
    return mean + self.cfg.spike_z * max(std, 0.01 * abs(mean))

  def lr_scale(self, step: int) -> float:
    return self.cfg.rollback_lr_scale if step <= self.lowered_lr_until else 1.0

  def observe(self, step: int, loss: float, applied: bool, max_loss: float) -> list[dict]:
    """Records an accepted loss, or returns the events of a rejected step (the detection, and `skip`)."""
    if applied:
      self.losses.append(loss)
      return []
    cause = "spike" if math.isfinite(loss) else "nan"
    detected = {"step": step, "event": cause, "loss": loss if math.isfinite(loss) else None}
    if cause == "spike":
      detected["threshold"] = max_loss
    return [detected] + ([{"step": step, "event": "skip"}] if self.cfg.policy == "skip" else [])

  def state(self) -> dict:
    """What a checkpoint must hold for a resumed run to guard exactly like the uninterrupted one."""
    return {"losses": list(self.losses), "rollbacks": self.rollbacks, "lowered_lr_until": self.lowered_lr_until}

  def load(self, state: dict | None) -> None:
    if state:
      self.losses.extend(state["losses"])
      self.rollbacks, self.lowered_lr_until = state["rollbacks"], state["lowered_lr_until"]

  def start_rollback(self, bad_step: int, to_step: int, step: int) -> None:
    """Counts a rollback from `bad_step` to the checkpoint at `to_step`, made while `step` is current."""
    self.rollbacks += 1
    if self.rollbacks > self.cfg.max_rollbacks:
      raise Diverged(
        f"step {bad_step} failed the stability guard after {self.cfg.max_rollbacks} rollbacks "
        f"(train.guard.max_rollbacks); the newest good checkpoint is step {to_step}: lower optim.lr "
        "or inspect the data around this step, then rerun to resume"
      )
    self.lowered_lr_until = step + self.cfg.rollback_lr_steps
