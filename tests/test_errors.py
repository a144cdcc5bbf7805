"""iaf_tf.errors: what counts as the user's fault. Every class is a UserError (and keeps the builtin base that
callers may catch); bad input anywhere raises one; the command line prints one as a single `error:` line and
keeps the traceback of anything else (a bug)."""

import inspect
import subprocess
import sys

import pytest
import tensorflow as tf

from iaf_tf import checkpoints, cli, config, data, devices, distribute, errors, files, tf1_checkpoint
from tests.fixtures import ROOT, cli_env, cli_flags

ERROR_CLASSES = [c for c in vars(errors).values()
                 if inspect.isclass(c) and issubclass(c, Exception) and c is not errors.UserError]


def test_every_error_class_is_a_user_error_with_its_builtin_base():
    assert {c.__name__ for c in ERROR_CLASSES} == {"ConfigError", "DataError", "CheckpointError", "NonFiniteError",
                                                   "ArgumentError"}
    assert all(issubclass(c, errors.UserError) for c in ERROR_CLASSES)
    # Callers that caught the builtin exceptions before still do.
    assert issubclass(errors.ConfigError, ValueError) and issubclass(errors.CheckpointError, ValueError)
    assert issubclass(errors.ArgumentError, ValueError)
    assert issubclass(errors.DataError, RuntimeError) and issubclass(errors.NonFiniteError, RuntimeError)
    # A signal is neither an error of the user's nor an Exception that `except Exception` would swallow.
    assert not issubclass(errors.Interrupted, Exception)


def _below_a_file(tmp):
    (tmp / "a_file").write_text("x")
    return tmp / "a_file" / "run"


def _no_gpu():
    if tf.config.list_logical_devices("GPU"):
        pytest.skip("this host has a GPU")


BAD_INPUT = {
    "hpconfig key": (errors.ConfigError, lambda tmp: config.Config().parse("dpeth=3")),
    "preset": (errors.ConfigError, lambda tmp: config.load_preset("nope")),
    "flag value": (errors.ConfigError, lambda tmp: config.Config().replace(seed=-1)),
    "cifar10 folder": (errors.DataError, lambda tmp: data.load_cifar10("test", tmp / "none")),
    "mnist folder": (errors.DataError, lambda tmp: data.load_mnist("test", tmp)),
    "checkpoint path": (errors.CheckpointError, lambda tmp: checkpoints.resolve(tmp / "none")),
    "tf1 checkpoint file": (errors.CheckpointError, lambda tmp: tf1_checkpoint.read(str(tmp / "model.ckpt-1"))),
    "logdir": (errors.ConfigError, lambda tmp: files.check_writable(_below_a_file(tmp))),
    "multi_worker without TF_CONFIG": (errors.ConfigError, lambda tmp: distribute.make_strategy(
        config.Config().replace(strategy="multi_worker").runtime)),
    "num_gpus": (errors.ConfigError, lambda tmp: _no_gpu() or devices.replica_devices(4)),
}


@pytest.mark.parametrize("what", BAD_INPUT)
def test_bad_input_raises_a_user_error(what, tmp_path, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    expected, cause = BAD_INPUT[what]
    with pytest.raises(errors.UserError) as err:
        cause(tmp_path)
    assert type(err.value) is expected


def _failing_run(exception):
    def run(mode, cfg):
        raise exception

    return run


@pytest.mark.parametrize("error, code", [(errors.ConfigError, 2), (errors.DataError, 2), (errors.CheckpointError, 2),
                                         (errors.NonFiniteError, 3)])
def test_the_cli_prints_a_user_error_as_one_line(error, code, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_run", _failing_run(error("what is wrong, and how to fix it")))
    assert cli.main(["iaf.py"], cli_flags("--logdir", tmp_path)) == code
    assert capsys.readouterr().err.splitlines() == ["error: what is wrong, and how to fix it"]


@pytest.mark.parametrize("bug", [ValueError, RuntimeError, KeyError])
def test_the_cli_keeps_the_traceback_of_anything_else(bug, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_run", _failing_run(bug("not the user's fault")))
    assert cli.main(["iaf.py"], cli_flags("--logdir", tmp_path)) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last)") and f"{bug.__name__}: " in err, err
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and "this is a bug in iaf-tf" in error_lines[0]


@pytest.mark.e2e
def test_the_console_command_shows_a_bug_with_its_traceback(tmp_path):
    # The real entry point (absl's app.run around cli.main), with a bug planted where the mode would run.
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from iaf_tf import cli\n"
              "def planted(mode, cfg):\n    raise ZeroDivisionError('planted')\n"
              f"cli._run = planted; sys.argv = ['iaf-tf', '--logdir', {str(tmp_path)!r}]; cli.run()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr and "ZeroDivisionError: planted" in done.stderr
    assert "in planted" in done.stderr  # the frame where it happened
