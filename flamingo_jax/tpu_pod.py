"""The gcloud commands that run a training on a TPU VM pod (launch.py --mode=tpu_pod).

start: a tarball of the checkout's code (git's files: never .venv, .git or workdirs), copied to
every worker and unpacked, a venv with jax[tpu], then the run started detached (nohup) with its
log and pid in the worker's home. logs: the tail of each worker's log, each line named by its
host. stop: SIGTERM to every worker's run, which saves the same step on all and exits 0.
"""
import os
import shlex
import subprocess

CODE = "~/flamingo_jax"  # On every worker.
VENV = "~/flamingo_venv"
LOG = "~/flamingo_run.log"
PID = "~/flamingo_run.pid"


def code_files(root: str) -> list[str]:
  """The checkout's files as git sees them: tracked, and untracked unless ignored."""
  try:
    out = subprocess.run(["git", "-C", root, "ls-files", "--cached", "--others",
                          "--exclude-standard", "-z"], capture_output=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError) as e:
    raise ValueError(f"--mode=tpu_pod copies the files git lists in {root}, and git could not "
                     f"list them ({e}); run it from a git checkout.") from e
  return sorted(f for f in out.decode().split("\0") if f and os.path.isfile(os.path.join(root, f)))


def commands(action: str, tpu: str, zone: str, train_argv: list[str], code: str, archive: str,
             log_lines: int = 50) -> list[list[str]]:
  """The commands of `action` ('start' | 'logs' | 'stop'), in order, for every worker at once."""
  vm = ["gcloud", "compute", "tpus", "tpu-vm"]
  ssh = lambda command: [*vm, "ssh", tpu, f"--zone={zone}", "--worker=all", f"--command={command}"]
  named = "sed \"s/^/[$(hostname)] /\""
  if action == "logs":
    return [ssh(f"tail -n {log_lines} {LOG} | {named}")]
  if action == "stop":
    return [ssh(f"kill -TERM $(cat {PID}) && echo stopping | {named}")]
  if action != "start":
    raise ValueError(f"pod action {action!r}; expected 'start', 'logs' or 'stop'.")
  setup = (f"rm -rf {CODE} && mkdir -p {CODE} && tar xzf ~/{os.path.basename(archive)} -C {CODE}"
           f" && (test -d {VENV} || python3 -m venv {VENV}) && "
           f"{VENV}/bin/pip install -q -U 'jax[tpu]' -e {CODE}")
  run = (f"cd {CODE} && nohup {VENV}/bin/python launch.py "
         + " ".join(shlex.quote(a) for a in train_argv)
         + f" --multihost > {LOG} 2>&1 < /dev/null & echo $! > {PID}")
  return [["tar", "czf", archive, "-C", code, *code_files(code)],
          [*vm, "scp", archive, f"{tpu}:~/", f"--zone={zone}", "--worker=all"],
          ssh(setup), ssh(run)]
