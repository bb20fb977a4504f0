"""One trainer per model directory: an exclusive lock file in it.

The trainer (the chief, in a multi-worker run) holds `MODEL_DIR/.lock`
while it runs: an `fcntl.flock` on a file descriptor kept open, with the
holder's host, pid and start time written into the file as JSON so that a
refused second trainer can name the first. The kernel releases a flock when
its process ends in any way, `kill -9` included, so a stale lock never
blocks a rerun: the file is left behind but nobody holds it.

Where the file system does not support flock (some network file systems
refuse it), the lock falls back to the JSON alone: a holder on this host
whose pid is gone is stale and is taken over; a holder on another host is
trusted. On NFS, flock is mapped to NFS locks (NLM), which a client that
loses its server connection may not release; remove the `.lock` file by
hand if the named process is really gone.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time

from nvae_tf import cli as cli_lib

LOCK_FILE = ".lock"
# flock errors of a file system that does not support it.
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class ModelDirLocked(cli_lib.UserError):
    """Another trainer holds the model directory's lock."""


def lock_path(model_dir: str) -> str:
    return os.path.join(model_dir, LOCK_FILE)


def _read_holder(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # someone else's process, or an unreadable pid
    return True


def describe(holder: dict) -> str:
    """`host H, pid P, started T` of a lock holder's record."""
    started = holder.get("start_time")
    when = (time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started))
            if isinstance(started, (int, float)) else "at an unknown time")
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"started {when}")


class ModelDirLock:
    """The exclusive lock of a model directory (a context manager).

    Args:
      model_dir: the directory; created if missing.
    """

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.path = lock_path(model_dir)
        self._fd = None

    def _refuse(self, holder: dict):
        raise ModelDirLocked(
            f"--model_dir={self.model_dir} is in use by another trainer "
            f"({describe(holder)}; lock file {self.path}): wait for it to "
            "finish or stop it, or use another --model_dir.")

    def acquire(self) -> "ModelDirLock":
        """Takes the lock or raises `ModelDirLocked` naming the holder."""
        os.makedirs(self.model_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            self._refuse(_read_holder(self.path))
        except OSError as err:
            if err.errno not in _NO_FLOCK:
                os.close(fd)
                raise
            holder = _read_holder(self.path)  # no flock: trust the record
            if holder and (holder.get("host") != socket.gethostname()
                           or _pid_alive(holder.get("pid"))) and \
                    holder.get("pid") != os.getpid():
                os.close(fd)
                self._refuse(holder)
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "start_time": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empties the record and lets go (the file stays: removing it
        would race with a trainer opening it)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass  # e.g. the directory was removed; the lock goes anyway
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
