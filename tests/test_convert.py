"""iaf_tf.convert (bin/convert_checkpoint.py): a TF1 checkpoint of the original becomes a native run that
every mode reads, with its architecture read off the checkpoint."""

import json
import subprocess
import sys

import numpy as np
import pytest

from iaf_tf import checkpoints, convert, run_record, tf1_checkpoint
from iaf_tf.checkpoints import TrainState
from iaf_tf.config import Config, load_preset
from iaf_tf.errors import CheckpointError
from tests.fixtures import ROOT, assert_holds_tf1_checkpoint, cli_env, run_main


@pytest.mark.slow
def test_convert_writes_a_native_run_with_every_weight_average_and_slot(reference_dir, tf1_reference, tmp_path):
    path, cfg = convert.convert(reference_dir, tmp_path)
    assert path == str(tmp_path / "train" / "ckpt-3000")
    assert cfg.model.level_depths == [2, 2] and (cfg.model.h_size, cfg.model.z_size, cfg.model.depth_ar) == (32, 8, 2)
    assert run_record.read(tmp_path / "train") == cfg
    assert not checkpoints.is_tf1(path)
    state = TrainState(cfg)
    assert checkpoints.restore(state, path) == 3000  # every variable, or it raises
    assert_holds_tf1_checkpoint(state, tf1_reference)


def test_convert_refuses_a_logdir_that_holds_a_run(reference_dir, tmp_path):
    convert.convert(reference_dir, tmp_path)
    before = sorted(p.name for p in (tmp_path / "train").iterdir())
    with pytest.raises(CheckpointError, match="already holds a run"):
        convert.convert(reference_dir, tmp_path)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == before


def test_convert_checks_a_given_config_against_the_checkpoint(reference_dir, tmp_path):
    with pytest.raises(CheckpointError, match="h_size: checkpoint has 32, hparams say 16"):
        convert.convert(reference_dir, tmp_path, load_preset("tf1_small").parse("h_size=16"))
    assert not list((tmp_path / "train").glob("ckpt-*"))
    path, cfg = convert.convert(reference_dir, tmp_path, load_preset("tf1_small"))
    assert cfg == load_preset("tf1_small") and path.endswith("ckpt-3000")


def test_config_from_checkpoint_keeps_the_base_and_takes_the_architecture(tf1_reference):
    assert convert.config_from_checkpoint(tf1_reference, load_preset("tf1_small")) == load_preset("tf1_small")
    cfg = convert.config_from_checkpoint(tf1_reference)
    assert cfg == Config().replace(h_size=32, z_size=8, depth_ar=2)  # the defaults otherwise
    assert cfg.optimization.learning_rate == Config().optimization.learning_rate


def test_config_from_checkpoint_with_unequal_levels_sets_depths():
    def zeros(*shape):
        return np.zeros(shape, np.float32)

    weights = {"h_top": zeros(16), "IAF_0_0/up_conv1/V": zeros(3, 3, 16, 2 * 4 + 2 * 16),
               "IAF_0_0/ar_multiconv2d/layer_0/V": zeros(3, 3, 4, 16)}
    weights.update({f"IAF_{i}_{j}/up_conv3/V": zeros(3, 3, 16, 16) for i, j in [(0, 0), (0, 1), (0, 2), (1, 0)]})
    ckpt = tf1_checkpoint.TF1Checkpoint("fake", weights, {}, {}, {}, 0)
    cfg = convert.config_from_checkpoint(ckpt)
    assert (cfg.model.depths, cfg.model.level_depths, cfg.model.h_size, cfg.model.z_size, cfg.model.depth_ar) == \
        ("3-1", [3, 1], 16, 4, 1)


@pytest.mark.slow
@pytest.mark.e2e
def test_converter_command_then_eval_without_hpconfig(reference_dir, cifar10_dir, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bin" / "convert_checkpoint.py"), "--tf1_checkpoint",
                           str(reference_dir), "--logdir", str(tmp_path)],
                          capture_output=True, text=True, env=cli_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0] == f"wrote {tmp_path / 'train' / 'ckpt-3000'}"
    assert Config().parse(lines[1].removeprefix("hpconfig: ")).model.level_depths == [2, 2]
    # As its docstring says: every mode reads the converted run with no --hpconfig.
    done = run_main(["--mode", "eval_test", "--once", "--logdir", tmp_path, "--num_images", "100",
                     "--data_dir", cifar10_dir])
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "eval_test" / "result-3000.json").read_text())
    assert result["images"] == 100 and 5.5 < result["bits_per_dim"] < 7
