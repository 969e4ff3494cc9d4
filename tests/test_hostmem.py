"""maxlm.training.hostmem: with glibc malloc kept to one arena that keeps freed memory, XLA:CPU reuses the pages of
earlier steps instead of faulting fresh ones in every step (counted in subprocesses)."""

import os
import platform
import statistics
import subprocess
import sys

import pytest

from maxlm.parallel import distributed
from maxlm.training import hostmem

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Page faults of each train step of a model whose step allocates ~110 MB of temporaries (f32 logits [8, 256, 4096]).
FAULTS = """
import resource, sys
from maxlm.training import hostmem
kept = hostmem.keep_freed_memory() if sys.argv[1] == "keep" else False
import jax
from maxlm import config
from maxlm.training import loop, step as step_lib
cfg = config.load(["--config=configs/base.py", "--config.model.vocab_size=4096", "--config.data.seq_len=256",
                   "--config.train.global_batch=8", "--config.checkpoint.every_steps=0",
                   "--config.metrics.peak_tflops=1"])
session = loop.setup(config.validate(cfg, num_devices=1, platform="cpu"), jax.devices()[:1])
state, faults = session.program.init(), []
for _ in range(9):
  batch = session.next_batch()
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  state, metrics = session.step(state, batch, step_lib.controls())
  jax.block_until_ready((state, metrics))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, *faults)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_train_steps_reuse_kept_memory():
  env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="")
  procs = {
    mode: subprocess.Popen([sys.executable, "-c", FAULTS, mode], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
    for mode in ("keep", "default")
  }
  results = {mode: proc.communicate()[0].split() for mode, proc in procs.items()}
  assert all(proc.returncode == 0 for proc in procs.values())
  kept, *faults_kept = results["keep"]
  assert kept == "True"
  # A step's own buffers (~110 MB, 27K pages) are reused; the few faults left come from the host side (batches),
  # and a step that starts before the last one's buffers are freed (a loaded machine) grows the heap once.
  typical_kept = statistics.median(map(int, faults_kept[3:]))
  assert typical_kept < 1000, f"page faults per step with memory kept: {faults_kept}"
  kept, *faults_default = results["default"]
  assert kept == "False"
  # ~27K 4 KiB pages a step here; fewer where transparent huge pages back fresh mappings (THP "always").
  assert statistics.median(map(int, faults_default[3:])) > 10 * max(typical_kept, 1), (
    f"default malloc {faults_default} vs kept {faults_kept} page faults per step"
  )


def test_malloc_left_alone_when_the_user_set_it_or_an_accelerator_may_run():
  assert not hostmem.keep_freed_memory({"JAX_PLATFORMS": "cpu", "MALLOC_ARENA_MAX": "4"})
  assert not hostmem.keep_freed_memory({"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
  assert not hostmem.keep_freed_memory({"JAX_PLATFORMS": "cuda"})


def test_accelerator_possible_reads_jax_platforms():
  assert not distributed.accelerator_possible({"JAX_PLATFORMS": "cpu"})
  assert distributed.accelerator_possible({"JAX_PLATFORMS": "cuda,cpu"})
  assert distributed.accelerator_possible({"JAX_PLATFORMS": "tpu"})
