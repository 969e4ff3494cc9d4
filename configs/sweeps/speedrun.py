"""Time to the speedrun's target loss (configs/speedrun.py) over 3 seeds, for the baseline and each variant.

  maxlm sweep --sweep=configs/sweeps/speedrun.py --workdir=/tmp/speedrun

results.md then has, per variant, the mean ± spread of time_to_target_s over the seeds. To race a change against
the baseline, add it to VARIANTS (e.g. {"model.qk_norm": True}) and rerun with a new --workdir, or give it to every
run with --config.model.qk_norm=true in a second sweep directory and `maxlm compare` the two.
"""

from configs import speedrun
from maxlm.research import hyper

METRIC = "time_to_target_s"
VARIANTS = [{}]  # The baseline; add override dicts to race changes against it.
SEEDS = [0, 1, 2]


def get_config():
  return speedrun.get_config()


def get_sweep():
  return hyper.product(VARIANTS, hyper.sweep("train.seed", SEEDS))
