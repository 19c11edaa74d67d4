"""One run per workdir: `workdir/lock` names the run that holds it.

Two runs on one workdir would interleave their checkpoints, so the second is refused with the
holder's host, pid, start time and command. On a local (or NFS) workdir the lock is an `flock` on
that file: the kernel drops it when its process dies, so a lock left behind by a killed run is
taken over with no waiting. Object stores (gs://) have no locks: there the holder refreshes a
heartbeat in the file; a lock whose heartbeat is older than `stale_after_s`, or whose holder was
a process on this host that no longer exists, is taken over; a writer reads its own record back to
lose a simultaneous start cleanly. In a multi-process run process 0 holds the lock and every
process stops if it cannot.
"""
import fcntl
import json
import os
import socket
import sys
import time
import uuid

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np

from flamingo_jax import paths

HEARTBEAT_EVERY_S = 60


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir."""


class WorkdirLock:
  """`with WorkdirLock(workdir) as lock:` around a run; lock.heartbeat() every step (cheap)."""

  def __init__(self, workdir: str, stale_after_s: float = 10 * HEARTBEAT_EVERY_S):
    self.path = epath.Path(workdir) / "lock"
    self._stale_after_s = stale_after_s
    self._record = {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex,
                    "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    "command": " ".join(sys.argv)}
    self._file = None
    self._last_beat = 0.0

  def _holder(self, text: str) -> str:
    try:
      record = json.loads(text)
      return (f"host {record['host']}, pid {record['pid']}, started {record['started']}: "
              f"{record['command']}")
    except (ValueError, KeyError, TypeError):
      return f"unrecognised lock contents {text[:200]!r}"

  def _refused(self, text: str) -> WorkdirLockedError:
    return WorkdirLockedError(
        f"{self.path.parent} is in use by another run ({self._holder(text)}). One run per "
        "workdir: stop that run, or pick another --workdir.")

  def _acquire_local(self) -> None:
    self._file = open(self.path, "a+")  # pylint: disable=consider-using-with  (held until release)
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._file.seek(0)
      text = self._file.read()
      self._file.close()
      self._file = None
      raise self._refused(text) from None
    self._file.seek(0)
    self._file.truncate()
    self._file.write(json.dumps(self._record))
    self._file.flush()

  def _write_remote(self) -> None:
    self.path.write_text(json.dumps({**self._record, "heartbeat": time.time()}))
    self._last_beat = time.monotonic()

  def _holder_is_alive(self, text: str) -> bool:
    """False once the heartbeat is stale, or at once if the holder was a dead process here."""
    try:
      record = json.loads(text)
      if time.time() - float(record["heartbeat"]) >= self._stale_after_s:
        return False
      if record["host"] == socket.gethostname():
        os.kill(int(record["pid"]), 0)  # Signal 0: raises if there is no such process.
    except PermissionError:
      return True  # It exists, as another user's process.
    except (ProcessLookupError, ValueError, KeyError, TypeError):
      return False  # Gone, or not a lock we wrote.
    return True

  def _acquire_remote(self) -> None:
    if self.path.exists():
      text = self.path.read_text()
      if self._holder_is_alive(text):
        raise self._refused(text)
      logging.warning("Taking over the lock of a run that is gone (%s).", self._holder(text))
    self._write_remote()
    time.sleep(1.0)  # A run starting at the same moment writes too; the last writer wins.
    text = self.path.read_text()
    if json.loads(text).get("id") != self._record["id"]:
      raise self._refused(text)

  def acquire(self) -> "WorkdirLock":
    failed = None
    if jax.process_index() == 0:
      try:
        if not paths.is_url(self.path):
          self._acquire_local()
        else:
          self._acquire_remote()
      except (WorkdirLockedError, OSError) as e:
        failed = e
    if jax.process_count() > 1:
      anyone_failed = multihost_utils.broadcast_one_to_all(np.int32(failed is not None))
      if anyone_failed and failed is None:
        raise WorkdirLockedError(f"Process 0 could not lock {self.path.parent} (see its log).")
    if isinstance(failed, OSError):
      raise OSError(f"Cannot write the lock file {self.path} (is the workdir writable?): "
                    f"{failed}") from failed
    if failed is not None:
      raise failed
    return self

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()

  def heartbeat(self) -> None:
    """Keeps a remote lock fresh (rate-limited); nothing to do for a local one."""
    if (jax.process_index() == 0 and paths.is_url(self.path)
        and time.monotonic() - self._last_beat > HEARTBEAT_EVERY_S):
      self._write_remote()

  def release(self) -> None:
    if self._file is not None:
      self._file.close()  # Closing drops the flock; the file stays, naming its last holder.
      self._file = None
    elif jax.process_index() == 0 and paths.is_url(self.path) and self._last_beat:
      self.path.unlink(missing_ok=True)
      self._last_beat = 0.0
