"""Every test process sees 8 fake CPU devices; single-device runs pass `devices=jax.devices()[:1]`."""

import os
import tempfile

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for this session's processes (the `maxlm` subprocesses of the tests compile the same tiny
# programs again and again), every program cached however fast it compiled; a fresh one per session.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="maxlm-test-xla-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

from gcs_emulator import STATIC_ENV  # noqa: E402

for _key, _value in STATIC_ENV.items():  # before anything imports fsspec or gcsfs
  os.environ.setdefault(_key, _value)

import jax  # noqa: E402  (after XLA_FLAGS)
import ml_collections  # noqa: E402
import pytest  # noqa: E402

from configs import base  # noqa: E402
from maxlm import config  # noqa: E402


def make_config(num_devices: int = 1, num_slices: int = 1, **overrides):
  """The tiny base config with dotted-key overrides ("model.num_layers": 3), validated for `num_devices` in
  `num_slices` slices (processes off TPU)."""
  raw = base.get_config().to_dict()
  for key, value in overrides.items():
    *groups, name = key.split(".")
    node = raw
    for group in groups:
      node = node[group]
    node[name] = value
  cfg = ml_collections.ConfigDict(raw)  # Built from a dict: type errors reach validate(), as from a config file.
  return config.validate(cfg, num_devices=num_devices, num_slices=num_slices)


def cli_env(num_devices: int = 1) -> dict[str, str]:
  """Environment for a `maxlm` subprocess with this many fake CPU devices (this process has 8).

  libtpu lets one process per host hold it; a test that compiles for a TPU topology in this process (test_kernels)
  holds it until pytest exits, so subprocesses that compile for one too may load it alongside.
  """
  return {
    **os.environ,
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={num_devices}",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
  }


@pytest.fixture
def devices():
  assert jax.device_count() == 8, "tests expect 8 fake CPU devices (XLA_FLAGS set in conftest.py)"
  return jax.devices()


@pytest.fixture(scope="session")
def gcs():
  """A GCS emulator on 127.0.0.1 for the session (tests/gcs_emulator.py); its bucket is `gcs_emulator.BUCKET`."""
  from gcs_emulator import Emulator

  emulator = Emulator()
  yield emulator
  emulator.stop()
