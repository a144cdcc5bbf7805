"""iaf_tf.evaluate: --mode eval_test / eval_train (scores, summaries, pictures, result files; watching for new
checkpoints) and --mode sample, on the reference checkpoint of the original and on MNIST."""

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from iaf_tf import checkpoints, convert, data, datasets, evaluate, train
from iaf_tf.config import load_preset
from tests.fixtures import ONE_BLOCK, published_bits_per_dim, read_events, run_main, tiny_config


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 10])
def test_eval_test_mode_reproduces_the_original(k, reference_dir, expected, cifar10_dir, tmp_path):
    """`--mode eval_test` on the original's own TF1 checkpoint (moving averages), first 2000 test images."""
    done = run_main(["--mode", "eval_test", "--logdir", tmp_path, "--preset", "tf1_small", "--hpconfig", f"k={k}",
                     "--checkpoint", reference_dir, "--once", "--num_images", "2000", "--data_dir", cifar10_dir])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Step: 3000 Score: " in done.stdout
    result = json.loads((tmp_path / "eval_test" / "result-3000.json").read_text())
    assert result["split"] == "test" and result["k"] == k and result["images"] == 2000 and result["seconds"] > 0
    assert abs(result["bits_per_dim"] - published_bits_per_dim(expected, "ema", k, "first 2000")) < 0.01
    assert f"Score: {result['bits_per_dim']:.4f}" in done.stdout


@pytest.mark.slow
def test_eval_writes_scalars_pictures_and_json_and_watches_for_new_checkpoints(reference_dir, cifar10_dir,
                                                                              tmp_path):
    path, cfg = convert.convert(reference_dir, tmp_path)
    # The watcher gives up after 5 s of polling without a new checkpoint (the time it evaluates is not
    # counted): the second checkpoint's state is ready before it starts, so adding it is one small save.
    cfg = cfg.replace(logdir=str(tmp_path), num_images=100, poll_seconds=0.2, wait_seconds=5,
                      data_dir=str(cifar10_dir))
    reader = tf.train.load_checkpoint(path)
    step_key = "step/.ATTRIBUTES/VARIABLE_VALUE"
    assert int(reader.get_tensor(step_key)) == 3000
    state = checkpoints.TrainState(cfg)
    checkpoints.restore(state, path)  # every variable, or it raises
    state.step.assign(3001)
    lines = []
    results = []
    watcher = threading.Thread(target=lambda: results.extend(
        evaluate.run_eval(cfg, "test", print_fn=lines.append, progress=False)))
    watcher.start()
    # A second checkpoint appears while it watches: it gets evaluated too.
    deadline = time.time() + 120
    while not (tmp_path / "eval_test" / "result-3000.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    tf.train.CheckpointManager(state.checkpoint, str(tmp_path / "train"), max_to_keep=None).save(3001)
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
    stems = []
    for temperature in (1.0, 0.0):
        cfg = load_preset("tf1_small").replace(logdir=str(tmp_path), checkpoint=str(reference_dir), num_samples=10,
                                               temperature=temperature)
        stems.append(evaluate.run_sample(cfg, print_fn=lambda s: None))
    hot, cold = (np.load(stem + ".npy") for stem in stems)
    assert hot.shape == (10, 32, 32, 3) and hot.dtype == np.uint8
    assert hot.std() > 5
    # Temperature 0 draws every z at the prior mean: all samples alike.
    assert np.abs(cold.astype(int) - cold[:1].astype(int)).max() <= 1
    png = tf.io.decode_png(Path(stems[0] + ".png").read_bytes()).numpy()
    assert png.shape == (3 * 33 - 1, 4 * 33 - 1, 3)  # 10 pictures: 3 rows of 4


def test_mnist_is_evaluated_in_nats_per_image_on_a_fixed_binarization(mnist_dir, tmp_path):
    cfg = tiny_config(ONE_BLOCK, "dataset=mnist", logdir=str(tmp_path), once=True, num_images=40,
                      data_dir=str(mnist_dir))
    trainer = train.Trainer(cfg, tf.distribute.get_strategy())
    trainer.initialize(datasets.get("mnist").load("train", 32, mnist_dir)[:4])
    tf.train.CheckpointManager(trainer.state.checkpoint, str(tmp_path / "train"), max_to_keep=None).save(0)
    lines = []
    first, second = (evaluate.run_eval(cfg, "test", print_fn=lines.append, progress=False)[0] for _ in range(2))
    assert "bits_per_dim" not in first and first["nats_per_image"] == second["nats_per_image"]
    assert 100 < first["nats_per_image"] < 2000  # an untrained model pays ~log 2 per pixel and more
    assert ("eval_nats_per_image", 0) in read_events(tmp_path / "eval_test")[0]
    assert lines[-1] == f"Step: 0 Score: {first['nats_per_image']:.4f}"


@pytest.mark.slow
def test_export_mode_writes_a_saved_model_of_the_averages(reference_dir, tmp_path):
    cfg = load_preset("tf1_small").replace(logdir=str(tmp_path), checkpoint=str(reference_dir))
    lines = []
    out_dir = evaluate.run_export(cfg, print_fn=lines.append)
    assert out_dir == str(tmp_path / "export" / "step-3000")
    assert (tmp_path / "export" / "step-3000" / "saved_model.pb").is_file()
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["step-3000"]  # no temporary folder left
    assert lines == [f"Wrote a SavedModel of the moving-average weights of step 3000 to {out_dir}"]
