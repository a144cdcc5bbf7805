"""iaf_tf.train: the objective (free bits, loss_fn), the step on one or two replicas, and the loop: it lowers
the loss of every variant and dataset, writes summaries, and survives what happens to long runs (NaNs,
preemption, several machines); mixed precision and XLA against the float32 default."""

import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from iaf_tf import checkpoints, config, data, datasets, distribute, optim, run_record, train
from iaf_tf.config import Config, load_preset
from iaf_tf.errors import CheckpointError, NonFiniteError
from iaf_tf.files import RunLock
from iaf_tf.likelihood import Evaluator
from iaf_tf.model import CVAE
from iaf_tf.train import free_bits_kl
from tests.fixtures import (ONE_BLOCK, POSTERIORS, TWO_BLOCKS_PER_LEVEL, cli_env, cli_flags,
                            error_lines, grey_images, latest_step, random_images, read_events, read_expected,
                            run_cli, run_main, run_model, scalar_series, seed, snapshot, start_cli, tiny_config,
                            train_args)


def _quiet(_line):
    pass


# ---------------------------------------------------------------- the objective


def test_free_bits_kl_without_floor_is_per_image_sum():
    rng = np.random.default_rng(0)
    kl = rng.normal(0.1, 0.2, size=[5, 4, 4, 3]).astype(np.float32)
    np.testing.assert_allclose(free_bits_kl(tf.constant(kl), 0.0).numpy(),
                               kl.astype(np.float64).sum(axis=(1, 2, 3)), rtol=1e-5)


@pytest.mark.parametrize("kl_min", [0.1, 0.5, 2.0])
def test_free_bits_kl_floors_batch_mean_per_channel(kl_min):
    rng = np.random.default_rng(1)
    kl = rng.normal(0.02, 0.05, size=[5, 4, 4, 6])
    kl[..., :2] += 0.3  # some channels above the floor, others below
    got = free_bits_kl(tf.constant(kl, tf.float32), kl_min).numpy()
    per_channel = kl.sum(axis=(1, 2)).mean(axis=0)
    want = np.maximum(per_channel, kl_min).sum()
    assert got.shape == (5,)
    np.testing.assert_allclose(got, np.full(5, want), rtol=1e-5)


def test_loss_fn_is_the_original_objective_and_its_summaries(tiny_model):
    images, step_seed = random_images(3, 3), seed(4)
    loss, metrics = train.loss_fn(tiny_model, images, step_seed, Config().objective)  # kl_min 0.25, k 1
    out = tiny_model(images, step_seed)
    kl_obj_layers = [free_bits_kl(m, 0.25).numpy().astype(np.float64) for m in out["kl_layers"]]
    kl_obj, kl, log_pxz = sum(kl_obj_layers), out["kl"].numpy(), out["log_pxz"].numpy()
    # The training objective of the original: summed over the batch.
    assert loss.shape == () and np.isfinite(loss.numpy())
    np.testing.assert_allclose(loss.numpy(), np.sum(kl_obj - log_pxz), rtol=1e-5)
    # The summaries are batch means.
    np.testing.assert_allclose(metrics["kl_obj"].numpy(), kl_obj.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["kl_cost"].numpy(), kl.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["log_pxz"].numpy(), -log_pxz.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["bits_per_dim"].numpy(), (kl - log_pxz).mean() / (np.log(2) * 3072),
                               rtol=1e-5)
    assert float(metrics["dec_log_stdv"]) == float(tiny_model.dec_log_stdv.numpy())
    for index, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        np.testing.assert_allclose(metrics[f"kl_obj_{i:02d}_{j:02d}"].numpy(), kl_obj_layers[index].mean(),
                                   rtol=1e-5)
        np.testing.assert_allclose(metrics[f"kl_cost_{i:02d}_{j:02d}"].numpy(),
                                   out["kl_layers"][index].numpy().sum(axis=(1, 2, 3)).mean(), rtol=1e-5)
    assert "nats_per_image" not in metrics


def test_loss_fn_reports_mnist_in_nats_per_image():
    cfg = tiny_config(ONE_BLOCK, "dataset=mnist")
    model = CVAE(cfg, datasets.get("mnist"))
    model.initialize(grey_images(4, 1), seed(0))
    _, metrics = train.loss_fn(model, grey_images(4, 2), seed(1), cfg.objective)
    out = model(grey_images(4, 2), seed(1))
    nll = (out["kl"] - out["log_pxz"]).numpy()
    np.testing.assert_allclose(metrics["nats_per_image"].numpy(), nll.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["bits_per_dim"].numpy(), nll.mean() / (np.log(2) * 784), rtol=1e-5)


# ---------------------------------------------------------------- the step


# xla_programs="on" is what a GPU runs without jit_compile: the update and the small programs compiled.
@pytest.mark.parametrize("kl_min, jit_compile, xla_programs", [(0.0, False, "off"), (0.5, False, "off"),
                                                               (0.5, False, "on"), (0.5, True, "auto")])
@pytest.mark.slow
def test_two_replicas_apply_the_average_of_per_replica_gradients(kl_min, jit_compile, xla_programs, cifar10_dir):
    cfg = tiny_config(ONE_BLOCK, num_gpus=2, kl_min=kl_min, seed=3, jit_compile=jit_compile,
                      xla_programs=xla_programs)
    strategy = distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])
    trainer = train.Trainer(cfg, strategy)
    images = data.load_cifar10("test", cifar10_dir)[:8]
    trainer.initialize(images)
    model, variables = trainer.model, trainer.state.variables

    # Each replica's gradient, computed on its own half with the noise seed that replica uses at step 0.
    expected = []
    for replica, half in enumerate((images[:4], images[4:])):
        with tf.GradientTape() as tape:
            loss, _ = train.loss_fn(model, tf.constant(half), tf.constant([3, replica], tf.int64), cfg.objective)
        expected.append(tape.gradient(loss, variables))

    batch = next(iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(images))))
    _, applied = trainer.train_step(batch)
    assert bool(applied)
    checked = 0
    for var, g0, g1 in zip(variables, *expected):
        if g0 is None:
            continue
        first_moment, _ = trainer.state.optimizer.slots_for(var)
        applied_grad = first_moment.numpy() / 0.1  # after one step the first moment is (1 - beta1) * grad
        np.testing.assert_allclose(applied_grad, (g0.numpy() + g1.numpy()) / 2, rtol=2e-4,
                                   atol=1e-4 * np.abs(g0.numpy()).max() + 1e-6, err_msg=var.path)
        checked += 1
    assert checked >= len(variables) - 3  # only the top block's last up-pass conv gets no gradient
    # The halves really differ, so an update from only one replica's gradient would have failed above.
    assert any(not np.allclose(a.numpy(), b.numpy(), rtol=1e-2) for a, b in zip(*expected) if a is not None)

    # A second step moves each device's copy of the averages towards the weights of before that step.
    shadows = [trainer.state.averages.shadow_for(var) for var in variables]
    before = [(shadow.numpy(), var.numpy()) for shadow, var in zip(shadows, variables)]
    assert bool(trainer.train_step(batch)[1])
    rate, moved = 1.0 - cfg.optimization.ema_decay, 0
    for shadow, (average, weight) in zip(shadows, before):
        copies = shadow.values
        assert len(copies) == 2
        for copy in copies:
            np.testing.assert_allclose(copy.numpy(), average - rate * (average - weight), rtol=1e-6, atol=1e-9)
        moved += not np.array_equal(copies[0].numpy(), average)
    # Not all of them: the top block's last up-pass conv has no update, and a change of 0.1% of a step can
    # round away in float32.
    assert moved > len(variables) // 2


def test_two_replica_trainers_of_different_shapes_in_one_process_both_step():
    # Each strategy's all-reduces have keys of their own (distribute.mirrored_strategy); with shared keys
    # the second model's first all-reduce failed with "Shape mismatch in the collective instance".
    images = random_images(8)
    for hpconfig in (ONE_BLOCK, ONE_BLOCK.replace("h_size=8", "h_size=12")):
        trainer = train.Trainer(tiny_config(hpconfig, num_gpus=2, cpu_replicas=2))
        assert trainer.num_replicas == 2
        trainer.initialize(images)
        strategy = trainer.strategy
        batch = next(iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(images))))
        _, applied = trainer.train_step(batch)
        assert bool(applied)


def _strategy(kind, monkeypatch):
    """Two replicas on this machine's two logical CPUs, or a MultiWorkerMirroredStrategy of one worker (its
    input path is the one two workers take; tests/test_faults.py runs two)."""
    if kind == "mirrored":
        return distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])
    monkeypatch.delenv("TF_CONFIG", raising=False)
    return tf.distribute.MultiWorkerMirroredStrategy()


@pytest.mark.parametrize("kind", ["mirrored", "multi_worker"])
def test_replica_batches_split_each_global_batch_in_replica_order(kind, cifar10_dir, monkeypatch):
    images = data.load_cifar10("test", cifar10_dir)[:64]
    strategy = _strategy(kind, monkeypatch)
    replicas = strategy.num_replicas_in_sync
    batches = distribute.replica_batches(strategy, images, batch_size=4, seed=3, start_step=5)
    expected = iter(data.train_dataset(images, 4 * replicas, seed=3, start_step=5))
    for _ in range(3):
        per_replica = strategy.experimental_local_results(next(batches))
        global_batch = next(expected).numpy()
        assert len(per_replica) == replicas == (2 if kind == "mirrored" else 1)
        np.testing.assert_array_equal(np.concatenate([b.numpy() for b in per_replica]), global_batch)


def _datasets_behind(obj, depth=0, seen=None):
    """Every tf.data.Dataset reachable from obj's attributes (a distributed iterator's per-worker and
    per-device pipelines), a few levels deep."""
    seen = set() if seen is None else seen
    if depth > 5 or id(obj) in seen or not hasattr(obj, "__dict__"):
        return []
    seen.add(id(obj))
    found = []
    for value in vars(obj).values():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, tf.data.Dataset):
                found.append(item)
            elif type(item).__module__.startswith("tensorflow"):
                found += _datasets_behind(item, depth + 1, seen)
    return found


@pytest.mark.parametrize("kind", ["mirrored", "multi_worker"])
def test_no_pipeline_behind_the_training_batches_autotunes(kind, cifar10_dir, monkeypatch):
    # tf.data's autotuning thread sleeps up to tens of seconds between wake-ups, and deleting an iterator
    # waits for it: the end of one two-replica run in four stalled 10-30 s in bin/iaf.py before this, and
    # of two workers' runs one in three, 4.5 s.
    images = data.load_cifar10("test", cifar10_dir)[:64]
    assert data.train_dataset(images, 8, seed=3).options().autotune.enabled is False
    strategy = _strategy(kind, monkeypatch)
    batches = distribute.replica_batches(strategy, images, batch_size=4, seed=3, start_step=5)
    next(batches)
    pipelines = _datasets_behind(batches)
    assert pipelines
    assert [d.options().autotune.enabled for d in pipelines] == [False] * len(pipelines)


# ---------------------------------------------------------------- the loop lowers the loss


@pytest.mark.slow
def test_training_lowers_the_loss_and_writes_summaries(tmp_path, cifar10_dir):
    # cpu_quick's layout, narrowed: the pace of the first 300 steps is the decoder scale's (below), not the width's.
    cfg = load_preset("cpu_quick").parse("h_size=8,z_size=4,batch_size=4").replace(
        logdir=str(tmp_path), max_steps=300, summary_every=20, checkpoint_every=100, seed=1, data_dir=str(cifar10_dir))
    lines = []
    result = train.train(cfg, print_fn=lines.append)
    assert result.step == 300 and result.status == "max_steps"
    assert any(line.startswith("Iteration 1, time = ") and "train bits_per_dim = " in line for line in lines)

    tags = {tag for tag, _ in read_events(tmp_path / "train")[0]}
    for tag in ["model/bits_per_dim", "model/dec_log_stdv", "model/kl_obj", "model/kl_cost", "model/log_pxz",
                "model/kl_obj_00_00", "model/kl_cost_01_01", "images_per_second"]:
        assert tag in tags, f"{tag} missing; found {sorted(tags)}"
    bpd = scalar_series(tmp_path / "train", "model/bits_per_dim")
    assert sorted(bpd) == list(range(20, 301, 20))
    # A fresh model is at ~10 bits/dim. Adamax moves each weight by at most learning_rate (0.002) a step,
    # so the decoder scale alone needs ~2000 steps to settle: measured 9.27 over steps 260-300, as at cpu_quick's
    # full width (which reaches 6.1 at 3000, bench/train_fidelity.py); the bound leaves room for seeds.
    assert bpd[20] > 9.8
    late = np.mean([bpd[s] for s in (260, 280, 300)])
    assert late < 9.5 and late < bpd[20] - 0.5
    assert all(bpd[s + 100] < bpd[s] for s in (20, 100, 200))
    assert all(v > 0 for v in scalar_series(tmp_path / "train", "images_per_second").values())
    assert result.skipped == 0


@pytest.mark.slow
def test_training_writes_pictures_of_the_moving_averages_every_image_every_steps(tmp_path, cifar10_dir):
    cfg = tiny_config(ONE_BLOCK, logdir=str(tmp_path), max_steps=4, image_every=2, data_dir=str(cifar10_dir))
    train.train(cfg, print_fn=_quiet)
    train_dir = tmp_path / "train"
    assert sorted(p.name for p in train_dir.glob("*.png")) == [
        "reconstructions-2.png", "reconstructions-4.png", "samples-2.png", "samples-4.png"]
    side = 4 * (6 * 33 - 1)  # 36 pictures in a 6x6 grid, enlarged 4x
    for name in ("reconstructions", "samples"):
        png = tf.io.decode_png((train_dir / f"{name}-4.png").read_bytes()).numpy()
        assert png.shape == (side, side, 3) and png.std() > 0
    # The reconstructions' even tiles are the first training images.
    recon = tf.io.decode_png((train_dir / "reconstructions-2.png").read_bytes()).numpy()[::4, ::4]
    np.testing.assert_array_equal(recon[:32, :32], data.load_cifar10("train", cifar10_dir)[0])
    assert {("samples", 2), ("reconstructions", 4)} <= set(read_events(train_dir)[1])


@pytest.mark.slow
@pytest.mark.parametrize("posterior", POSTERIORS)
def test_each_posterior_trains(posterior, cifar10_dir):
    cfg = tiny_config(extra=f"posterior={posterior}", batch_size=8)
    images = data.load_cifar10("train", cifar10_dir)
    trainer = train.Trainer(cfg, tf.distribute.get_strategy())
    batches = iter(data.train_dataset(images, cfg.optimization.batch_size, seed=0))
    trainer.initialize(next(batches).numpy())
    bpd, objective = [], []
    for _ in range(200):
        metrics, applied = trainer.train_step(next(batches))
        assert bool(applied), "a step had a non-finite loss or gradient"
        values = {k: float(v) for k, v in metrics.items()}
        assert all(np.isfinite(v) for v in values.values()), values
        bpd.append(values["bits_per_dim"])
        objective.append(values["objective"])
    assert np.mean(bpd[-20:]) < np.mean(bpd[:20]) - 0.2, (bpd[:20], bpd[-20:])
    assert np.mean(objective[-20:]) < np.mean(objective[:20])
    for v in trainer.state.variables:
        assert np.all(np.isfinite(v.numpy())), v.path


@pytest.mark.slow
def test_mnist_trains_and_reports_nats_per_image(tmp_path, mnist_dir):
    cfg = tiny_config(extra="dataset=mnist", batch_size=8, logdir=str(tmp_path), max_steps=300, summary_every=20,
                      checkpoint_every=300, seed=1, data_dir=str(mnist_dir))
    lines = []
    trainer = train.Trainer(cfg)
    result = train.train(cfg, trainer=trainer, print_fn=lines.append)
    assert result.status == "max_steps" and result.skipped == 0
    assert np.isfinite(result.metrics["nats_per_image"])
    nats = scalar_series(tmp_path / "train", "model/nats_per_image")
    assert any(line.startswith("Iteration 20, ") and "train nats_per_image = " in line for line in lines)
    assert sorted(nats) == list(range(20, 301, 20))
    assert all(np.isfinite(v) for v in nats.values())
    # A fresh model pays ~log 2 per pixel (543 nats) plus the KL; 300 steps already take off a lot.
    assert nats[20] > 450
    assert np.mean([nats[s] for s in (260, 280, 300)]) < nats[20] - 100

    # The fixed test binarization evaluates in nats per image too (the trained weights: after 300 steps
    # the 0.999 moving averages are still mostly the initial ones).
    test = datasets.get("mnist").load("test", 32, mnist_dir, evaluation=True)[:200]
    nll = Evaluator(trainer.model).nll(test, k=1)
    assert nll.shape == (200,) and np.all(np.isfinite(nll))
    assert 50 < nll.mean() < nats[20] - 100, (nll.mean(), nats)


# ---------------------------------------------------------------- non-finite steps


def _poisoned_trainer(cfg, poison):
    """A trainer whose likelihood (hence loss) is multiplied by `poison` (a variable the test sets to NaN,
    inf or 1)."""
    trainer = train.Trainer(cfg, tf.distribute.get_strategy())
    model_call = trainer.model.call

    def call(*args, **kwargs):
        out = model_call(*args, **kwargs)
        if not kwargs.get("init"):
            out = dict(out, log_pxz=out["log_pxz"] * poison)
        return out

    trainer.model.call = call
    return trainer


def _train_state(trainer):
    slots = [s.numpy().copy() for v in trainer.state.variables for s in trainer.state.optimizer.slots_for(v)]
    return ([v.numpy().copy() for v in trainer.state.variables], slots,
            [s.numpy().copy() for s in trainer.state.averages.shadows], int(trainer.state.optimizer.iterations.numpy()))


@pytest.mark.slow
def test_non_finite_steps_change_nothing_are_counted_and_training_goes_on(tmp_path, cifar10_dir):
    # Each call resumes from the checkpoint the previous one left in logdir/train.
    cfg = tiny_config(ONE_BLOCK, max_skips=3, logdir=str(tmp_path), max_steps=2, data_dir=str(cifar10_dir))
    poison = tf.Variable(1.0, trainable=False)
    lines = []
    trainer = _poisoned_trainer(cfg, poison)
    train.train(cfg, trainer=trainer, print_fn=lines.append)
    before = _train_state(trainer)

    poison.assign(float("nan"))
    cfg = cfg.replace(max_steps=4)  # two poisoned steps: skipped, fewer than max_skips
    trainer = _poisoned_trainer(cfg, poison)
    result = train.train(cfg, trainer=trainer, print_fn=lines.append)
    after = _train_state(trainer)
    for old, new in zip(before[:3], after[:3]):
        for a, b in zip(old, new):
            np.testing.assert_array_equal(a, b)
    assert after[3] == before[3] == 2  # applied updates did not move
    assert result.skipped == 2 and int(trainer.state.step.numpy()) == 4
    assert any("non-finite loss or gradient, update skipped (2 in a row, 2 in all)" in line for line in lines)

    poison.assign(1.0)
    cfg = cfg.replace(max_steps=6)
    trainer = _poisoned_trainer(cfg, poison)
    result = train.train(cfg, trainer=trainer, print_fn=lines.append)
    assert int(trainer.state.optimizer.iterations.numpy()) == 4 and result.skipped == 2
    assert not np.array_equal(_train_state(trainer)[0][0], after[0][0])

    # The skip counter is in TensorBoard.
    assert max(scalar_series(tmp_path / "train", "train/skipped_steps").values()) == 2


@pytest.mark.slow
def test_stops_after_max_skips_consecutive_non_finite_steps_with_a_usable_checkpoint(tmp_path, cifar10_dir):
    # The update just before the first non-finite step may be what broke the weights, so after the stop the
    # newest checkpoint holds those of a checkpoint from before it: with one every step, step 1's.
    cfg = tiny_config(ONE_BLOCK, max_skips=3, logdir=str(tmp_path), max_steps=2, checkpoint_every=1,
                      data_dir=str(cifar10_dir))
    poison = tf.Variable(1.0, trainable=False)
    trainer = _poisoned_trainer(cfg, poison)
    weights = {}
    train.train(cfg, trainer=trainer, print_fn=_quiet,
                on_step=lambda record: weights.setdefault(record.step,
                                                          [v.numpy().copy() for v in trainer.state.variables]))
    poison.assign(float("inf"))
    cfg = cfg.replace(max_steps=0)  # would run forever but for the stop
    with pytest.raises(NonFiniteError, match="3 consecutive steps had a non-finite loss") as stop:
        train.train(cfg, trainer=_poisoned_trainer(cfg, poison), print_fn=_quiet)
    assert "holds the weights of " + str(tmp_path / "train" / "ckpt-1") in str(stop.value)
    assert latest_step(tmp_path / "train") == 5
    fresh = train.Trainer(cfg, tf.distribute.get_strategy()).state
    checkpoints.restore(fresh, tf.train.latest_checkpoint(tmp_path / "train"))  # every variable, or it raises
    assert not all(np.array_equal(a, b) for a, b in zip(weights[1], weights[2]))  # step 2 changed them
    for a, b in zip(weights[1], fresh.variables):
        np.testing.assert_array_equal(a, b.numpy())
    assert int(fresh.skipped.numpy()) == 3 and int(fresh.step.numpy()) == 5


@pytest.mark.slow
def test_steps_in_one_host_call_equal_steps_one_by_one(tmp_path, cifar10_dir):
    # steps_per_loop=8 with summaries every 12: after the first calls of one step each (the first console
    # lines), calls of 8 steps, cut at steps 12, 24 and at max_steps.
    runs = {}
    for steps_per_loop in (1, 8):
        cfg = tiny_config(ONE_BLOCK, logdir=str(tmp_path / str(steps_per_loop)), max_steps=26, summary_every=12,
                          checkpoint_every=100, steps_per_loop=steps_per_loop, data_dir=str(cifar10_dir))
        trainer = train.Trainer(cfg, tf.distribute.get_strategy())
        records = []
        result = train.train(cfg, trainer=trainer, on_step=records.append, print_fn=_quiet)
        runs[steps_per_loop] = result, records, _train_state(trainer)
    (one, one_records, one_state), (loop, loop_records, loop_state) = runs[1], runs[8]
    assert [r.steps_in_call for r in one_records] == [1] * 26
    assert [r.step for r in loop_records] == list(range(1, 27))
    calls = [r.steps_in_call for r in loop_records if r.step == 10 or r.step % 12 == 0 or r.step in (18, 26)]
    assert calls == [1, 2, 8, 4, 2] and [r.steps_in_call for r in loop_records[:10]] == [1] * 10
    for a, b in zip(one_state[:3], loop_state[:3]):
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    assert one_state[3] == loop_state[3] == 26 and loop.step == 26
    np.testing.assert_allclose(loop.metrics["objective"], one.metrics["objective"], rtol=1e-5)
    # Summaries at the original's steps, whatever the calls.
    assert sorted(scalar_series(tmp_path / "8" / "train", "model/bits_per_dim")) == [12, 24]


def test_a_call_of_many_steps_that_passes_max_skips_stops_the_run(tmp_path, cifar10_dir):
    cfg = tiny_config(ONE_BLOCK, max_skips=3, logdir=str(tmp_path), max_steps=0, steps_per_loop=20,
                      checkpoint_every=100, data_dir=str(cifar10_dir))
    poison = tf.Variable(1.0, trainable=False)
    records, lines = [], []

    def on_step(record):
        records.append(record)
        if record.step == 10:  # the last one-step call: the next call (steps 11..20) is poisoned
            poison.assign(float("nan"))

    trainer = _poisoned_trainer(cfg, poison)
    with pytest.raises(NonFiniteError, match="stopped at step 20: 3 consecutive steps") as stop:
        train.train(cfg, trainer=trainer, on_step=on_step, print_fn=lines.append)
    assert [r.step for r in records[10:]] == list(range(11, 21)) and {r.steps_in_call for r in records[10:]} == {10}
    assert not any(r.applied for r in records[10:])
    assert int(trainer.state.skipped.numpy()) == 10 and int(trainer.state.step.numpy()) == 20
    # The streak that reached max_skips is the one reported and rolled back from.
    assert sum("update skipped" in line for line in lines) == 3
    assert "ahead of the first non-finite step, 11)" in str(stop.value)


def test_grad_clip_limits_the_applied_gradient(tmp_path, cifar10_dir):
    cfg = tiny_config(ONE_BLOCK, grad_clip=1e-3, logdir=str(tmp_path), max_steps=1, data_dir=str(cifar10_dir))
    trainer = train.Trainer(cfg, tf.distribute.get_strategy())
    train.train(cfg, trainer=trainer, print_fn=_quiet)
    applied = [trainer.state.optimizer.slots_for(v)[0].numpy() / 0.1 for v in trainer.state.variables]
    assert np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in applied)) == pytest.approx(1e-3, rel=1e-3)


# ---------------------------------------------------------------- preemption


def _training_args(logdir, cifar10_dir, *extra):
    return ["--mode", "train", "--hpconfig", ONE_BLOCK, "--num_gpus", "1", "--logdir", logdir,
            "--data_dir", cifar10_dir, *extra]


@pytest.mark.slow
@pytest.mark.e2e
def test_sigterm_writes_a_checkpoint_at_the_current_step_and_exits_0(tmp_path, cifar10_dir):
    proc = start_cli(_training_args(tmp_path, cifar10_dir, "--checkpoint_every", "100000", "--summary_every", "1"))
    try:
        deadline = time.time() + 120
        while latest_step(tmp_path / "train") < 0 and time.time() < deadline:
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
    assert latest_step(tmp_path / "train") == step


@pytest.mark.slow
@pytest.mark.e2e
def test_sigkill_at_any_moment_never_leaves_an_unreadable_checkpoint(tmp_path, cifar10_dir):
    """Checkpoints every step, so kills land during writes; every restart must resume."""
    rng = np.random.RandomState(0)
    last_step = -1
    for attempt in range(4):
        proc = start_cli(_training_args(tmp_path, cifar10_dir, "--checkpoint_every", "1", "--summary_every", "1000"))
        deadline = time.time() + 120
        while latest_step(tmp_path / "train") <= last_step and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()
        proc.communicate(timeout=30)
        step = latest_step(tmp_path / "train")
        assert step >= last_step
        reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(tmp_path / "train"))
        assert int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")) == step
        last_step = step
    # A kill between a checkpoint's last file and the state file leaves a newer complete checkpoint than
    # the state file names; the policy resumes from it (with a warning), and from nothing older.
    newest = checkpoints.newest_readable(tmp_path / "train", say=lambda *_: None)
    resume_step = int(tf.train.load_checkpoint(newest).get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE"))
    assert resume_step >= last_step
    done = run_cli(_training_args(tmp_path, cifar10_dir, "--max_steps", resume_step + 2))
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"at step {resume_step}" in done.stdout and f"Iteration {resume_step + 1}," in done.stdout


@pytest.mark.slow
@pytest.mark.e2e
def test_sigkill_then_resume_keeps_step_slots_and_averages(tmp_path, cifar10_dir):
    args = ["--mode", "train", "--hpconfig", ONE_BLOCK, "--num_gpus", "1", "--logdir", tmp_path,
            "--checkpoint_every", "5", "--data_dir", cifar10_dir, "--seed", "2"]
    proc = start_cli(args, output=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and latest_step(tmp_path / "train") < 10:
            time.sleep(0.2)
        assert proc.poll() is None, "training exited early"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    latest = tf.train.latest_checkpoint(tmp_path / "train")
    reader = tf.train.load_checkpoint(latest)
    saved_step = int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE"))
    assert saved_step >= 10 and latest.endswith(f"ckpt-{saved_step}")

    # The checkpoint restores into a fresh trainer with every slot and average intact.
    trainer = train.Trainer(tiny_config(ONE_BLOCK, seed=2), tf.distribute.get_strategy())
    checkpoints.restore(trainer.state, latest)  # every variable, or it raises
    assert int(trainer.state.step.numpy()) == saved_step
    keys = reader.get_variable_to_shape_map()
    assert sum(k.startswith("model/") for k in keys) == len(trainer.state.variables)
    assert sum(k.startswith("averages/") for k in keys) == len(trainer.state.variables)
    assert sum(k.startswith("optimizer/_variables/") for k in keys) >= 2 * len(trainer.state.variables)
    var = trainer.model.x_enc.V
    first, running_max = trainer.state.optimizer.slots_for(var)
    assert np.abs(first.numpy()).max() > 0 and running_max.numpy().min() > 0
    shadow = trainer.state.averages.shadow_for(var)
    assert not np.allclose(shadow.numpy(), var.numpy())  # the averages are their own values, not the weights

    # Restarting the same command resumes from that step and carries on.
    done = run_cli([*args, "--max_steps", saved_step + 3])
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"Resumed from {latest} at step {saved_step}" in done.stdout
    assert f"Iteration {saved_step + 1}," in done.stdout
    assert tf.train.latest_checkpoint(tmp_path / "train").endswith(f"ckpt-{saved_step + 3}")


# ---------------------------------------------------------------- determinism


@pytest.mark.slow
@pytest.mark.e2e
def test_two_runs_with_the_same_seed_give_identical_losses(tmp_path, cifar10_dir):
    losses = []
    for run in range(2):
        done = run_cli(_training_args(tmp_path / str(run), cifar10_dir, "--seed", "7", "--max_steps", "20",
                                      "--summary_every", "1"))
        assert done.returncode == 0, done.stderr[-2000:]
        losses.append([line.split("bits_per_dim = ")[1] for line in done.stdout.splitlines()
                       if line.startswith("Iteration ")])
        assert len(losses[-1]) == 20
    assert losses[0] == losses[1]
    # And the per-step summaries agree to the last bit.
    values = [scalar_series(tmp_path / str(run) / "train", "model/bits_per_dim") for run in range(2)]
    assert len(values[0]) == 20 and values[0] == values[1]


# ---------------------------------------------------------------- several machines: tests/test_faults.py runs
# two processes of the documented command.


# ---------------------------------------------------------------- mixed precision and XLA
# Tolerances:
# - bfloat16 training: finite, falling, and within 0.01 bits/dim of float32 at each of the first steps
#   (measured: 0.002). (bfloat16 evaluation of the reference: test_tf1_checkpoint.py.)
# - jit_compile=true against false from the same state and seed (both draw the same noise): objective to
#   1e-5 relative; weights, slots and averages to 1e-4 of each tensor's largest entry.


def _conv_dtypes(concrete_function):
    found = set()
    graphs = [concrete_function.graph]
    while graphs:
        graph = graphs.pop()
        graphs += [f.graph for f in graph._functions.values() if hasattr(f, "graph")]
        found |= {op.get_attr("T") for op in graph.get_operations() if op.type.startswith("Conv2D")}
    return found


def test_mixed_precision_computes_convs_in_bfloat16_and_keeps_float32_state():
    cfg = tiny_config(mixed_precision=True)
    trainer = train.Trainer(cfg, tf.distribute.get_strategy())
    images = tf.zeros([4, 32, 32, 3], tf.uint8)
    concrete = trainer.train_step.get_concrete_function(images)
    # The IAF blocks compute in bfloat16; the 3-channel input and output convs stay float32 (the
    # decoder's mean must resolve 1/256 bins, which bfloat16 cannot near +-0.5).
    assert _conv_dtypes(concrete) == {tf.bfloat16, tf.float32}
    assert {tf.as_dtype(v.dtype) for v in trainer.state.variables} == {tf.float32}
    assert {tf.as_dtype(s.dtype) for s in trainer.state.averages.shadows} == {tf.float32}
    assert {tf.as_dtype(v.dtype) for v in trainer.state.optimizer.variables} <= {tf.float32, tf.int64}
    step_seed = tf.constant([0, 0], tf.int32)
    out = run_model(trainer.model, images, step_seed)
    out["objective"], _ = train.loss_fn(trainer.model, images, step_seed, cfg.objective)
    for key in ("log_pxz", "kl_obj", "kl", "objective", "nll"):
        assert out[key].dtype == tf.float32, key
    assert all(t.dtype == tf.float32 for t in out["kl_layers"])


def test_float32_default_has_no_bfloat16():
    trainer = train.Trainer(tiny_config(), tf.distribute.get_strategy())
    concrete = trainer.train_step.get_concrete_function(tf.zeros([4, 32, 32, 3], tf.uint8))
    assert _conv_dtypes(concrete) == {tf.float32}


@pytest.mark.slow
def test_bfloat16_training_is_finite_falls_and_tracks_float32(cifar10_dir):
    steps = 12
    images = data.load_cifar10("train", cifar10_dir)[:16 * steps]
    curves = {}
    for mixed in (False, True):
        trainer = train.Trainer(load_preset("cpu_quick").replace(mixed_precision=mixed), tf.distribute.get_strategy())
        trainer.initialize(images[:16])
        curve = []
        for i in range(steps):
            metrics, applied = trainer.train_step(tf.constant(images[16 * i:16 * (i + 1)]))
            assert bool(applied)
            curve.append(float(metrics["bits_per_dim"]))
        curves[mixed] = np.array(curve)
    bf16, f32 = curves[True], curves[False]
    assert np.all(np.isfinite(bf16))
    assert bf16[-4:].mean() < bf16[:4].mean() - 0.05
    np.testing.assert_allclose(bf16, f32, atol=0.01)


def _state(trainer):
    """Every weight, Adamax slot and moving average, by name."""
    state = {}
    for var in trainer.state.variables:
        first_moment, running_max = trainer.state.optimizer.slots_for(var)
        name = var.path.split("/", 1)[1]  # without the model's own (numbered) name
        state.update({name: var.numpy(), f"{name} first moment": first_moment.numpy(),
                      f"{name} running max": running_max.numpy(),
                      f"{name} average": trainer.state.averages.shadow_for(var).numpy()})
    return state


def _three_steps(setup, images):
    """(initial state, objective of each of three steps, state after them) of a TWO_BLOCKS_PER_LEVEL trainer;
    setup: "plain", "programs" (the GPU's default without jit: the update, weight norm and noise as XLA
    programs) or "jit"."""
    cfg = tiny_config(TWO_BLOCKS_PER_LEVEL, jit_compile=setup == "jit",
                      xla_programs="on" if setup == "programs" else "off")
    trainer = train.Trainer(cfg, tf.distribute.get_strategy())
    trainer.initialize(images[:4])
    initial = _state(trainer)
    losses = [float(trainer.train_step(tf.constant(images[4 * i:4 * (i + 1)]))[0]["objective"]) for i in range(3)]
    return initial, losses, _state(trainer)


@pytest.fixture(scope="module")
def plain_steps(cifar10_dir):
    """_three_steps("plain"), made once for both compiled setups."""
    return _three_steps("plain", data.load_cifar10("train", cifar10_dir)[:12])


@pytest.mark.slow
@pytest.mark.parametrize("setup", ["programs", "jit"])
def test_a_jit_step_and_a_plain_step_from_the_same_state_and_seed_agree(setup, plain_steps, cifar10_dir):
    _, plain_losses, plain_state = plain_steps
    initial, losses, state = _three_steps(setup, data.load_cifar10("train", cifar10_dir)[:12])
    assert plain_losses[0] != plain_losses[1]  # the steps really trained
    np.testing.assert_allclose(losses, plain_losses, rtol=1e-5, err_msg=setup)
    moved = 0
    for name, plain in plain_state.items():
        # Relative to each tensor's largest entry: entries near zero have no relative precision.
        np.testing.assert_allclose(state[name], plain, rtol=1e-4, atol=1e-4 * np.abs(plain).max(),
                                   err_msg=f"{setup}: {name}")
        moved += not np.array_equal(plain, initial[name])
    assert moved >= len(plain_state) - 12  # all but the top block's last up-pass conv (3 weights, 4 each)


def test_xla_programs_are_for_gpus_unless_set():
    assert not tf.config.list_logical_devices("GPU")  # this test's premise: a host without GPUs
    for setting, expected in (("auto", False), ("on", True), ("off", False)):
        trainer = train.Trainer(tiny_config(xla_programs=setting), tf.distribute.get_strategy())
        assert trainer.xla_programs is expected
        # The update is compiled exactly when the programs are on (or jit_compile is).
        assert trainer._update._jit_compile is expected
    assert train.Trainer(tiny_config(jit_compile=True), tf.distribute.get_strategy())._update._jit_compile



def test_the_update_called_for_each_variable_selects_only_the_gradient():
    """Without XLA the update is a function called once per variable: the skip test's scalar selects (the
    learning rate, the decays, epsilon, the averages' rate) are made once a step, outside it; inside, only
    the gradient (NaN in a skipped step) is selected."""
    weights, first, running_max, shadow = (tf.Variable(tf.zeros([3])) for _ in range(4))
    usable = tf.constant(True)
    scalars = (optim.when_applied(usable, 0.001, 0.0), optim.adamax_coefficients(0.002, 0.9, 0.999, 1e-8, usable))
    function = train._update_variable.get_concrete_function([tf.ones([3])], [weights], [first], [running_max],
                                                            [shadow], usable, *scalars)
    ops = [op.type for op in function.graph.get_operations()]
    assert ops.count("SelectV2") == 1, ops

# ---------------------------------------------------------------- checkpoints you can trust

def _resume(logdir, cifar10_dir, *extra):
    return run_main(train_args(logdir, "--max_steps", 4, *extra), CIFAR10_PATH=cifar10_dir)


@pytest.fixture(scope="module")
def four_step_run(tmp_path_factory, cifar10_dir):
    """A short run with checkpoints at 0, 2 and 4 (made once; tests copy it)."""
    logdir = tmp_path_factory.mktemp("run") / "run"
    train.train(tiny_config(ONE_BLOCK, logdir=str(logdir), max_steps=4, checkpoint_every=2,
                            data_dir=str(cifar10_dir)), print_fn=_quiet)
    return logdir / "train"


def _copy_run(train_dir, tmp_path):
    shutil.copytree(train_dir.parent, tmp_path / "run")
    return tmp_path / "run" / "train"


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["state file deleted", "state file names a missing checkpoint",
                                   "newest checkpoint deleted", "newest checkpoint truncated"])
def test_a_broken_run_resumes_from_its_newest_readable_checkpoint_and_says_so(fault, four_step_run, tmp_path,
                                                                             cifar10_dir):
    train_dir = _copy_run(four_step_run, tmp_path)
    if fault == "state file deleted":
        (train_dir / "checkpoint").unlink()
    elif fault == "state file names a missing checkpoint":
        (train_dir / "checkpoint").write_text('model_checkpoint_path: "ckpt-99"\n')
    elif fault == "newest checkpoint deleted":
        for path in train_dir.glob("ckpt-4.*"):
            path.unlink()
    else:
        data = next(train_dir.glob("ckpt-4.data-*"))
        data.write_bytes(data.read_bytes()[:100])
    expected = 2 if fault.startswith("newest") else 4
    before = snapshot(train_dir)
    done = _resume(train_dir.parent, cifar10_dir, "--max_steps", expected)  # nothing to train: restore only
    assert done.returncode == 0, done.stderr
    assert f"Resumed from {train_dir}/ckpt-{expected} at step {expected}" in done.stdout
    assert "Initializing" not in done.stdout
    if fault != "newest checkpoint deleted":
        assert "warning:" in done.stdout
    assert {k: v for k, v in snapshot(train_dir).items() if k.startswith("ckpt-")} == \
        {k: v for k, v in before.items() if k.startswith("ckpt-")}


@pytest.mark.slow
def test_a_run_whose_checkpoints_all_fail_to_read_is_refused(four_step_run, tmp_path, cifar10_dir):
    train_dir = _copy_run(four_step_run, tmp_path)
    for data_file in train_dir.glob("ckpt-*.data-*"):
        data_file.write_bytes(b"garbage")
    before = snapshot(train_dir)
    done = _resume(train_dir.parent, cifar10_dir)
    lines = error_lines(done.stderr)
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "none of the checkpoints" in lines[0] and "ckpt-4" in lines[0] and "ckpt-0" in lines[0]
    lock = RunLock.NAME  # the trainer's own lock file names it while it runs
    assert {k: v for k, v in snapshot(train_dir).items() if k != lock} == {k: v for k, v in before.items() if k != lock}


@pytest.mark.slow
def test_resume_and_eval_from_the_logdir_alone_with_changes_recorded(four_step_run, tmp_path, cifar10_dir):
    train_dir = _copy_run(four_step_run, tmp_path)
    record = run_record.read(train_dir)
    assert record == tiny_config(ONE_BLOCK)
    done = run_main(["--mode", "train", "--logdir", train_dir.parent, "--max_steps", 5, "--hpconfig",
                     "learning_rate=0.001"], CIFAR10_PATH=cifar10_dir)
    assert done.returncode == 0, done.stderr
    assert "learning_rate: 0.002 → 0.001" in done.stdout
    assert "# step 4: learning_rate 0.002 -> 0.001" in (train_dir / "hparams.cfg").read_text()
    assert run_record.read(train_dir).optimization.learning_rate == 0.001
    refused = run_main(["--mode", "train", "--logdir", train_dir.parent, "--max_steps", 6, "--hpconfig", "h_size=16"],
                       CIFAR10_PATH=cifar10_dir)
    assert refused.returncode == 2
    assert error_lines(refused.stderr) == [
        f"error: h_size=16 contradicts the run in {train_dir}, which has h_size=8: a run's architecture and dataset "
        "cannot change; drop it, or use another --logdir for a new run"]
    for mode in ("eval_test", "sample"):
        done = run_main(["--mode", mode, "--once", "--num_images", 20, "--logdir", train_dir.parent],
                        CIFAR10_PATH=cifar10_dir)
        assert done.returncode == 0, done.stderr


@pytest.mark.slow
@pytest.mark.e2e
def test_a_second_trainer_on_a_logdir_exits_at_once_and_a_killed_one_leaves_no_lock(tmp_path, cifar10_dir):
    env = cli_env(CIFAR10_PATH=str(cifar10_dir))
    logdir = tmp_path / "run"
    first = start_cli(train_args(logdir, "--hpconfig", ONE_BLOCK, "--max_steps", 0, "--checkpoint_every", 1), env=env)
    try:
        deadline = time.time() + 120
        while latest_step(logdir / "train") < 2 and time.time() < deadline:
            time.sleep(0.5)
        assert latest_step(logdir / "train") >= 2
        begin = time.time()
        second = run_cli(train_args(logdir, "--hpconfig", ONE_BLOCK, "--max_steps", 0), env=env)
        assert time.time() - begin < 30 and second.returncode == 2
        lines = error_lines(second.stderr)
        assert len(lines) == 1 and f"in use by another trainer (host {socket.gethostname()}, PID {first.pid})" in lines[0]
        assert first.poll() is None  # the first one is unaffected
        step = latest_step(logdir / "train")
        time.sleep(2)
        assert latest_step(logdir / "train") > step
    finally:
        first.kill()
        first.wait()
    again = run_cli(train_args(logdir, "--max_steps", latest_step(logdir / "train") + 1), env=env)
    assert again.returncode == 0, again.stderr
    assert "Resumed from" in again.stdout


@pytest.mark.slow
def test_after_a_non_finite_stop_the_newest_checkpoint_holds_weights_from_before_the_trouble(tmp_path, cifar10_dir):
    logdir = tmp_path / "run"
    blown = run_main(train_args(logdir, "--hpconfig", f"{ONE_BLOCK},learning_rate=1e6,max_skips=3", "--max_steps", 0,
                                "--checkpoint_every", 1), CIFAR10_PATH=cifar10_dir)
    assert blown.returncode == 3, blown.stderr
    lines = error_lines(blown.stderr)
    assert len(lines) == 1 and "holds the weights of" in lines[0] and "ckpt-0" in lines[0], lines
    newest = tf.train.load_checkpoint(checkpoints.find_all(logdir / "train")[0])
    initial = tf.train.load_checkpoint(str(logdir / "train" / "ckpt-0"))
    key = "model/dec_log_stdv/.ATTRIBUTES/VARIABLE_VALUE"
    assert newest.get_tensor(key) == initial.get_tensor(key) == 0.0
    resumed = run_main(["--mode", "train", "--logdir", logdir, "--max_steps", _step_of_newest(logdir) + 3,
                        "--hpconfig", "learning_rate=0.002"], CIFAR10_PATH=cifar10_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert "update skipped" not in resumed.stdout


def _step_of_newest(logdir):
    return int(checkpoints.find_all(logdir / "train")[0].rsplit("-", 1)[1])


def test_a_non_finite_evaluation_is_an_error_with_no_result_file(tmp_path, cifar10_dir):
    cfg = tiny_config(ONE_BLOCK)
    state = checkpoints.TrainState(cfg)
    for shadow in state.averages.shadows:
        shadow.assign(tf.fill(shadow.shape, float("nan")))
    (tmp_path / "run" / "train").mkdir(parents=True)
    state.checkpoint.write(str(tmp_path / "run" / "train" / "ckpt-7"))
    (tmp_path / "run" / "train" / "hparams.cfg").write_text(run_record.text(cfg))
    done = run_main(["--mode", "eval_test", "--once", "--num_images", 10, "--logdir", tmp_path / "run"],
                    CIFAR10_PATH=cifar10_dir)
    assert done.returncode == 3, done.stderr
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and "is nan" in lines[0] and "no result was written" in lines[0]
    assert not list((tmp_path / "run").rglob("result-*.json"))


@pytest.mark.slow
def test_train_starts_a_new_run_from_a_tf1_checkpoint_but_refuses_one_in_its_own_folder(reference_dir, tmp_path,
                                                                                       cifar10_dir):
    env = {"CIFAR10_PATH": cifar10_dir}
    hpconfig = read_expected()["hpconfig"]
    done = run_main(["--mode", "train", "--logdir", tmp_path / "new", "--hpconfig", hpconfig, "--checkpoint",
                     reference_dir, "--max_steps", 3001], **env)
    assert done.returncode == 0, done.stderr
    assert "Starting a new run from" in done.stdout and "step 3000" in done.stdout
    assert latest_step(tmp_path / "new" / "train") == 3001
    again = run_main(["--mode", "train", "--logdir", tmp_path / "new", "--checkpoint", reference_dir, "--max_steps",
                      3002], **env)
    assert again.returncode == 2 and "starts a new run" in error_lines(again.stderr)[0]
    shutil.copytree(reference_dir, tmp_path / "tf1" / "train")
    before = snapshot(tmp_path / "tf1")
    refused = run_main(["--mode", "train", "--logdir", tmp_path / "tf1", "--hpconfig", hpconfig], **env)
    lines = error_lines(refused.stderr)
    assert refused.returncode == 2 and len(lines) == 1 and "convert_checkpoint.py" in lines[0], refused.stderr
    assert snapshot(tmp_path / "tf1") == before


@pytest.mark.slow
def test_a_full_disk_while_saving_leaves_the_previous_checkpoint_the_latest(tmp_path, cifar10_dir):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        cfg = tiny_config(ONE_BLOCK, data_dir=str(cifar10_dir), logdir=str(mount / "run"), max_steps=2,
                          image_every=0)
        train.train(cfg, print_fn=lambda *_: None)
        with open(mount / "filler", "wb", buffering=0) as filler:  # fill what is left, then free room for small files only
            try:
                while True:
                    filler.write(b"\0" * 4096)
            except OSError:
                pass
        os.truncate(mount / "filler", max(0, os.path.getsize(mount / "filler") - 48 * 1024))
        before = snapshot(mount / "run" / "train")
        with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*ckpt-3.*ckpt-2 is still the latest"):
            train.train(cfg.replace(max_steps=3), print_fn=lambda *_: None)
        after = snapshot(mount / "run" / "train")
        assert not [name for name in after if "ckpt-3" in name or "_temp" in name]
        assert {k: v for k, v in after.items() if k.startswith("ckpt-") or k == "checkpoint"} == \
            {k: v for k, v in before.items() if k.startswith("ckpt-") or k == "checkpoint"}
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_max_to_keep_is_a_flag_and_keeps_that_many_checkpoints(tmp_path, cifar10_dir):
    given = config.given_on_command_line(cli_flags("--max_to_keep", "2", "--logdir", tmp_path))
    cfg = tiny_config(ONE_BLOCK, **given, max_steps=4, checkpoint_every=1, image_every=0, data_dir=str(cifar10_dir))
    assert cfg.training.max_to_keep == 2
    train.train(cfg, print_fn=_quiet)
    assert [os.path.basename(p) for p in checkpoints.find_all(tmp_path / "train")] == ["ckpt-4", "ckpt-3"]


def test_training_outside_the_main_thread_says_that_signals_are_not_caught(tmp_path, cifar10_dir):
    cfg = tiny_config(ONE_BLOCK, logdir=str(tmp_path), max_steps=1, image_every=0, data_dir=str(cifar10_dir))
    lines, failures = [], []

    def run():
        try:
            train.train(cfg, print_fn=lines.append)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            failures.append(e)

    thread = threading.Thread(target=run, name="trainer")
    thread.start()
    thread.join()
    assert not failures
    assert any(line.startswith("warning: training runs outside the main thread (trainer)") and "without a checkpoint"
               in line for line in lines), lines
    assert lines[-1] == "Stopped at step 1 (max_steps)."
