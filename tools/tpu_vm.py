"""Cloud TPU VM launcher: create a TPU VM (or queued resource), copy this repo, install it, run `maxlm train` on
every worker, follow and fetch the logs, delete. Every step is a `gcloud compute tpus ...` command; `--dry-run`
prints them all (prefixed `+ `) without running any.

  python tools/tpu_vm.py --name=my-tpu --zone=us-central2-b up --accelerator=v4-16 --runtime=tpu-ubuntu2204-base \\
      -- --config=configs/llama_1b.py --workdir=/mnt/shared/llama1b
  python tools/tpu_vm.py --name=my-tpu --zone=us-central2-b logs        # every worker's log, line-prefixed
  python tools/tpu_vm.py --name=my-tpu --zone=us-central2-b fetch --to=runs/ --workdir=/mnt/shared/llama1b
  python tools/tpu_vm.py --name=my-tpu --zone=us-central2-b delete

Commands: create, copy, install, run, up (= create, copy, install, run), logs, fetch, delete. `--queued` uses a
queued resource named `<name>-qr` holding the node `<name>` (create waits until it is ACTIVE; delete --force
removes both). `maxlm train` finds its peers by itself on a TPU VM (maxlm/parallel/distributed.py), so the same
command runs on every worker. With several workers, --workdir must be a directory all of them share (NFS,
Filestore, or a bucket mounted at the same path): every process writes its shards of each checkpoint there.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = "~/maxlm"  # The repo on every worker.
LOG = "~/maxlm-train.log"  # Each worker's `maxlm train` output.
ARCHIVE = "maxlm-src.tar.gz"


class Shell:
  """Runs (or, dry, only prints) commands; every command is printed first."""

  def __init__(self, dry_run: bool):
    self.dry_run = dry_run

  def run(self, cmd: list[str], capture: bool = False) -> str:
    print("+ " + shlex.join(cmd), flush=True)
    if self.dry_run:
      return ""
    done = subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE if capture else None)
    return done.stdout or ""


class TpuVm:
  def __init__(self, args: argparse.Namespace, shell: Shell):
    self.a, self.sh = args, shell
    self.where = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])

  def gcloud(self, *words: str) -> list[str]:
    return ["gcloud", "compute", "tpus", *words, *self.where]

  def ssh(self, remote: str, worker: str = "all") -> None:
    self.sh.run(self.gcloud("tpu-vm", "ssh", self.a.name, f"--worker={worker}", f"--command={remote}"))

  def create(self) -> None:
    a = self.a
    spot = ["--spot"] if a.spot else []
    if a.queued:
      qr = f"{a.name}-qr"
      self.sh.run(
        self.gcloud(
          "queued-resources",
          "create",
          qr,
          f"--node-id={a.name}",
          f"--accelerator-type={a.accelerator}",
          f"--runtime-version={a.runtime}",
          *spot,
        )
      )
      describe = self.gcloud("queued-resources", "describe", qr, "--format=value(state.state)")
      while True:  # WAITING_FOR_RESOURCES -> PROVISIONING -> ACTIVE (or FAILED / SUSPENDED).
        state = self.sh.run(describe, capture=True).strip()
        if self.sh.dry_run or state == "ACTIVE":
          break
        if state in ("FAILED", "SUSPENDED"):
          sys.exit(f"tpu_vm: queued resource {qr} is {state}; see `gcloud compute tpus queued-resources describe`")
        time.sleep(30)
    else:
      self.sh.run(
        self.gcloud("tpu-vm", "create", a.name, f"--accelerator-type={a.accelerator}", f"--version={a.runtime}", *spot)
      )

  def copy(self) -> None:
    """The committed tree (git archive HEAD), unpacked fresh on every worker."""
    archive = os.path.join(self.a.tmp, ARCHIVE)
    self.sh.run(["git", "-C", REPO, "archive", "--format=tar.gz", f"--output={archive}", "HEAD"])
    self.sh.run(self.gcloud("tpu-vm", "scp", archive, f"{self.a.name}:{ARCHIVE}", "--worker=all"))
    self.ssh(f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && tar -xzf {ARCHIVE} -C {REMOTE_DIR}")

  def install(self) -> None:
    self.ssh(
      f"cd {REMOTE_DIR} && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip && "
      ".venv/bin/pip install -q -e '.[tpu]'"
    )

  def run(self) -> None:
    """`maxlm train` on every worker at once, detached (it survives a dropped ssh), output to each worker's log."""
    train = shlex.join([".venv/bin/maxlm", "train", *self.a.train_args])
    self.ssh(f"cd {REMOTE_DIR} && (setsid nohup {train} > {LOG} 2>&1 < /dev/null &)")
    if self.a.follow:
      self.logs()

  def logs(self) -> None:
    self.ssh(f'tail -n +1 -F {LOG} | sed "s/^/$(hostname): /"')

  def fetch(self) -> None:
    """Worker 0's log and, with --workdir, the run's metrics and config (only process 0 writes them)."""
    if not self.sh.dry_run:
      os.makedirs(self.a.to, exist_ok=True)
    sources = [f"{self.a.name}:{LOG}"]
    if self.a.workdir:
      sources += [f"{self.a.name}:{self.a.workdir}/{f}" for f in ("metrics.jsonl", "config.json")]
    self.sh.run(self.gcloud("tpu-vm", "scp", *sources, self.a.to, "--worker=0"))

  def delete(self) -> None:
    if self.a.queued:
      self.sh.run(self.gcloud("queued-resources", "delete", f"{self.a.name}-qr", "--force", "--quiet"))
    else:
      self.sh.run(self.gcloud("tpu-vm", "delete", self.a.name, "--quiet"))

  def up(self) -> None:
    self.create()
    self.copy()
    self.install()
    self.run()


def parse(argv: list[str]) -> argparse.Namespace:
  train_args = []
  if "--" in argv:  # Everything after `--` goes to `maxlm train`.
    argv, train_args = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
  parser = argparse.ArgumentParser(
    description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
  )
  parser.add_argument("--name", required=True, help="TPU VM (node) name")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project", default="", help="default: gcloud's configured project")
  parser.add_argument("--dry-run", action="store_true", help="print every command, run none")
  parser.add_argument("--queued", action="store_true", help="create/delete through a queued resource")
  parser.add_argument("--tmp", default="/tmp", help="local directory for the source archive")
  commands = parser.add_subparsers(dest="command", required=True)
  for name in ("create", "up"):
    p = commands.add_parser(name)
    p.add_argument("--accelerator", required=True, help="accelerator type, e.g. v5litepod-16, v4-32, v5p-16")
    p.add_argument(
      "--runtime", required=True, help="TPU software version, e.g. tpu-ubuntu2204-base, v2-alpha-tpuv5-lite"
    )
    p.add_argument("--spot", action="store_true")
    p.add_argument("--follow", action="store_true", help="up: stream the logs after starting")
  for name in ("copy", "install", "logs", "delete"):
    commands.add_parser(name)
  p = commands.add_parser("run")
  p.add_argument("--follow", action="store_true", help="stream the logs after starting")
  p = commands.add_parser("fetch")
  p.add_argument("--to", required=True, help="local directory")
  p.add_argument("--workdir", default="", help="the run's --workdir on the workers")
  args = parser.parse_args(argv)
  args.train_args = train_args
  if args.command in ("run", "up") and not train_args:
    parser.error(
      f"{args.command}: give maxlm train's flags after --, e.g. -- --config=configs/llama_1b.py "
      "--workdir=/mnt/shared/run"
    )
  return args


def main(argv: list[str] | None = None) -> None:
  args = parse(sys.argv[1:] if argv is None else argv)
  getattr(TpuVm(args, Shell(args.dry_run)), args.command)()


if __name__ == "__main__":
  main()
