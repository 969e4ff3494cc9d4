"""Does the best learning rate transfer across width? The demo model (4 layers) at widths 32, 64 and 128 (4x; head
dim 16), under the standard parametrization and under muP (base width 32), over learning rates a factor 2 apart,
200 steps each on the demo corpus: 48 short runs.

  maxlm sweep --sweep=configs/sweeps/mup_transfer.py --workdir=/tmp/mup_transfer --parallel=2
  python tools/lr_transfer.py /tmp/mup_transfer --plot=/tmp/mup_transfer.png     # best LR per width, loss vs LR
"""

from configs import demo
from maxlm.data import stdlib_corpus
from maxlm.research import hyper

METRIC = "final_eval_loss"
WIDTHS = [32, 64, 128]
LRS = [1e-3 * 2**k for k in range(8)]  # 1e-3 ... 0.128


def get_config():
  c = demo.get_config()
  c.data.update(path=stdlib_corpus.prepared()[0], seq_len=128)
  c.model.update(mup_base_width=WIDTHS[0], num_layers=4)
  c.train.update(steps=200, global_batch=8, eval_every=200, eval_batches=16, log_every=50)
  c.optim.update(warmup_steps=20)
  c.checkpoint.every_steps = 0
  return c


def get_sweep():
  widths = [
    {"model.d_model": w, "model.num_heads": w // 16, "model.num_kv_heads": w // 16, "model.mlp_dim": 4 * w}
    for w in WIDTHS
  ]
  return hyper.product(hyper.sweep("model.parametrization", ["sp", "mup"]), widths, hyper.sweep("optim.lr", LRS))
