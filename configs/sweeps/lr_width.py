"""Learning rate x width on the demo corpus (the Python standard library, prepared on first use): 4 runs of the
demo model at 100 steps, a few minutes on 2 CPU cores.

  maxlm sweep --sweep=configs/sweeps/lr_width.py --workdir=/tmp/lr_width [--parallel=2]
  maxlm compare /tmp/lr_width --plot=/tmp/lr_width.png
"""

from configs import demo
from maxlm.data import stdlib_corpus
from maxlm.research import hyper

METRIC = "final_eval_loss"


def get_config():
  c = demo.get_config()
  c.data.path = stdlib_corpus.prepared()[0]
  c.train.update(steps=100, eval_every=20, log_every=10)
  c.checkpoint.every_steps = 50
  return c


def get_sweep():
  return hyper.product(hyper.sweep("optim.lr", [3e-3, 1e-2]), hyper.sweep("model.d_model", [96, 192]))
