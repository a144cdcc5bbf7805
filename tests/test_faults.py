"""Faults a user or an unlucky operator meets (issue 23), each through the user's entry point: the command
(in-process through cli.main, or as processes where the process is the point), iaf_tf.load, or the
SavedModel in a process without iaf_tf. Each ends as README promises: one `error:` line and the
documented exit code, nothing written or left behind, no checkpoint changed."""

import json
import math
import os
import shutil
import socket
import subprocess
import warnings

import numpy as np
import pytest
import tensorflow as tf

import iaf_tf
from iaf_tf import cli, devices, run_record
from iaf_tf.checkpoints import TrainState
from iaf_tf.errors import ArgumentError
from tests.fixtures import (ONE_BLOCK, cli_command, cli_env, cli_flags, error_lines, run_cli, run_main, snapshot,
                            tiny_config, without_iaf_tf)


@pytest.fixture
def main(capsys, monkeypatch):
    """bin/iaf.py in this process: run(*args) -> (exit code, stdout lines, stderr lines without TensorFlow's
    log). This process's CPU is set up already (conftest.py), so the command's own set-up is skipped."""
    monkeypatch.setattr(devices, "configure_cpu", lambda *_, **__: None)

    def run(*args):
        code = cli.main(["iaf.py"], cli_flags(*args))
        out = capsys.readouterr()
        return code, out.out.splitlines(), error_lines(out.err)

    return run


def _checkpoint_files(train_dir):
    return {k: v for k, v in snapshot(train_dir).items() if "ckpt-" in k or k == "checkpoint"}


def _write_run(logdir, steps=(2, 4), poison=None):
    """A run folder with native checkpoints at `steps` (weights moved between them) and its record.
    poison: a step whose moving averages are NaN."""
    cfg = tiny_config(ONE_BLOCK)
    state = TrainState(cfg)
    manager = tf.train.CheckpointManager(state.checkpoint, str(logdir / "train"), max_to_keep=None)
    for step in steps:
        state.step.assign(step)
        for var in state.variables:
            var.assign_add(tf.fill(var.shape, 0.001))
            state.averages.shadow_for(var).assign(var if step != poison else tf.fill(var.shape, math.nan))
        manager.save(checkpoint_number=step)
    run_record.write(str(logdir / "train"), cfg)
    return logdir


@pytest.fixture(scope="module")
def two_checkpoint_run(tmp_path_factory):
    return _write_run(tmp_path_factory.mktemp("faults") / "run")


@pytest.fixture
def small_disk(tmp_path):
    """make(free_bytes): a folder on a 2 MiB tmpfs with about that much room left."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")

    def make(free_bytes):
        with open(mount / "filler", "wb", buffering=0) as filler:
            try:
                while True:
                    filler.write(b"\0" * 4096)
            except OSError:
                pass
        os.truncate(mount / "filler", max(0, os.path.getsize(mount / "filler") - free_bytes))
        return mount

    yield make
    subprocess.run(["umount", str(mount)], check=False)


def _only_filler(mount):
    return sorted(p.name for p in mount.iterdir()) == ["filler"]


def _disk_full_line(lines):
    assert len(lines) == 1 and lines[0].startswith("error: no space left on the device of --logdir"), lines


# ---------------------------------------------------------------- 1. several machines from the command line

def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _weights(prefix):
    reader = tf.train.load_checkpoint(str(prefix))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name.startswith(("model/", "averages/", "optimizer/"))}


@pytest.mark.slow
@pytest.mark.parametrize("jit_compile", ["false", "true"])
@pytest.mark.e2e
def test_two_workers_of_the_documented_command_train_as_one_two_replica_job(jit_compile, tmp_path, cifar10_dir):
    """BUILD.md's command, two processes of bin/iaf.py on localhost: they train in lockstep (the chief's
    checkpoint equals a one-process run of two replicas), and only the chief writes."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    args = ["--mode", "train", "--num_gpus", "1", "--hpconfig", f"{ONE_BLOCK},jit_compile={jit_compile}",
            "--max_steps", 3, "--checkpoint_every", 2, "--summary_every", 1, "--image_every", 0]
    logdir = tmp_path / "run"  # shared, as on a shared file system
    procs = []
    try:
        for index in range(2):
            tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            procs.append(subprocess.Popen(
                cli_command([*args, "--strategy", "multi_worker", "--logdir", logdir]),
                env=cli_env(TF_CONFIG=tf_config, CIFAR10_PATH=str(cifar10_dir)),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        # Meanwhile, in this process, the same job as one process of two replicas: what they are compared to.
        one_process = run_main([*args, "--num_gpus", 2, "--cpu_replicas", 2, "--logdir", tmp_path / "mirrored"],
                               CIFAR10_PATH=cifar10_dir)
        outputs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert one_process.returncode == 0, one_process.stderr[-3000:]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    train_dir = logdir / "train"
    assert sorted(p.name for p in train_dir.glob("ckpt-*.index")) == ["ckpt-0.index", "ckpt-2.index", "ckpt-3.index"]
    assert len(list(train_dir.glob("events.*"))) == 1  # the chief's summaries only
    assert not list(train_dir.glob(".worker*"))  # the other worker's saves were cleaned up
    assert "Stopped at step 3" in outputs[0][0] and "Stopped at step 3" not in outputs[1][0]
    workers, mirrored = _weights(train_dir / "ckpt-3"), _weights(tmp_path / "mirrored" / "train" / "ckpt-3")
    assert len(workers) > 10 and workers.keys() == mirrored.keys()
    # Two processes and one split their work differently over threads: measured up to 8.4e-5 relative (an
    # Adamax slot, jit_compile off).
    for name, value in workers.items():
        np.testing.assert_allclose(value, mirrored[name], rtol=1e-3, atol=1e-5, err_msg=name)


# ---------------------------------------------------------------- 2. lost .index files

def test_a_run_whose_index_files_are_lost_is_refused_not_started_afresh(main, two_checkpoint_run, tmp_path,
                                                                       cifar10_dir):
    logdir = tmp_path / "run"
    shutil.copytree(two_checkpoint_run, logdir)
    for index in (logdir / "train").glob("*.index"):
        index.unlink()
    before = snapshot(logdir)
    code, out, err = main("--mode", "train", "--logdir", logdir, "--max_steps", 6,
                           "--data_dir", cifar10_dir)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: none of the checkpoints in {logdir / 'train'} can be read: ckpt-4 (its .index "
                             "file is missing); ckpt-2 (its .index file is missing)")
    assert "Initializing parameters." not in out
    assert snapshot(logdir) == before  # not even a lock file


# ---------------------------------------------------------------- 3, 7, 10. a full disk

def test_a_full_disk_while_sampling_leaves_nothing(main, two_checkpoint_run, small_disk):
    mount = small_disk(64 * 1024)  # room for the PNG, not for the 196 KB .npy of 64 samples
    code, _, err = main("--mode", "sample", "--checkpoint", two_checkpoint_run, "--logdir",
                         mount / "run", "--num_samples", 64)
    assert code == 2
    _disk_full_line(err)
    assert _only_filler(mount)


def test_a_full_disk_while_converting_leaves_nothing(main, reference_dir, small_disk):
    mount = small_disk(1024 * 1024)  # the reference's native checkpoint is 5.6 MB
    code, _, err = main("--mode", "convert", "--checkpoint", reference_dir, "--logdir", mount / "run")
    assert code == 2
    _disk_full_line(err)
    assert _only_filler(mount)


def test_a_full_disk_while_exporting_leaves_nothing(main, two_checkpoint_run, small_disk):
    mount = small_disk(32 * 1024)
    code, _, err = main("--mode", "export", "--checkpoint", two_checkpoint_run, "--logdir", mount / "run")
    assert code == 2
    _disk_full_line(err)
    assert _only_filler(mount)


def test_a_full_disk_while_evaluating_leaves_nothing(main, two_checkpoint_run, small_disk, cifar10_dir):
    mount = small_disk(8 * 1024)
    code, out, err = main("--mode", "eval_test", "--once", "--checkpoint", two_checkpoint_run, "--logdir",
                           mount / "run", "--num_images", 8, "--data_dir", cifar10_dir)
    assert code == 2 and any(line.startswith("Step: 4 Score: ") for line in out)
    _disk_full_line(err)
    assert _only_filler(mount)


def test_an_export_is_never_replaced(main, two_checkpoint_run, tmp_path):
    logdir = tmp_path / "run"
    shutil.copytree(two_checkpoint_run, logdir)
    assert main("--mode", "export", "--logdir", logdir)[0] == 0
    before = snapshot(logdir / "export")
    _write_run(logdir, steps=(4,))  # other weights under the same step
    code, _, err = main("--mode", "export", "--logdir", logdir)
    assert code == 2 and err == [f"error: {logdir / 'export' / 'step-4'} already exists: an export is never "
                                 "replaced; remove it to export again, or use another --logdir"]
    assert snapshot(logdir / "export") == before


# ---------------------------------------------------------------- 4, 8. the API's and the SavedModel's arguments

@pytest.fixture(scope="module")
def loaded(two_checkpoint_run):
    return iaf_tf.load(two_checkpoint_run)


@pytest.mark.parametrize("images,message", [
    (np.zeros([2, 32, 32, 3], np.float32), r"images must be uint8 images \[N, 32, 32, 3\] with N >= 1 .*got float32 "
                                           r"\[2, 32, 32, 3\]; from floats in \[0, 1\]: \(x \* 255\)"),
    (np.zeros([2, 32, 32, 3], np.int64), r"got int64 \[2, 32, 32, 3\]$"),
    (np.zeros([2, 28, 28, 1], np.uint8), r"images must be uint8 images \[N, 32, 32, 3\].* got shape \[2, 28, 28, 1\]"),
    (np.zeros([2, 32, 32, 1], np.uint8), r"got shape \[2, 32, 32, 1\]"),
    (np.zeros([0, 32, 32, 3], np.uint8), r"got shape \[0, 32, 32, 3\]"),
])
def test_the_api_refuses_images_it_would_score_wrongly(loaded, images, message):
    for method in (loaded.nll, loaded.reconstruct, loaded.encode, loaded.bits_per_dim):
        with pytest.raises(ArgumentError, match=message):
            method(images)


@pytest.mark.parametrize("call,message", [
    (lambda m, images: m.nll(images, k=-1), r"k must be a whole number of importance samples, 1 or more; got -1"),
    (lambda m, images: m.nll(images, k=0), r"got 0$"),
    (lambda m, images: m.nll(images, k=2.5), r"got 2.5$"),
    (lambda m, _: m.sample(0), r"num_images must be a whole number of images, 1 or more; got 0"),
    (lambda m, _: m.sample(-2), r"got -2$"),
    (lambda m, _: m.sample(2, temperature=math.nan), r"temperature must be a finite number, 0 or more .*got nan"),
    (lambda m, _: m.sample(2, temperature=-1.0), r"got -1.0$"),
])
def test_the_api_refuses_bad_counts_and_temperatures(loaded, call, message):
    with pytest.raises(ArgumentError, match=message):
        call(loaded, np.zeros([2, 32, 32, 3], np.uint8))


@pytest.mark.e2e
def test_the_saved_models_signatures_check_their_arguments_without_iaf_tf(main, two_checkpoint_run, tmp_path):
    assert main("--mode", "export", "--checkpoint", two_checkpoint_run, "--logdir", tmp_path)[0] == 0
    script = ("import json, numpy as np, tensorflow as tf\n"
              f"m = tf.saved_model.load({str(tmp_path / 'export' / 'step-4')!r})\n"
              "def attempt(name, **arguments):\n"
              "    try:\n"
              "        m.signatures[name](**{k: tf.constant(v) for k, v in arguments.items()})\n"
              "        return 'ok'\n"
              "    except Exception as e:\n"
              "        return type(e).__name__ + ': ' + str(e)\n"
              "seed = np.int64(0)\n"
              "print(json.dumps([\n"
              "    attempt('score', images=np.zeros([2, 28, 28, 1], np.uint8), seed=seed),\n"
              "    attempt('score', images=np.zeros([2, 32, 32, 3], np.float32), seed=seed),\n"
              "    attempt('score', images=np.zeros([0, 32, 32, 3], np.uint8), seed=seed),\n"
              "    attempt('sample', num_images=np.int32(0), temperature=np.float32(1), seed=seed),\n"
              "    attempt('sample', num_images=np.int32(-2), temperature=np.float32(1), seed=seed),\n"
              "    attempt('sample', num_images=np.int32(2), temperature=np.float32('nan'), seed=seed),\n"
              "    attempt('sample', num_images=np.int32(2), temperature=np.float32(-1), seed=seed),\n"
              "    attempt('sample', num_images=np.int32(2), temperature=np.float32(1), seed=seed)]))\n")
    results = without_iaf_tf(script)
    wrong_shape, wrong_dtype, no_images, none, negative, nan, cold, fine = results
    for refused in (wrong_shape, no_images):
        assert refused.startswith("InvalidArgumentError") and "images must be uint8 [N, 32, 32, 3] with N >= 1" in \
            refused, refused
    assert wrong_dtype.startswith(("TypeError", "ValueError", "InvalidArgumentError")) and "uint8" in wrong_dtype, \
        wrong_dtype
    for refused in (none, negative):
        assert refused.startswith("InvalidArgumentError") and "num_images must be a positive number" in refused
    assert nan.startswith("InvalidArgumentError") and "temperature must be finite" in nan
    assert cold.startswith("InvalidArgumentError") and "temperature must be 0 or more" in cold
    assert fine == "ok"


# ---------------------------------------------------------------- 5. a corrupt newest checkpoint, everywhere

def _break_newest(train_dir, fault):
    """Returns (the unreadable checkpoint, the step every mode must use instead)."""
    if fault == "truncated .data":
        data = train_dir / "ckpt-4.data-00000-of-00001"
        data.write_bytes(data.read_bytes()[:100])
        return train_dir / "ckpt-4", 2
    if fault == "garbage .index":
        (train_dir / "ckpt-4.index").write_bytes(b"garbage" * 20)
        return train_dir / "ckpt-4", 2
    (train_dir / "model.ckpt-100").write_text("not a checkpoint\n")
    return train_dir / "model.ckpt-100", 4


def _skip_warning(lines, bad):
    [warning] = [line for line in lines if line.startswith(f"warning: {bad} is unreadable (")]
    return warning


@pytest.mark.parametrize("fault", ["truncated .data", "garbage .index", "a text file named model.ckpt-100"])
def test_a_corrupt_newest_checkpoint_gives_every_mode_the_same_checkpoint_and_warning(main, fault, two_checkpoint_run,
                                                                                    tmp_path, cifar10_dir):
    logdir = tmp_path / "run"
    shutil.copytree(two_checkpoint_run, logdir)
    bad, good = _break_newest(logdir / "train", fault)
    before = _checkpoint_files(logdir / "train")
    said = {}
    code, out, err = main("--mode", "eval_test", "--once", "--logdir", logdir, "--num_images", 8,
                           "--data_dir", cifar10_dir)
    assert code == 0 and err == [] and f"Step: {good} Score:" in "\n".join(out), err
    said["eval_test --once"] = _skip_warning(out, bad)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert iaf_tf.load(logdir).step == good
    said["iaf_tf.load"] = _skip_warning([str(w.message) for w in caught], bad)
    if fault == "truncated .data":  # the other modes, once
        code, out, err = main("--mode", "eval_test", "--logdir", logdir, "--num_images", 8, "--data_dir",
                               cifar10_dir, "--poll_seconds", 0.1, "--wait_seconds", 0.1)  # watching
        assert code == 0 and err == [] and sum(line.startswith("Step: ") for line in out) == 1, err
        assert f"Step: {good} Score:" in "\n".join(out)
        said["eval_test"] = _skip_warning(out, bad)
        code, out, err = main("--mode", "sample", "--logdir", logdir, "--num_samples", 2)
        assert code == 0 and err == [] and (logdir / "sample" / f"samples-{good}-t1.npy").is_file(), err
        said["sample"] = _skip_warning(out, bad)
        code, out, err = main("--mode", "export", "--logdir", logdir)
        assert code == 0 and err == [] and (logdir / "export" / f"step-{good}" / "saved_model.pb").is_file(), err
        said["export"] = _skip_warning(out, bad)
        code, out, err = main("--mode", "train", "--logdir", logdir, "--max_steps", good, "--data_dir",
                               cifar10_dir)  # resume, nothing to train
        assert code == 0 and err == [] and f"Resumed from {logdir / 'train'}/ckpt-{good} at step {good}" in out, err
        said["train"] = _skip_warning(out, bad)
    assert len(set(said.values())) == 1, said
    assert _checkpoint_files(logdir / "train") == before


def test_a_corrupt_newest_tf1_checkpoint_is_skipped_by_the_converter(main, reference_dir, tmp_path):
    shutil.copytree(reference_dir, tmp_path / "tf1")
    (tmp_path / "tf1" / "model.ckpt-9999").write_text("not a checkpoint\n")
    code, out, err = main("--mode", "convert", "--checkpoint", tmp_path / "tf1", "--logdir",
                           tmp_path / "converted")
    assert code == 0 and err == [], err
    _skip_warning(out, tmp_path / "tf1" / "model.ckpt-9999")
    assert f"wrote {tmp_path / 'converted' / 'train' / 'ckpt-3000'}" in out


# ---------------------------------------------------------------- 6. absl's own flag errors

@pytest.mark.e2e
@pytest.mark.parametrize("flag,message", [
    ("--max_steps=abc", "error: flag --max_steps=abc: invalid literal for int() with base 10: 'abc'; see iaf.py "
                        "--helpfull"),
    ("--mode=evaluate", "error: flag --mode=evaluate: value should be one of <train|eval_test|eval_train|eval_valid|"
                        "sample|export|convert>; see iaf.py --helpfull"),
])
def test_a_flag_absl_cannot_parse_is_one_error_line_and_exit_2(flag, message, tmp_path):
    done = run_cli(["--logdir", tmp_path / "run", flag])
    assert done.returncode == 2 and error_lines(done.stderr) == [message], done.stderr[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.e2e
def test_helpfull_lists_the_flags_and_exits_0():
    done = run_cli(["--helpfull"])
    assert done.returncode == 0 and "--mode" in done.stdout and "--hpconfig" in done.stdout, done.stderr[-2000:]


# ---------------------------------------------------------------- 9. checked before anything is written

def test_a_tf1_checkpoint_of_another_config_is_refused_before_anything_is_written(main, reference_dir, tmp_path,
                                                                                 cifar10_dir):
    code, _, err = main("--mode", "train", "--checkpoint", reference_dir, "--logdir", tmp_path / "new",
                         "--hpconfig", "depth=2,num_blocks=2,h_size=16,z_size=8,num_gpus=1", "--data_dir", cifar10_dir)
    assert code == 2 and len(err) == 1 and "h_size" in err[0], err
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- 11. what the messages say

def test_steps_skipped_by_skip_threshold_are_said_to_be(main, tmp_path, cifar10_dir):
    code, _, err = main("--mode", "train", "--logdir", tmp_path, "--hpconfig",
                         f"{ONE_BLOCK},skip_threshold=1e-9,max_skips=2", "--max_steps", 5, "--image_every", 0,
                         "--data_dir", cifar10_dir)
    assert code == 3 and len(err) == 1, err
    assert ("2 consecutive steps had a non-finite loss or gradient or gradient norm over skip_threshold "
            "(max_skips=2)") in err[0]
    assert err[0].endswith("Try a higher skip_threshold, a lower learning_rate or grad_clip>0 in --hpconfig."), err[0]


@pytest.mark.parametrize("mode", ["sample", "export"])
def test_sample_and_export_of_non_finite_weights_exit_3_like_eval(main, mode, tmp_path):
    logdir = _write_run(tmp_path / "run", steps=(2,), poison=2)
    before = snapshot(logdir)
    code, _, err = main("--mode", mode, "--logdir", logdir)
    assert code == 3 and len(err) == 1, err
    assert err[0].startswith(f"error: the moving-average weights of {logdir / 'train' / 'ckpt-2'} are not finite")
    assert snapshot(logdir) == before
