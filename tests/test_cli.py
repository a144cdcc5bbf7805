"""iaf_tf.cli (bin/iaf.py): the original's flags, the README's commands, and bad input of every kind ending
in one `error:` line with nothing written. (Which errors count as the user's: test_errors.py.)"""

import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from iaf_tf import cli, config, run_record
from tests.fixtures import (ONE_BLOCK, ROOT, cli_env, cli_flags, error_lines, latest_step, run_cli, run_main,
                            start_cli, train_args)

README_HPCONFIG = "depth=1,num_blocks=20,kl_min=0.1,learning_rate=0.002,batch_size=32"
# bin/iaf.py's flags before the configuration was one tree: the same names still work.
ORIGINAL_FLAGS = {"logdir", "hpconfig", "preset", "mode", "num_gpus", "strategy", "cpu_replicas", "max_steps",
                  "checkpoint_every", "summary_every", "seed", "data_dir", "download", "threads", "checkpoint",
                  "once", "num_images", "poll_seconds", "wait_seconds", "num_samples", "temperature"}


def _assert_clean_failure(done, logdir, *needles):
    assert done.returncode != 0
    errors = error_lines(done.stderr)
    assert len(errors) == 1 and errors[0].startswith("error: "), done.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert not Path(logdir).exists() or not any(Path(logdir).rglob("*")), sorted(Path(logdir).rglob("*"))


# ---------------------------------------------------------------- flags


def test_the_original_flags_are_all_there():
    flag_values = cli_flags("--mode", "eval_test", "--num_gpus", "1", "--logdir", "/tmp/x", "--hpconfig", "depth=1")
    assert ORIGINAL_FLAGS <= set(flag_values)
    assert {"train", "eval_test", "eval_train", "sample"} <= set(cli.MODES)
    given = config.given_on_command_line(flag_values)
    assert given == {"num_gpus": 1, "logdir": "/tmp/x", "depth": 1}


def test_unexpected_arguments(capsys):
    assert cli.main(["iaf.py", "extra"], cli_flags()) == 2
    assert capsys.readouterr().err.splitlines() == ["error: unexpected arguments ['extra']"]


# ---------------------------------------------------------------- the README's commands


def test_readme_command_with_num_gpus_8_on_a_cpu_host_says_what_to_do(tmp_path, cifar10_dir):
    # With the README's setup (CIFAR10_PATH set), the one thing wrong here is the number of GPUs.
    done = run_main(["--logdir", tmp_path, "--hpconfig", README_HPCONFIG, "--num_gpus", "8", "--mode", "train",
                     "--max_steps", "1"], CIFAR10_PATH=cifar10_dir)
    assert done.returncode == 2
    assert "--num_gpus=8 but this host has no GPU" in done.stderr and "--cpu_replicas=8" in done.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.e2e
def test_readme_command_trains_the_readme_recipe_on_cpu(tmp_path, cifar10_dir):
    done = run_cli(["--logdir", tmp_path, "--hpconfig", README_HPCONFIG, "--num_gpus", "1", "--mode", "train",
                    "--max_steps", "1", "--data_dir", cifar10_dir], timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Num trainable variables: 41557927" in done.stdout
    assert "Iteration 1, time = " in done.stdout
    assert tf.train.latest_checkpoint(tmp_path / "train").endswith("ckpt-1")


# ---------------------------------------------------------------- bad input


def test_unknown_hpconfig_key(tmp_path):
    done = run_main(train_args(tmp_path / "run", "--hpconfig", "dpeth=3"))
    _assert_clean_failure(done, tmp_path / "run", "unknown hparam 'dpeth'", "valid keys: ", "depth")


def test_ill_typed_hpconfig_value(tmp_path):
    done = run_main(train_args(tmp_path / "run", "--hpconfig", "h_size=big"))
    _assert_clean_failure(done, tmp_path / "run", "h_size", "big")


def test_missing_preset(tmp_path):
    done = run_main(train_args(tmp_path / "run", "--preset", "nope"))
    _assert_clean_failure(done, tmp_path / "run", "unknown preset 'nope'", "readme_recipe")


def test_missing_cifar10(tmp_path):
    done = run_main(train_args(tmp_path / "run", "--hpconfig", ONE_BLOCK), CIFAR10_PATH=tmp_path / "none")
    _assert_clean_failure(done, tmp_path / "run", str(tmp_path / "none"), "CIFAR10_PATH")


def test_cifar10_path_pointing_at_the_wrong_folder(tmp_path):
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "readme.txt").write_text("not CIFAR")
    done = run_main(train_args(tmp_path / "run", "--hpconfig", ONE_BLOCK), CIFAR10_PATH=tmp_path / "wrong")
    _assert_clean_failure(done, tmp_path / "run", str(tmp_path / "wrong"), "cifar-10-batches-py")


def _copy_of_cifar(tmp_path, cifar10_dir):
    copy = tmp_path / "cifar-10-batches-py"
    copy.mkdir()
    for f in cifar10_dir.iterdir():
        (copy / f.name).symlink_to(f)
    return copy


def _truncated(cifar10_dir, name):
    return (cifar10_dir / name).read_bytes()[:100_000]


def _pickled(data_array):
    return pickle.dumps({b"data": data_array, b"labels": [0] * 10000}, protocol=2)


@pytest.mark.parametrize("name, contents", [
    ("data_batch_3", lambda d: _truncated(d, "data_batch_3")),
    ("data_batch_2", lambda d: b"\x00garbage" * 1000),                               # corrupt
    ("data_batch_1", lambda d: _pickled(np.zeros([10000, 1024], np.uint8))),        # wrong shape
    ("data_batch_4", lambda d: _pickled(np.zeros([10000, 3072], np.float32))),      # wrong dtype
], ids=["truncated", "corrupt", "wrong_shape", "wrong_dtype"])
def test_bad_batch_file(name, contents, tmp_path, cifar10_dir):
    copy = _copy_of_cifar(tmp_path, cifar10_dir)
    (copy / name).unlink()
    (copy / name).write_bytes(contents(cifar10_dir))
    done = run_main(train_args(tmp_path / "run", "--hpconfig", ONE_BLOCK), CIFAR10_PATH=copy)
    _assert_clean_failure(done, tmp_path / "run", name)


def test_image_size_that_does_not_fit_the_data(tmp_path, cifar10_dir):
    done = run_main(train_args(tmp_path / "run", "--hpconfig", ONE_BLOCK + ",image_size=64", "--data_dir", cifar10_dir))
    _assert_clean_failure(done, tmp_path / "run", "uint8 [N, 64, 64, 3]", "image_size")


@pytest.mark.slow
def test_checkpoint_from_another_configuration_names_each_variable(tmp_path, cifar10_dir):
    first = run_main(train_args(tmp_path, "--hpconfig", ONE_BLOCK, "--data_dir", cifar10_dir))
    assert first.returncode == 0, first.stderr[-2000:]
    train_dir = tmp_path / "train"
    before = sorted(p.name for p in train_dir.iterdir())
    other = train_args(tmp_path, "--hpconfig", ONE_BLOCK + ",h_size=16", "--data_dir", cifar10_dir, "--max_steps", "5")
    # The run's record of its hyper-parameters refuses the change before anything is loaded...
    done = run_main(other)
    assert done.returncode != 0
    errors = error_lines(done.stderr)
    assert len(errors) == 1 and "h_size=16 contradicts the run in" in errors[0] and "h_size=8" in errors[0], \
        done.stderr[-2000:]
    assert sorted(p.name for p in train_dir.iterdir()) == before  # nothing written
    # ...and without the record (a run from before records), the checkpoint's shapes do.
    (train_dir / run_record.FILE).unlink()
    before = sorted(p.name for p in train_dir.iterdir())
    done = run_main(other)
    assert done.returncode != 0
    errors = error_lines(done.stderr)
    assert len(errors) == 1 and "written by another configuration" in errors[0], done.stderr[-2000:]
    assert "x_enc/V" in errors[0] and "[5, 5, 3, 8] in the checkpoint but [5, 5, 3, 16] in the model" in errors[0]
    assert sorted(p.name for p in train_dir.iterdir()) == before  # nothing written


def test_logdir_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    done = run_main(train_args(blocker / "run", "--hpconfig", ONE_BLOCK))
    _assert_clean_failure(done, blocker / "run", "cannot be created", "is a file")


def test_more_gpus_than_present(tmp_path, cifar10_dir):
    # The data is checked first: with it there, the one thing wrong is the number of GPUs.
    done = run_main(train_args(tmp_path / "run", "--hpconfig", ONE_BLOCK, "--num_gpus", "4", "--data_dir", cifar10_dir))
    _assert_clean_failure(done, tmp_path / "run", "--num_gpus=4", "no GPU")


# ---------------------------------------------------------------- every bad input: one line, nothing written

BAD_INPUTS = [
    (["--checkpoint_every", "0"], "--checkpoint_every=0"),
    (["--summary_every", "0"], "--summary_every=0"),
    (["--checkpoint_every", "-1"], "--checkpoint_every=-1"),
    (["--max_steps", "-1"], "--max_steps=-1"),
    (["--threads", "-3"], "--threads=-3"),
    (["--seed", "-1"], "--seed=-1"),
    (["--image_every", "-1"], "--image_every=-1"),
    (["--hpconfig", f"{ONE_BLOCK},depth=6"], "depth=6: 6 levels need image_size divisible by 64, and image_size=32 "
                                             "allows at most 5 levels"),
    (["--hpconfig", f"{ONE_BLOCK},depths=1-1-1-1-1-1"], "depths='1-1-1-1-1-1': 6 levels"),
    (["--mode", "sample", "--num_samples", "0"], "--num_samples=0"),
    (["--mode", "sample", "--temperature", "nan"], "--temperature=nan"),
    (["--mode", "eval_test", "--poll_seconds", "0"], "--poll_seconds=0.0"),
    (["--mode", "eval_test", "--num_images", "-5"], "--num_images=-5"),
    (["--strategy", "multi_worker"], "TF_CONFIG is not valid JSON"),
]


@pytest.mark.parametrize("args,fragment", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_a_bad_flag_or_hparam_is_one_error_line_and_writes_nothing(args, fragment, tmp_path, cifar10_dir):
    logdir = tmp_path / "run"
    mode = [] if "--mode" in args else ["--mode", "train", "--hpconfig", ONE_BLOCK]
    done = run_main(["--logdir", logdir, "--num_gpus", "1", *mode, *args], CIFAR10_PATH=cifar10_dir,
                    TF_CONFIG="{not json")
    lines = error_lines(done.stderr)
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert not logdir.exists()


def test_empty_logdir_is_refused(tmp_path):
    done = run_main(["--mode", "train", "--logdir", "", "--hpconfig", ONE_BLOCK])
    lines = error_lines(done.stderr)
    assert done.returncode == 2 and lines == ["error: invalid flag --logdir='': must not be empty"], lines


def test_num_images_beyond_the_split_is_refused_before_evaluating(tmp_path, cifar10_dir, reference_dir):
    done = run_main(["--mode", "eval_test", "--checkpoint", reference_dir, "--logdir", tmp_path / "run",
                     "--num_images", "99999"], CIFAR10_PATH=cifar10_dir)
    lines = error_lines(done.stderr)
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "--num_images=99999: the cifar10 test split has 10000 images" in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_logdir_whose_mode_folder_cannot_be_written_fails_before_evaluating(tmp_path, cifar10_dir, reference_dir):
    logdir = tmp_path / "run"
    logdir.mkdir()
    (logdir / "eval_test").write_text("a file where the results would go")
    done = run_main(["--mode", "eval_test", "--checkpoint", reference_dir, "--logdir", logdir],
                    CIFAR10_PATH=cifar10_dir)
    lines = error_lines(done.stderr)
    assert done.returncode == 2 and len(lines) == 1 and "is a file, not a folder" in lines[0], done.stderr
    assert "Score" not in done.stdout
    assert sorted(p.name for p in logdir.iterdir()) == ["eval_test"]


# ---------------------------------------------------------------- quiet logs

_STARTUP = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
                      r"|I0000 \S+ +\d+ (port\.cc:\d+\] oneDNN custom operations are on"
                      r"|cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine))")


@pytest.mark.slow
@pytest.mark.e2e
def test_a_normal_training_and_eval_run_print_no_log_lines_but_the_listed_start_up_ones(tmp_path, cifar10_dir):
    env = dict(os.environ, CIFAR10_PATH=str(cifar10_dir))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # what a user has: bin/iaf.py's own default
    for args in (["--mode", "train", "--preset", "cpu_quick", "--num_gpus", "1", "--max_steps", "3",
                  "--checkpoint_every", "2"],
                 ["--mode", "eval_test", "--once", "--num_images", "100"]):
        done = run_cli([*args, "--logdir", tmp_path], env=env)
        assert done.returncode == 0, done.stderr
        others = [line for line in done.stderr.splitlines() if line.strip() and not _STARTUP.match(line)]
        assert others == [], others
        assert not [line for line in done.stdout.splitlines() if re.match(r"^(I\d{4}|W\d{4}|E\d{4}|INFO:|WARNING:)", line)]


# ---------------------------------------------------------------- signals at any moment

def _no_temporary_files(root):
    return [str(p) for p in Path(root).rglob("*") if "_temp" in p.name or p.name.endswith(".tmp")]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["train", "eval_test"])
@pytest.mark.e2e
def test_sigint_and_sigterm_at_random_moments_end_cleanly(mode, tmp_path, cifar10_dir, reference_dir):
    """Bounded: four runs per mode, each signalled once at a random moment of start-up, initialization,
    training or evaluation."""
    rng = np.random.default_rng(7 if mode == "train" else 8)
    args = (["--mode", "train", "--num_gpus", "1", "--hpconfig", ONE_BLOCK, "--max_steps", "200",
             "--checkpoint_every", "3"] if mode == "train" else
            ["--mode", "eval_test", "--checkpoint", reference_dir, "--num_images", "2000"])
    for trial in range(4):
        logdir = tmp_path / f"run{trial}"
        sig = (signal.SIGINT, signal.SIGTERM)[trial % 2]
        process = start_cli([*args, "--logdir", logdir], env=cli_env(CIFAR10_PATH=str(cifar10_dir)))
        time.sleep(float(rng.uniform(0.5, 12.0)))
        process.send_signal(sig)
        stdout, stderr = process.communicate(timeout=300)
        assert "Traceback" not in stderr, stderr
        if process.returncode != 0:
            assert process.returncode == 128 + sig, (process.returncode, stderr)
            lines = error_lines(stderr)
            assert len(lines) == 1 and lines[0].startswith(f"error: stopped by {sig.name}"), lines
        assert _no_temporary_files(tmp_path) == []


# What an init callback of absl's runs to send its own process a SIGTERM.
_SEND_SIGTERM = {
    "from_an_init_callback": "def send():\n"
                             "    os.kill(os.getpid(), signal.SIGTERM)\n",
    "from_a_finalizer": "class Resource: pass\n"
                        "def send():\n"
                        "    weakref.finalize(Resource(), os.kill, os.getpid(), signal.SIGTERM)\n"
                        "    time.sleep(30)\n",
}


@pytest.mark.e2e
@pytest.mark.parametrize("where", sorted(_SEND_SIGTERM))
def test_a_signal_after_the_flags_are_parsed_and_before_main_ends_the_run_with_its_one_line(where, tmp_path):
    """absl runs its init callbacks (TensorFlow registers one) between parsing the flags and main(): a
    signal there, which the random moments above can hit, ends the run like a signal anywhere else. So does
    one that lands in a finalizer (a weakref callback or __del__), where Python swallows the handler's
    exception, printing "Exception ignored in ...", and the signal would be lost while the run went on."""
    logdir = tmp_path / "run"
    script = ("import os, signal, sys, time, weakref\n"
              "from absl import app\n"
              f"{_SEND_SIGTERM[where]}"
              "app.call_after_init(send)\n"
              f"sys.argv = ['iaf.py', '--mode', 'eval_test', '--logdir', {str(logdir)!r}]\n"
              "from iaf_tf import cli\n"
              "cli.run()\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, env=cli_env(),
                          timeout=300)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-3000:]
    assert "Exception ignored" not in done.stderr, done.stderr[-3000:]
    assert error_lines(done.stderr) == ["error: stopped by SIGTERM before the run finished; nothing half-written "
                                        "is left"], done.stderr[-3000:]
    assert not logdir.exists()


# ---------------------------------------------------------------- README's Python examples, as written

def _readme_python_blocks():
    return re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)


@pytest.mark.slow
@pytest.mark.e2e
def test_the_readme_python_examples_run_as_written(tmp_path, cifar10_dir, reference_dir):
    """From a folder beside a `shared/` like the checkout's: the export command first (its example loads
    what it wrote), then every ```python block of README.md, each in a fresh process."""
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "reference").symlink_to(reference_dir.parent)
    (tmp_path / "shared" / "data").symlink_to(cifar10_dir.parent if cifar10_dir.name == "cifar-10-batches-py"
                                              else cifar10_dir)
    env = dict(cli_env(), PYTHONPATH=str(ROOT))
    command = re.search(r"^    (python bin/iaf.py --mode export .*)$", (ROOT / "README.md").read_text(), re.M).group(1)
    done = subprocess.run([sys.executable, str(ROOT / "bin" / "iaf.py"), *command.split()[2:]], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    blocks = _readme_python_blocks()
    assert len(blocks) >= 3
    for block in blocks:
        done = subprocess.run([sys.executable, "-c", block], cwd=work, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, block + "\n" + done.stderr[-3000:]
        assert done.stdout.strip()  # each example prints what it shows


@pytest.mark.slow
@pytest.mark.e2e
def test_pip_install_gives_a_console_command_that_works_from_any_folder(tmp_path, cifar10_dir):
    """The package as installed (not editable): the presets are package data, `iaf-tf` is its command."""
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=600)
    if done.returncode and "setuptools" in done.stderr:
        pytest.skip("setuptools is not installed in this environment")
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in (target / "iaf_tf" / "presets").glob("*.cfg")) == \
        sorted(p.name for p in (ROOT / "iaf_tf" / "presets").glob("*.cfg"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(cli_env(CIFAR10_PATH=str(cifar10_dir)), PYTHONPATH=str(target))
    done = subprocess.run([sys.executable, str(target / "bin" / "iaf-tf"), "--mode", "train", "--preset", "cpu_quick",
                           "--num_gpus", "1", "--max_steps", "5", "--logdir", tmp_path / "D"], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Stopped at step 5" in done.stdout
    assert latest_step(tmp_path / "D" / "train") == 5


@pytest.mark.parametrize("mode", ["train", "sample"])
def test_a_blocked_mode_folder_under_a_writable_logdir_fails_before_any_work(mode, tmp_path, cifar10_dir,
                                                                            reference_dir):
    logdir = tmp_path / "run"
    logdir.mkdir()
    (logdir / mode).write_text("a file where the mode writes")
    extra = ["--hpconfig", ONE_BLOCK] if mode == "train" else ["--checkpoint", reference_dir]
    done = run_main(["--mode", mode, "--num_gpus", "1", "--logdir", logdir, *extra], CIFAR10_PATH=cifar10_dir)
    lines = error_lines(done.stderr)
    assert done.returncode == 2 and len(lines) == 1 and "is a file, not a folder" in lines[0], done.stderr
    assert sorted(p.name for p in logdir.iterdir()) == [mode]
