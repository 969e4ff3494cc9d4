"""`maxlm COMMAND [flags]`. Config problems print one line and exit 2; bugs keep their traceback."""

from __future__ import annotations

import logging
import os
import sys

from absl import flags

from maxlm import config
from maxlm.config import ConfigError

USAGE = """usage: maxlm train --config=FILE --workdir=DIR [--config.KEY=VALUE ...]

  train   train a model; writes DIR/config.json, DIR/metrics.jsonl, DIR/tb/ and DIR/checkpoints/.
          Rerunning on a DIR with checkpoints resumes; SIGTERM/SIGINT stop after a checkpoint.
          e.g. maxlm train --config=configs/tiny.py --workdir=/tmp/run --config.train.steps=50
"""


def _train(args: list[str]) -> None:
  flag_values = flags.FlagValues()
  workdir = flags.DEFINE_string("workdir", None, "Directory for the run's outputs.", flag_values=flag_values)
  cfg = config.load(args, flag_values)
  if not workdir.value:
    raise ConfigError("missing --workdir: pass a directory for the run's outputs, e.g. --workdir=/tmp/run")
  has_run = os.path.exists(os.path.join(workdir.value, "metrics.jsonl"))
  if has_run and not os.path.isdir(os.path.join(workdir.value, "checkpoints")):
    raise ConfigError(f"--workdir={workdir.value} holds a run without checkpoints to resume from: pass a new "
                      "directory, or delete that one")
  import jax  # Imported here: configuration errors above are reported without loading JAX.

  cfg = config.validate(cfg, num_devices=jax.device_count(), process_count=jax.process_count(),
                        platform=jax.devices()[0].platform)
  from maxlm import guard, train

  try:
    train.run(cfg, workdir.value)
  except guard.Diverged as e:
    raise RunFailed(str(e)) from None


class RunFailed(RuntimeError):
  """The run cannot go on (e.g. the stability guard ran out of rollbacks); the message is the report."""


COMMANDS = {"train": _train}


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(USAGE)
    return 0 if argv else 2
  command, args = argv[0], argv[1:]
  if command not in COMMANDS:
    print(f"maxlm: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
    return 2
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  logging.getLogger("maxlm").setLevel(logging.INFO)
  try:
    COMMANDS[command](args)
  except ConfigError as e:
    print(f"maxlm {command}: config error: {e}", file=sys.stderr)
    return 2
  except RunFailed as e:
    print(f"maxlm {command}: stopped: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
