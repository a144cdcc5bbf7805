import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from iaf_tf import convert, data, evaluate, hparams
from iaf_tf.likelihood import Evaluator, plan_chunks
from tests.helpers import read_events

ROOT = Path(__file__).resolve().parents[1]


def _expected(reference_dir, weights, k, test_images):
    results = json.loads((reference_dir / "expected.json").read_text())["results"]
    return next(r["bits_per_dim"] for r in results
                if (r["weights"], r["k"], r["test_images"]) == (weights, k, test_images))


@pytest.fixture(scope="module")
def averaged_reference(reference_dir):
    averaged = evaluate.AveragedModel(hparams.load_preset("tf1_small"))
    averaged.restore(str(reference_dir / "model.ckpt-3000"))
    return averaged


def test_plan_chunks_bounds_each_forward_pass():
    assert plan_chunks(1, 100) == (100, 1)
    assert plan_chunks(10, 100) == (10, 10)
    assert plan_chunks(10_000, 100) == (1, 100)
    assert plan_chunks(150, 100) == (1, 100)


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 10])
def test_eval_test_mode_reproduces_the_original(k, reference_dir, cifar10_dir, tmp_path):
    """`--mode eval_test` on the original's own TF1 checkpoint (moving averages), first 2000 test images."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bin" / "iaf.py"), "--mode", "eval_test", "--logdir", str(tmp_path),
         "--preset", "tf1_small", "--hpconfig", f"k={k}", "--checkpoint", str(reference_dir), "--once",
         "--num_images", "2000", "--data_dir", str(cifar10_dir)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Step: 3000 Score: " in done.stdout
    result = json.loads((tmp_path / "eval_test" / "result-3000.json").read_text())
    assert result["split"] == "test" and result["k"] == k and result["images"] == 2000 and result["seconds"] > 0
    assert abs(result["bits_per_dim"] - _expected(reference_dir, "ema", k, "first 2000")) < 0.01
    assert f"Score: {result['bits_per_dim']:.4f}" in done.stdout


@pytest.mark.slow
def test_importance_sampling_tightens_with_k_and_matches_the_reference(averaged_reference, cifar10_dir,
                                                                        reference_dir):
    test = data.load_cifar10("test", cifar10_dir)[:200]
    evaluator = Evaluator(averaged_reference.model)
    scores = {k: evaluator.bits_per_dim(test, k=k, seed=5)[0] for k in (1, 10, 100)}
    assert scores[1] > scores[10] > scores[100]
    assert abs(scores[100] - _expected(reference_dir, "ema", 100, "first 200")) < 0.01
    assert abs(scores[1] - _expected(reference_dir, "ema", 1, "first 200")) < 0.01


def test_chunked_importance_sampling_equals_one_pass(averaged_reference, cifar10_dir):
    """Streaming log-sum-exp over chunks gives what a single pass over all k samples gives."""
    images = data.load_cifar10("test", cifar10_dir)[:3]
    evaluator = Evaluator(averaged_reference.model)
    # Same noise: with max_batch >= k, one pass of k=8; with max_batch=4, chunks of 4 (other seeds per chunk).
    one_pass = evaluator.nll(images, k=8, seed=1, max_batch=100)
    chunked = evaluator.nll(images, k=8, seed=1, max_batch=4)
    # Different noise draws, same estimator: close but not equal; and each is reproducible.
    np.testing.assert_allclose(one_pass, chunked, rtol=2e-3)
    np.testing.assert_array_equal(chunked, evaluator.nll(images, k=8, seed=1, max_batch=4))
    assert not np.array_equal(chunked, evaluator.nll(images, k=8, seed=2, max_batch=4))
    # A single image in k = 1 chunks: the mean of exp(log w) computed by hand.
    model = averaged_reference.model
    log_w = [float((lambda o: o["log_pxz"] - o["kl_cost"])(model(tf.constant(images[:1]),
                                                              tf.constant([1, c], tf.int64)))[0])
             for c in range(5)]
    expected = -(np.logaddexp.reduce(log_w) - np.log(5))
    np.testing.assert_allclose(evaluator.nll(images[:1], k=5, seed=1, max_batch=1)[0], expected, rtol=1e-6)


def test_eval_writes_scalars_pictures_and_json_and_watches_for_new_checkpoints(reference_dir, cifar10_dir,
                                                                              tmp_path):
    path, hps = convert.convert(reference_dir, tmp_path)
    lines = []
    config = evaluate.EvalConfig(logdir=str(tmp_path), mode="eval_test", num_images=100, poll_seconds=0.2,
                                 wait_seconds=20, progress=False, data_dir=str(cifar10_dir),
                                 print_fn=lines.append)
    results = []
    watcher = threading.Thread(target=lambda: results.extend(evaluate.run_eval(hps, config)))
    watcher.start()
    # A second checkpoint appears while it watches: it gets evaluated too.
    deadline = time.time() + 120
    while not (tmp_path / "eval_test" / "result-3000.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    reader = tf.train.load_checkpoint(path)
    step_key = "step/.ATTRIBUTES/VARIABLE_VALUE"
    assert int(reader.get_tensor(step_key)) == 3000
    from iaf_tf.train import Trainer
    trainer = Trainer(hps, tf.distribute.get_strategy())
    trainer.checkpoint.restore(path).assert_consumed()
    trainer.step.assign(3001)
    tf.train.CheckpointManager(trainer.checkpoint, str(tmp_path / "train"), max_to_keep=None).save(3001)
    watcher.join(timeout=180)
    assert not watcher.is_alive()
    assert [r["step"] for r in results] == [3000, 3001]
    assert results[0]["bits_per_dim"] == results[1]["bits_per_dim"]  # same weights, same seed
    assert any(line.startswith("Step: 3000 Score: ") for line in lines)

    scalars, pictures = read_events(tmp_path / "eval_test")
    assert abs(scalars[("eval_bits_per_dim", 3000)] - results[0]["bits_per_dim"]) < 1e-5
    for name in ("reconstructions", "samples"):
        png = tmp_path / "eval_test" / f"{name}-3000.png"
        image = tf.io.decode_png(png.read_bytes()).numpy()
        assert image.shape == (6 * 33 - 1, 6 * 33 - 1, 3)
        assert image.std() > 10  # not blank
        assert (name, 3000) in pictures
    # Reconstructions sit beside their inputs: even tiles are the test images themselves.
    recon = tf.io.decode_png((tmp_path / "eval_test" / "reconstructions-3000.png").read_bytes()).numpy()
    test = data.load_cifar10("test", cifar10_dir)
    np.testing.assert_array_equal(recon[:32, :32], test[0])
    np.testing.assert_array_equal(recon[:32, 66:98], test[1])
    assert np.abs(recon[:32, 33:65].astype(int) - test[0].astype(int)).mean() < 40  # a reconstruction of it


def test_sample_mode_writes_png_and_npy(reference_dir, tmp_path):
    hps = hparams.load_preset("tf1_small")
    stems = []
    for temperature in (1.0, 0.0):
        config = evaluate.EvalConfig(logdir=str(tmp_path), mode="sample", checkpoint=str(reference_dir),
                                     num_samples=10, temperature=temperature, print_fn=lambda s: None)
        stems.append(evaluate.run_sample(hps, config))
    hot, cold = (np.load(stem + ".npy") for stem in stems)
    assert hot.shape == (10, 32, 32, 3) and hot.dtype == np.uint8
    assert hot.std() > 5
    # Temperature 0 draws every z at the prior mean: all samples alike.
    assert np.abs(cold.astype(int) - cold[:1].astype(int)).max() <= 1
    png = tf.io.decode_png(Path(stems[0] + ".png").read_bytes()).numpy()
    assert png.shape == (3 * 33 - 1, 4 * 33 - 1, 3)  # 10 pictures: 3 rows of 4


def test_mnist_is_evaluated_in_nats_per_image_on_a_fixed_binarization(mnist_dir, tmp_path):
    hps = hparams.get_default_hparams().parse("dataset=mnist,depth=1,num_blocks=1,h_size=8,z_size=4,batch_size=4")
    from iaf_tf.train import Trainer
    trainer = Trainer(hps, tf.distribute.get_strategy())
    trainer.initialize(data.load_images("mnist", "train", mnist_dir)[:4])
    tf.train.CheckpointManager(trainer.checkpoint, str(tmp_path / "train"), max_to_keep=None).save(0)
    lines = []
    config = evaluate.EvalConfig(logdir=str(tmp_path), mode="eval_test", once=True, num_images=40, progress=False,
                                 data_dir=str(mnist_dir), print_fn=lines.append)
    first, second = (evaluate.run_eval(hps, config)[0] for _ in range(2))
    assert "bits_per_dim" not in first and first["nats_per_image"] == second["nats_per_image"]
    assert 100 < first["nats_per_image"] < 2000  # an untrained model pays ~log 2 per pixel and more
    assert ("eval_nats_per_image", 0) in read_events(tmp_path / "eval_test")[0]
    assert lines[-1] == f"Step: 0 Score: {first['nats_per_image']:.4f}"
