"""Writing files so that nothing is left half-written: a writability check before the work starts, and
atomic writes (a temporary file renamed into place)."""

import contextlib
import fcntl
import os
import shutil
import socket

from iaf_tf.errors import ConfigError


def check_writable(path, what="--logdir"):
    """Fail, writing nothing, unless `path` is a writable folder or can be created as one."""
    path = os.path.abspath(path)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{what}: {path} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}: {path} is not writable ({existing} does not allow writing); "
                          f"choose another {what} or fix its permissions")


def write_atomically(path, content):
    """Write bytes or text to `path` through a temporary file, so a reader never sees a partial file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def nothing_left_on_failure(folder, close=lambda: None):
    """Make `folder` if needed; if the block fails (a full disk, a signal), remove what it made there, and
    the folders made for it. `close` first closes what writes there (a TensorBoard writer would make its
    file again when it flushes)."""
    folder = os.path.abspath(folder)
    made, path = None, folder  # the outermost folder made here
    while not os.path.exists(path):
        made, path = path, os.path.dirname(path)
    before = set(os.listdir(folder)) if made is None else set()
    os.makedirs(folder, exist_ok=True)
    try:
        yield
    except BaseException:
        close()
        if made:
            shutil.rmtree(made, ignore_errors=True)
            raise
        for name in set(os.listdir(folder)) - before:
            path = os.path.join(folder, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        raise


class RunLock:
    """An OS-level lock on a run folder for one trainer at a time: the second one gets a ConfigError naming
    the holder. The kernel drops the lock when its holder dies, even by SIGKILL."""

    NAME = ".lock"

    def __init__(self, folder):
        self.path = os.path.join(folder, self.NAME)
        self._file = None

    def __enter__(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise ConfigError(f"{os.path.dirname(self.path)} is in use by another trainer ({holder}); wait for it "
                              "to finish, stop it, or use another --logdir") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"host {socket.gethostname()}, PID {os.getpid()}\n")
        self._file.flush()
        return self

    def __exit__(self, *exc):
        self._file.close()  # closing releases the lock
