"""The error a user can fix. Dependency-free, so every module (and the CLI, before JAX loads) can raise it."""


class UserError(ValueError):
  """A problem in what the user gave (a config, a flag, an input file, a dataset, a checkpoint, a directory).

  The message is one line naming what is wrong and how to fix it; `maxlm` prints it without a traceback and
  exits with code 2.
  """
