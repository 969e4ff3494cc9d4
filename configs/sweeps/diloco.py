"""Data parallelism against DiLoCo and streaming DiLoCo at the same token budget on the demo corpus (CPU).

  XLA_FLAGS=--xla_force_host_platform_device_count=4 maxlm sweep --sweep=configs/sweeps/diloco.py --workdir=/tmp/dl
  maxlm compare /tmp/dl --plot=docs/images/diloco.png

Four fake devices: data parallelism over all four, or four DiLoCo replicas of one device each, every run 600 steps of
16 rows of 256 tokens (2.5M tokens) with the demo's AdamW as the inner optimizer and DiLoCo's outer Nesterov SGD
(lr 0.7, momentum 0.9). results.md has the final eval loss; the runs' logs have the bytes each replica sent.
"""

from configs import demo
from maxlm.data import stdlib_corpus

RUNS = [
  {"train.diloco.replicas": 1},
  {"train.diloco.replicas": 4, "train.diloco.sync_every": 10},
  {"train.diloco.replicas": 4, "train.diloco.sync_every": 50},
  {"train.diloco.replicas": 4, "train.diloco.sync_every": 50, "train.diloco.fragments": 2},
  {"train.diloco.replicas": 4, "train.diloco.sync_every": 50, "train.diloco.comm_dtype": "int8"},
]


def get_config():
  c = demo.get_config()
  c.data.path = stdlib_corpus.prepared()[0]
  c.train.update(steps=600, global_batch=16, eval_every=50, eval_batches=8, log_every=10)
  c.checkpoint.every_steps = 200
  return c


def get_sweep():
  return RUNS
