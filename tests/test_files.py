"""iaf_tf.files: the writability check made before any work, atomic writes, and one trainer per run folder."""

import os
import subprocess
import sys

import pytest

from iaf_tf import files
from iaf_tf.errors import ConfigError
from tests.fixtures import ROOT


def test_check_writable_accepts_a_folder_that_can_be_created_and_creates_nothing(tmp_path):
    files.check_writable(tmp_path / "a" / "b" / "c")
    files.check_writable(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_check_writable_rejects_a_path_below_a_file(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError, match="--logdir: .* cannot be created: .*a_file is a file, not a folder"):
        files.check_writable(tmp_path / "a_file" / "run")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_check_writable_rejects_a_read_only_folder(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="not writable"):
            files.check_writable(folder / "run", what="--logdir")
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize("content", ["text\n", b"\x00bytes"])
def test_write_atomically_writes_text_or_bytes_and_leaves_no_temporary_file(tmp_path, content):
    path = tmp_path / "new" / "result.json"
    files.write_atomically(str(path), content)
    assert (path.read_bytes() if isinstance(content, bytes) else path.read_text()) == content
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]


def test_write_atomically_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old")
    with pytest.raises(TypeError):
        files.write_atomically(str(path), 12345)  # neither text nor bytes
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["result.json"]


_HOLD_LOCK = """
import sys, time
sys.path.insert(0, {root!r})
from iaf_tf import files
with files.RunLock({folder!r}):
    print("locked", flush=True)
    time.sleep(60)
"""


@pytest.mark.e2e
def test_run_lock_admits_one_holder_at_a_time_and_names_it(tmp_path):
    with files.RunLock(str(tmp_path / "train")):
        holder = (tmp_path / "train" / files.RunLock.NAME).read_text()
        assert f"PID {os.getpid()}" in holder
    with files.RunLock(str(tmp_path / "train")):  # released on exit
        pass
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK.format(root=str(ROOT), folder=str(tmp_path / "train"))],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"is in use by another trainer .*PID {proc.pid}"):
            with files.RunLock(str(tmp_path / "train")):
                pass
        proc.kill()  # the kernel drops the lock of a killed holder
        proc.wait(timeout=30)
        with files.RunLock(str(tmp_path / "train")):
            pass
    finally:
        proc.kill()
        proc.wait(timeout=30)
