"""Muon against AdamW on the speedrun (configs/speedrun.py): time and tokens to the target loss over 3 seeds each.

maxlm sweep --sweep=configs/sweeps/speedrun_muon.py --workdir=/tmp/speedrun_muon
"""

from configs.sweeps.speedrun import METRIC, SEEDS, get_config  # noqa: F401
from maxlm.research import hyper

VARIANTS = [{"optim.name": "adamw"}, {"optim.name": "muon"}]


def get_sweep():
  return hyper.product(VARIANTS, hyper.sweep("train.seed", SEEDS))
