"""Writing files so that nothing is left half-written: a writability check before the work starts, and
atomic writes (a temporary file renamed into place)."""

import os

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
