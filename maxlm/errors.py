"""What `maxlm` reports in one line instead of a traceback. Dependency-free, so every module (and the CLI, before JAX
loads) can raise these. Anything else that escapes a command is a bug and keeps its traceback."""

import errno

# OSErrors that come from the machine, not from maxlm: reported in one line, never as a traceback.
ENVIRONMENT_ERRNOS = {
  errno.ENOSPC: "no space left on the device",
  errno.EDQUOT: "disk quota exceeded",
  errno.EROFS: "read-only file system",
  errno.EACCES: "permission denied",
  errno.EPERM: "operation not permitted",
  errno.EIO: "input/output error",
  errno.EFBIG: "file too large for the file system",
  errno.EMFILE: "too many open files",
  errno.ENAMETOOLONG: "file name too long",
}
# How those errors read inside the messages of libraries that do not raise OSError (tensorstore, under Orbax).
ENVIRONMENT_MARKERS = (
  "No space left on device",
  "Disk quota exceeded",
  "Read-only file system",
  "Permission denied",
  "Input/output error",
  "os_error_code='28'",
)


class UserError(ValueError):
  """A problem in what the user gave (a config, a flag, an input file, a dataset, a checkpoint, a directory).

  The message is one line naming what is wrong and how to fix it; `maxlm` prints it and exits with code 2.
  """


class RunFailed(RuntimeError):
  """A run cannot go on (the stability guard ran out of rollbacks, a checkpoint cannot be written, the disk is full);
  the message is the report, ending with what to do. `maxlm` prints it and exits with code 1. What was complete
  before (checkpoints, datasets) is kept."""


def environment_problem(error: BaseException) -> str | None:
  """A one-line description of `error` if it comes from the machine (disk full, permissions, I/O), else None."""
  if isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS:
    where = f": {error.filename}" if error.filename else ""
    return f"{ENVIRONMENT_ERRNOS[error.errno]}{where}"
  text = " ".join(str(error).split())
  for marker in ENVIRONMENT_MARKERS:
    if marker in text:
      return text[:300]
  return None


def is_disk_full(error: BaseException) -> bool:
  if isinstance(error, OSError):
    return error.errno in (errno.ENOSPC, errno.EDQUOT)
  return any(m in str(error) for m in ("No space left on device", "Disk quota exceeded", "os_error_code='28'"))
