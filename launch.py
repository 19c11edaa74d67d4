"""The one entry point:
  python launch.py --config=flamingo_jax/configs/tiny.py --workdir=DIR [--config.x=v ...]

Modes (each a small function in MODES):
  train               train here (all of this host's devices); re-running the command resumes.
  local_multiprocess  the same training as --num_processes processes on this machine (CPU, gloo).
  tpu_pod             copy the code (git's files only) to a TPU VM pod, install jax[tpu] and start
                      the training detached on every worker; --pod_action=logs shows each
                      worker's log, --pod_action=stop stops it with a checkpoint (--dry_run
                      prints the commands).
  compile             compile the train step for --topology (e.g. v4-3072, v5p:8x8x16) on this host
                      (needs libtpu, no TPU and no --workdir) and print per-chip memory, FLOPs per
                      step, compile time and the step time at --mfu (flamingo_jax/train/aot.py).
  eval                evaluate the workdir's newest checkpoint (Flamingo: config.evals and each
                      --benchmark=NAME:DIR, with --shots, --seeds, --selection...; retrieval for
                      the contrastive model; flamingo_jax/eval/evaluate.py). The config is read
                      from the workdir when --config is not given.
  predict             continue --prompt about --image files with the workdir's model (config from
                      its config.json; flags and API in flamingo_jax/predict.py).
"""
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from flamingo_jax import predict as predict_lib  # Defines predict's flags; imports no JAX.

_CONFIG = config_flags.DEFINE_config_file("config", None,
                                          "Config file (flamingo_jax/configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and logs go here.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "local_multiprocess", "tpu_pod", "compile",
                                           "eval", "predict"],
                          "What to do (see the module docstring).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes of a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process (set by local_multiprocess).")
_COORDINATOR = flags.DEFINE_string("coordinator", "", "host:port of process 0 (multi-process).")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() with its "
                               "auto-detected settings (TPU pods).")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout_s", 20, "Multi-process: when one process has sent no heartbeat for this "
    "long (killed, host lost), the others stop with an error instead of waiting on it.")
_TPU = flags.DEFINE_string("tpu", "", "tpu_pod: the TPU VM name.")
_ZONE = flags.DEFINE_string("zone", "", "tpu_pod: its zone.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "tpu_pod: print the commands, run nothing.")
_POD_ACTION = flags.DEFINE_enum("pod_action", "start", ["start", "logs", "stop"],
                                "tpu_pod: start the run detached, show each worker's log, or stop "
                                "it (SIGTERM: a checkpoint, then exit).")
_LOG_LINES = flags.DEFINE_integer("log_lines", 50, "tpu_pod --pod_action=logs: lines per worker.")
_TOPOLOGY = flags.DEFINE_string("topology", "", "compile: a TPU type (v4-128; v4 and v5p count "
                                "TensorCores) or topology (v4:4x4x4).")
_MFU = flags.DEFINE_float("mfu", 0.5, "compile: the model FLOPs utilisation for the step time.")
_BENCHMARKS = flags.DEFINE_multi_string(
    "benchmark", [], "eval: NAME:DIR adds the benchmark NAME (coco, vqav2, okvqa, ...; "
    "flamingo_jax/eval/benchmarks.py) read from DIR, its files as published, to config.evals.")
_EVALS = flags.DEFINE_list("evals", [], "eval: run only these entries of config.evals.")
_SHOTS = flags.DEFINE_list("shots", [], "eval: numbers of in-context examples, e.g. 0,4,8,16,32.")
_SEEDS = flags.DEFINE_list("seeds", [], "eval: seeds of the in-context example draws (results "
                           "are the mean and std over them).")
_SELECTION = flags.DEFINE_enum("selection", None, ["random", "rices"],
                               "eval: in-context examples at random or by RICES (paper App. B).")
_NUM_QUERIES = flags.DEFINE_integer("num_queries", None, "eval: evaluate the first N queries of "
                                    "each benchmark split (default: all).")
_PROMPTS = flags.DEFINE_enum("prompts", None, ["paper", "openflamingo"],
                             "eval: the prompt format (the paper's, or OpenFlamingo's eval code).")

# Flags that select the mode; everything else in argv is passed on to the training processes.
_MODE_FLAGS = ("--mode", "--num_processes", "--process_id", "--coordinator", "--multihost",
               "--tpu", "--zone", "--dry_run", "--nodry_run", "--topology", "--mfu",
               "--pod_action", "--log_lines")


def _train_argv(argv: list[str]) -> list[str]:
  """argv without the mode flags: the training command's own flags (config, workdir, overrides)."""
  return [a for a in argv[1:] if a.split("=")[0] not in _MODE_FLAGS]


def train(argv):
  """Trains in this process (one of several when --coordinator or --multihost is given)."""
  del argv
  import jax  # pylint: disable=g-import-not-at-top  (after the flags set the platform up)
  # A process that stops sending heartbeats (killed, its host gone) ends the others after this.
  timeout = {"heartbeat_timeout_seconds": _HEARTBEAT_TIMEOUT.value}
  if _COORDINATOR.value:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               **timeout)
  elif _MULTIHOST.value:
    jax.distributed.initialize(**timeout)
  from flamingo_jax.eval import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from flamingo_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  from flamingo_jax.train import trainer  # pylint: disable=g-import-not-at-top
  evaluator = evaluate_lib.periodic(_CONFIG.value, _WORKDIR.value)  # Checks config.evals first.
  try:
    trainer.train(_CONFIG.value, _WORKDIR.value, evaluator)
  except checkpoint.SaveError as e:
    # The writer threads are stuck on the failed write: exit now rather than wait on them (a hang).
    # They may be printing shutdown tracebacks: stderr goes to /dev/null first, the error to the
    # real one, and the log handler stays locked after it, so that the error is the last line.
    sys.stderr.flush()
    real_stderr = os.fdopen(os.dup(2), "w")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    handler = logging.get_absl_handler()
    handler.python_handler.setStream(real_stderr)
    logging.error("%s", e)
    handler.acquire()
    real_stderr.flush()
    os._exit(1)


def local_multiprocess(argv):
  """--num_processes copies of the training command on this machine, devices split between them."""
  n = _NUM_PROCESSES.value
  with socket.socket() as s:  # A free port on the loopback interface only.
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  devices = _cpu_device_count()
  if devices % n:
    raise app.UsageError(f"--num_processes={n} does not divide the {devices} CPU devices "
                         "(XLA_FLAGS --xla_force_host_platform_device_count).")
  env = dict(os.environ, XLA_FLAGS=" ".join(
      [f for f in os.environ.get("XLA_FLAGS", "").split()
       if not f.startswith("--xla_force_host_platform_device_count")]
      + [f"--xla_force_host_platform_device_count={devices // n}"]), JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen(
      [sys.executable, __file__, *_train_argv(argv), f"--coordinator=127.0.0.1:{port}",
       f"--num_processes={n}", f"--process_id={i}"], env=env) for i in range(n)]
  codes = [p.wait() for p in procs]
  if any(codes):
    raise RuntimeError(f"local_multiprocess: exit codes {codes}.")


def _cpu_device_count() -> int:
  for f in os.environ.get("XLA_FLAGS", "").split():
    if f.startswith("--xla_force_host_platform_device_count="):
      return int(f.split("=")[1])
  return 1


def tpu_pod(argv):
  """Starts the run detached on every worker (or shows its logs, or stops it: --pod_action)."""
  from flamingo_jax import tpu_pod as pod  # pylint: disable=g-import-not-at-top
  if not _TPU.value or not _ZONE.value:
    raise app.UsageError("--mode=tpu_pod needs --tpu=NAME and --zone=ZONE.")
  code = os.path.dirname(os.path.abspath(__file__))
  archive = os.path.join(tempfile.gettempdir(), "flamingo_jax_code.tgz")
  commands = pod.commands(_POD_ACTION.value, _TPU.value, _ZONE.value, _train_argv(argv), code,
                          archive, _LOG_LINES.value)
  for command in commands:
    print(shlex.join(command) if command[0] != "tar" else
          shlex.join(command[:5]) + f" <{len(command) - 5} files: git ls-files>")
    if not _DRY_RUN.value:
      subprocess.run(command, check=True)
  if _POD_ACTION.value == "start":
    print(f"Started. Logs: --mode=tpu_pod --pod_action=logs; stop (saves a checkpoint): "
          f"--pod_action=stop; each worker logs to {pod.LOG}.")


def compile_for_topology(argv):
  """Compiles the update step for --topology and prints what it needs per chip."""
  del argv
  if not _TOPOLOGY.value:
    raise app.UsageError("--mode=compile needs --topology (e.g. v4-128 or v4:4x4x4).")
  from flamingo_jax.train import aot  # pylint: disable=g-import-not-at-top
  for report in aot.compile_step(_CONFIG.value, _TOPOLOGY.value):
    print(report.format(_MFU.value))


def _ints(values: list[str], flag: str) -> tuple[int, ...] | None:
  try:
    return tuple(int(v) for v in values) or None
  except ValueError:
    raise app.UsageError(f"--{flag}={','.join(values)}: expected integers, e.g. 0,4,8.") from None


def evaluate(argv):
  """Evaluates the newest checkpoint in --workdir and prints the results (also in eval.json)."""
  del argv
  from flamingo_jax.eval import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  config = evaluate_lib.configure(
      _CONFIG.value or predict_lib.read_config(_WORKDIR.value), _BENCHMARKS.value,
      shots=_ints(_SHOTS.value, "shots"), seeds=_ints(_SEEDS.value, "seeds"),
      selection=_SELECTION.value, num_queries=_NUM_QUERIES.value, prompts=_PROMPTS.value)
  results = evaluate_lib.evaluate(config, _WORKDIR.value, only=_EVALS.value)
  print(json.dumps(results, indent=2))


def predict(argv):
  """Prints the model's answer to --prompt about the --image files (flamingo_jax/predict.py)."""
  del argv
  predict_lib.predict(_WORKDIR.value, _CONFIG.value)


MODES = {"train": train, "local_multiprocess": local_multiprocess, "tpu_pod": tpu_pod,
         "compile": compile_for_topology, "eval": evaluate, "predict": predict}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}.")
  pod_control = _MODE.value == "tpu_pod" and _POD_ACTION.value != "start"
  if _CONFIG.value is None and not pod_control and _MODE.value not in ("predict", "eval"):
    raise app.UsageError("--config is required (e.g. --config=flamingo_jax/configs/tiny.py).")
  if not _WORKDIR.value and _MODE.value != "compile" and not pod_control:
    raise app.UsageError("--workdir is required.")
  from flamingo_jax import console  # pylint: disable=g-import-not-at-top  (imports jax)
  from flamingo_jax import host_memory  # pylint: disable=g-import-not-at-top
  console.setup()
  if not (_COORDINATOR.value or _MULTIHOST.value):  # Several processes keep JAX's defaults.
    host_memory.reuse_cpu_step_buffers()
  logging.info("Mode %s.", _MODE.value)
  MODES[_MODE.value](sys.argv)


if __name__ == "__main__":
  app.run(main)
