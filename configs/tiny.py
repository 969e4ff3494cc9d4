"""CPU smoke run: a 2-layer model on the synthetic task, about a minute on a laptop core."""

from configs import base


def get_config():
  return base.get_config()  # The schema defaults are the tiny model.
