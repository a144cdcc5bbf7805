"""Long runs must survive what happens to long runs: NaNs, preemption, bad inputs, several machines."""

import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from iaf_tf import data, hparams, train
from tests.helpers import scalar_series

ROOT = Path(__file__).resolve().parents[1]
TINY = "depth=1,num_blocks=1,h_size=8,z_size=4,batch_size=4,num_gpus=1,learning_rate=0.002"


def _env(**extra):
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **extra)


def _cli(args, **kwargs):
    return subprocess.run([sys.executable, str(ROOT / "bin" / "iaf.py"), *args], capture_output=True, text=True,
                          env=kwargs.pop("env", _env()), timeout=kwargs.pop("timeout", 300), **kwargs)


def _latest_step(train_dir):
    latest = tf.train.latest_checkpoint(str(train_dir))
    return -1 if latest is None else int(latest.rsplit("-", 1)[1])


def _poisoned_trainer(hps, poison):
    """A trainer whose loss is multiplied by `poison` (a variable the test sets to NaN or 1)."""
    trainer = train.Trainer(hps, tf.distribute.get_strategy(), seed=0)
    model_call = trainer.model.call

    def call(*args, **kwargs):
        out = model_call(*args, **kwargs)
        if not kwargs.get("init"):
            out = dict(out, objective=out["objective"] * poison)
        return out

    trainer.model.call = call
    return trainer


# ---------------------------------------------------------------- non-finite steps

def test_non_finite_steps_change_nothing_are_counted_and_training_goes_on(tmp_path, cifar10_dir):
    hps = hparams.get_default_hparams().parse(TINY).replace(max_skips=3)
    poison = tf.Variable(1.0, trainable=False)
    trainer = _poisoned_trainer(hps, poison)
    lines = []
    config = train.TrainConfig(logdir=str(tmp_path), max_steps=2, data_dir=str(cifar10_dir), print_fn=lines.append)
    train.train(hps, config, trainer=trainer)

    def state():
        slots = [s.numpy().copy() for v in trainer.variables for s in trainer.optimizer.slots_for(v)]
        return ([v.numpy().copy() for v in trainer.variables], slots,
                [s.numpy().copy() for s in trainer.averages.shadows], int(trainer.optimizer.iterations.numpy()))

    before = state()
    poison.assign(float("nan"))
    config.max_steps = 4  # two poisoned steps: skipped, fewer than max_skips
    result = train.train(hps, config, trainer=trainer)
    after = state()
    for old, new in zip(before[:3], after[:3]):
        for a, b in zip(old, new):
            np.testing.assert_array_equal(a, b)
    assert after[3] == before[3] == 2  # applied updates did not move
    assert result["skipped"] == 2 and int(trainer.step.numpy()) == 4
    assert any("non-finite loss or gradient, update skipped (2 in a row, 2 in all)" in line for line in lines)

    poison.assign(1.0)
    config.max_steps = 6
    result = train.train(hps, config, trainer=trainer)
    assert int(trainer.optimizer.iterations.numpy()) == 4 and result["skipped"] == 2
    assert not np.array_equal(state()[0][0], after[0][0])

    # The skip counter is in TensorBoard.
    assert max(scalar_series(tmp_path / "train", "train/skipped_steps").values()) == 2


def test_stops_after_max_skips_consecutive_non_finite_steps_with_a_usable_checkpoint(tmp_path, cifar10_dir):
    hps = hparams.get_default_hparams().parse(TINY).replace(max_skips=3)
    poison = tf.Variable(1.0, trainable=False)
    trainer = _poisoned_trainer(hps, poison)
    config = train.TrainConfig(logdir=str(tmp_path), max_steps=2, data_dir=str(cifar10_dir), print_fn=lambda s: None)
    train.train(hps, config, trainer=trainer)
    good = [v.numpy().copy() for v in trainer.variables]
    poison.assign(float("inf"))
    config.max_steps = 0  # would run forever but for the stop
    with pytest.raises(train.NonFiniteError, match="3 consecutive steps had a non-finite loss"):
        train.train(hps, config, trainer=trainer)
    assert _latest_step(tmp_path / "train") == 5
    fresh = train.Trainer(hps, tf.distribute.get_strategy())
    fresh.checkpoint.restore(tf.train.latest_checkpoint(tmp_path / "train")).assert_consumed()
    for a, b in zip(good, fresh.variables):
        np.testing.assert_array_equal(a, b.numpy())
    assert int(fresh.skipped.numpy()) == 3


def test_grad_clip_limits_the_applied_gradient(tmp_path, cifar10_dir):
    hps = hparams.get_default_hparams().parse(TINY).replace(grad_clip=1e-3)
    trainer = train.Trainer(hps, tf.distribute.get_strategy(), seed=0)
    train.train(hps, train.TrainConfig(logdir=str(tmp_path), max_steps=1, data_dir=str(cifar10_dir),
                                       print_fn=lambda s: None), trainer=trainer)
    applied = [trainer.optimizer.slots_for(v)[0].numpy() / 0.1 for v in trainer.variables]
    assert np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in applied)) == pytest.approx(1e-3, rel=1e-3)


# ---------------------------------------------------------------- preemption

def _start_training(logdir, cifar10_dir, *extra):
    args = [sys.executable, str(ROOT / "bin" / "iaf.py"), "--mode", "train", "--hpconfig", TINY, "--num_gpus", "1",
            "--logdir", str(logdir), "--data_dir", str(cifar10_dir), *extra]
    return subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_at_the_current_step_and_exits_0(tmp_path, cifar10_dir):
    proc = _start_training(tmp_path, cifar10_dir, "--checkpoint_every", "100000", "--summary_every", "1")
    try:
        deadline = time.time() + 120
        while _latest_step(tmp_path / "train") < 0 and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(3)  # some steps past the step-0 checkpoint
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    last = [line for line in out.splitlines() if line.startswith("Stopped at step ")][-1]
    step = int(last.split()[3])
    assert "(signal SIGTERM)" in last and step > 0
    assert _latest_step(tmp_path / "train") == step


@pytest.mark.slow
def test_sigkill_at_any_moment_never_leaves_an_unreadable_checkpoint(tmp_path, cifar10_dir):
    """Checkpoints every step, so kills land during writes; every restart must resume."""
    rng = np.random.RandomState(0)
    last_step = -1
    for attempt in range(4):
        proc = _start_training(tmp_path, cifar10_dir, "--checkpoint_every", "1", "--summary_every", "1000")
        deadline = time.time() + 120
        while _latest_step(tmp_path / "train") <= last_step and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()
        proc.communicate(timeout=30)
        step = _latest_step(tmp_path / "train")
        assert step >= last_step
        reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(tmp_path / "train"))
        assert int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")) == step
        last_step = step
    done = _cli(["--mode", "train", "--hpconfig", TINY, "--num_gpus", "1", "--logdir", str(tmp_path),
                 "--data_dir", str(cifar10_dir), "--max_steps", str(last_step + 2)])
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"at step {last_step}" in done.stdout and f"Iteration {last_step + 1}," in done.stdout


# ---------------------------------------------------------------- bad inputs

# TensorFlow's C++ runtime logs a few lines at start-up that no environment setting silences.
_TF_RUNTIME_LOG = re.compile(r"^([IWE]\d{4} \d\d:\d\d:\d\d|WARNING: All log messages before absl::InitializeLog)")


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.strip() and not _TF_RUNTIME_LOG.match(line)]


def _assert_clean_failure(done, logdir, *needles):
    assert done.returncode != 0
    errors = _error_lines(done.stderr)
    assert len(errors) == 1 and errors[0].startswith("error: "), done.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert not Path(logdir).exists() or not any(Path(logdir).rglob("*")), sorted(Path(logdir).rglob("*"))


def _train_args(logdir, *extra):
    return ["--mode", "train", "--num_gpus", "1", "--logdir", str(logdir), "--max_steps", "1", *extra]


def test_unknown_hpconfig_key(tmp_path):
    done = _cli(_train_args(tmp_path / "run", "--hpconfig", "dpeth=3"))
    _assert_clean_failure(done, tmp_path / "run", "unknown hparam 'dpeth'", "valid keys: ", "depth")


def test_ill_typed_hpconfig_value(tmp_path):
    done = _cli(_train_args(tmp_path / "run", "--hpconfig", "h_size=big"))
    _assert_clean_failure(done, tmp_path / "run", "h_size", "big")


def test_missing_preset(tmp_path):
    done = _cli(_train_args(tmp_path / "run", "--preset", "nope"))
    _assert_clean_failure(done, tmp_path / "run", "unknown preset 'nope'", "readme_recipe")


def test_missing_cifar10(tmp_path):
    done = _cli(_train_args(tmp_path / "run", "--hpconfig", TINY), env=_env(CIFAR10_PATH=str(tmp_path / "none")))
    _assert_clean_failure(done, tmp_path / "run", str(tmp_path / "none"), "CIFAR10_PATH")


def test_cifar10_path_pointing_at_the_wrong_folder(tmp_path):
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "readme.txt").write_text("not CIFAR")
    done = _cli(_train_args(tmp_path / "run", "--hpconfig", TINY), env=_env(CIFAR10_PATH=str(tmp_path / "wrong")))
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
    done = _cli(_train_args(tmp_path / "run", "--hpconfig", TINY), env=_env(CIFAR10_PATH=str(copy)))
    _assert_clean_failure(done, tmp_path / "run", name)


def test_image_size_that_does_not_fit_the_data(tmp_path, cifar10_dir):
    done = _cli(_train_args(tmp_path / "run", "--hpconfig", TINY + ",image_size=64", "--data_dir", str(cifar10_dir)))
    _assert_clean_failure(done, tmp_path / "run", "uint8 [N, 64, 64, 3]", "image_size")


def test_check_images_rejects_wrong_arrays():
    with pytest.raises(data.DataError, match="uint8"):
        data.check_images(np.zeros([2, 32, 32, 3], np.float32), 32)
    with pytest.raises(data.DataError, match=r"\[N, 32, 32, 3\]"):
        data.check_images(np.zeros([2, 32, 32, 1], np.uint8), 32)
    data.check_images(np.zeros([2, 32, 32, 3], np.uint8), 32)


@pytest.mark.slow
def test_checkpoint_from_another_configuration_names_each_variable(tmp_path, cifar10_dir):
    first = _cli(_train_args(tmp_path, "--hpconfig", TINY, "--data_dir", str(cifar10_dir)))
    assert first.returncode == 0, first.stderr[-2000:]
    before = sorted(p.name for p in (tmp_path / "train").iterdir())
    done = _cli(_train_args(tmp_path, "--hpconfig", TINY + ",h_size=16", "--data_dir", str(cifar10_dir),
                            "--max_steps", "5"))
    assert done.returncode != 0
    errors = _error_lines(done.stderr)
    assert len(errors) == 1 and "written by another configuration" in errors[0], done.stderr[-2000:]
    assert "x_enc.SV" in errors[0] and "[5, 5, 3, 8] in the checkpoint but [5, 5, 3, 16] in the model" in errors[0]
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == before  # nothing written


def test_logdir_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    done = _cli(_train_args(blocker / "run", "--hpconfig", TINY))
    _assert_clean_failure(done, blocker / "run", "cannot be created", "is a file")


def test_more_gpus_than_present(tmp_path):
    done = _cli(_train_args(tmp_path / "run", "--hpconfig", TINY, "--num_gpus", "4"))
    _assert_clean_failure(done, tmp_path / "run", "--num_gpus=4", "no GPU")


# ---------------------------------------------------------------- determinism

@pytest.mark.slow
def test_two_runs_with_the_same_seed_give_identical_losses(tmp_path, cifar10_dir):
    losses = []
    for run in range(2):
        done = _cli(["--mode", "train", "--hpconfig", TINY, "--num_gpus", "1", "--logdir", str(tmp_path / str(run)),
                     "--data_dir", str(cifar10_dir), "--seed", "7", "--max_steps", "20", "--summary_every", "1"])
        assert done.returncode == 0, done.stderr[-2000:]
        losses.append([line.split("bits_per_dim = ")[1] for line in done.stdout.splitlines()
                       if line.startswith("Iteration ")])
        assert len(losses[-1]) == 20
    assert losses[0] == losses[1]
    # And the per-step summaries agree to the last bit.
    values = [scalar_series(tmp_path / str(run) / "train", "model/bits_per_dim") for run in range(2)]
    assert len(values[0]) == 20 and values[0] == values[1]


# ---------------------------------------------------------------- several machines

def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_two_workers_on_localhost_train_in_lockstep_and_only_the_chief_writes(tmp_path, cifar10_dir):
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    logdir = tmp_path / "run"  # shared, as on a shared file system
    procs = []
    try:
        for index in range(2):
            tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            procs.append(subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "multi_worker_job.py"), str(logdir), str(cifar10_dir), TINY,
                 str(tmp_path / f"weights{index}.npz")],
                env=_env(TF_CONFIG=tf_config), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    weights = [np.load(tmp_path / f"weights{i}.npz") for i in range(2)]
    assert len(weights[0].files) > 10
    for name in weights[0].files:
        np.testing.assert_array_equal(weights[0][name], weights[1][name], err_msg=name)
    assert _latest_step(logdir / "train") == 3
    assert len(list((logdir / "train").glob("events.*"))) == 1  # the chief's summaries only
    assert not list((logdir / "train").glob(".worker*"))  # the other worker's saves were cleaned up
    assert "Stopped at step 3" in outputs[0][0] and "Stopped at step 3" not in outputs[1][0]
