"""iaf_tf.checkpoints: what a run holds (TrainState), finding checkpoints (resolve) and loading native and
TF1 ones (restore), with every mismatch an error that names it."""

import numpy as np
import pytest
import tensorflow as tf

from iaf_tf import checkpoints
from iaf_tf.checkpoints import TrainState, named_variables
from iaf_tf.config import load_preset
from iaf_tf.errors import CheckpointError
from tests.fixtures import (ONE_BLOCK, REFERENCE_PREFIX, assert_holds_tf1_checkpoint, random_images, seed, tiny_config,
                            write_released_checkpoint)


@pytest.fixture(scope="module")
def reference_state():
    """A tf1_small state with an optimizer, into which each test restores what it needs."""
    return TrainState(load_preset("tf1_small"))


@pytest.mark.parametrize("which", ["ema", "raw"])
def test_restore_tf1_weights(tf1_reference, reference_prefix, reference_state, which):
    assert checkpoints.restore(reference_state, reference_prefix, weights=which) == 3000
    variables = named_variables(reference_state.model)
    source = tf1_reference.ema if which == "ema" else tf1_reference.weights
    assert set(variables) == set(source)
    for name, var in variables.items():
        np.testing.assert_array_equal(var.numpy(), source[name], err_msg=name)
    model = reference_state.model
    np.testing.assert_array_equal(model.x_dec.V.numpy(), source["x_dec/V"])
    np.testing.assert_array_equal(model.blocks[2].ar.heads[1].g.numpy(), source["IAF_1_0/ar_multiconv2d/layer_out_1/g"])


def test_restore_tf1_averages_adamax_slots_and_step(tf1_reference, reference_prefix, reference_state):
    checkpoints.restore(reference_state, reference_prefix)
    assert int(reference_state.step.numpy()) == 3000 == int(reference_state.optimizer.iterations.numpy())
    assert_holds_tf1_checkpoint(reference_state, tf1_reference)


def test_restore_rejects_unknown_weights_kind(reference_prefix, reference_state):
    with pytest.raises(ValueError):
        checkpoints.restore(reference_state, reference_prefix, weights="average")


def test_restore_tf1_into_another_h_size(reference_prefix):
    state = TrainState(load_preset("tf1_small").parse("h_size=16"), with_optimizer=False)
    with pytest.raises(CheckpointError, match="h_size"):
        checkpoints.restore(state, reference_prefix)


def test_restore_tf1_into_another_depth(reference_prefix):
    state = TrainState(load_preset("tf1_small").parse("num_blocks=1,z_size=4"), with_optimizer=False)
    with pytest.raises(CheckpointError, match="level_depths") as info:
        checkpoints.restore(state, reference_prefix)
    assert "z_size: checkpoint has 8" in str(info.value) and "h_size:" not in str(info.value)


@pytest.mark.parametrize("with_optimizer", [True, False])
def test_restore_rejects_a_checkpoint_of_something_else(tmp_path, with_optimizer):
    prefix = tf.train.Checkpoint(v=tf.Variable([1.0, 2.0])).write(str(tmp_path / "other"))
    state = TrainState(tiny_config(ONE_BLOCK), with_optimizer=with_optimizer)
    with pytest.raises(CheckpointError, match="written by another configuration"):
        checkpoints.restore(state, prefix)


def _saved_state(tmp_path, cfg):
    """A state of cfg after the data-dependent init and one moved average, saved as ckpt-7."""
    state = TrainState(cfg)
    state.model.initialize(random_images(4, 1), seed(0))
    state.averages.reset()
    for var in state.variables:
        state.averages.shadow_for(var).assign(tf.convert_to_tensor(var) + 1.0)
    state.step.assign(7)
    manager = tf.train.CheckpointManager(state.checkpoint, str(tmp_path / "train"), max_to_keep=None)
    return state, manager.save(checkpoint_number=7)


def test_restore_native_raw_and_ema_weights(tmp_path):
    cfg = tiny_config(ONE_BLOCK)
    saved, prefix = _saved_state(tmp_path, cfg)
    for weights, offset in (("raw", 0.0), ("ema", 1.0)):
        state = TrainState(cfg, with_optimizer=False)
        assert checkpoints.restore(state, prefix, weights=weights) == 7
        for old, new in zip(saved.variables, state.variables):
            np.testing.assert_allclose(new.numpy(), old.numpy() + offset, err_msg=new.path)


def test_restore_native_into_another_configuration_names_the_variables(tmp_path):
    _, prefix = _saved_state(tmp_path, tiny_config(ONE_BLOCK))
    state = TrainState(tiny_config(ONE_BLOCK, h_size=16), with_optimizer=False)
    with pytest.raises(CheckpointError, match="written by another configuration") as info:
        checkpoints.restore(state, prefix)
    assert "x_enc/V is [5, 5, 3, 8] in the checkpoint but [5, 5, 3, 16] in the model" in str(info.value)


def test_resolve_takes_a_prefix_a_folder_or_a_logdir(tmp_path, reference_dir, reference_prefix):
    _, prefix = _saved_state(tmp_path, tiny_config(ONE_BLOCK))
    for given in (prefix, prefix + ".index", tmp_path / "train", tmp_path):
        assert checkpoints.resolve(given) == prefix
    assert checkpoints.resolve(reference_dir) == reference_prefix
    assert checkpoints.is_tf1(reference_prefix) and not checkpoints.is_tf1(prefix)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        checkpoints.resolve(tmp_path / "nowhere")


def test_named_variables_are_the_original_names_of_every_variable(tiny_model):
    variables = named_variables(tiny_model)
    assert len(variables) == len(tiny_model.variables)
    assert {"h_top", "dec_log_stdv", "x_enc/V", "x_dec/b", "IAF_1_1/down_conv1/g",
            "IAF_0_0/ar_multiconv2d/layer_out_1/V"} <= set(variables)
    assert variables["x_enc/V"] is tiny_model.x_enc.V


# ---------------------------------------------------------------- finding checkpoints

def _touch_checkpoint(folder, name):
    (folder / f"{name}.index").write_bytes(b"")
    (folder / f"{name}.data-00000-of-00001").write_bytes(b"")


def test_find_all_lists_native_and_original_checkpoints_newest_first(tmp_path):
    _touch_checkpoint(tmp_path, "ckpt-20")
    _touch_checkpoint(tmp_path, "ckpt-3")
    (tmp_path / "model.ckpt-100").write_bytes(b"v1")  # a V1 single file
    (tmp_path / "model.ckpt-100.meta").write_bytes(b"")
    (tmp_path / "events.out.tfevents.1").write_bytes(b"")
    assert checkpoints.find_all(tmp_path) == [str(tmp_path / n) for n in ("model.ckpt-100", "ckpt-20", "ckpt-3")]


def _write_checkpoint(folder, name):
    """A small real checkpoint at folder/name (every tensor of it reads)."""
    return tf.train.Checkpoint(v=tf.Variable(tf.range(1000.0))).write(str(folder / name))


# The checkpoint policy (issue 22): the newest checkpoint file that reads, whatever the state file says;
# a state file that disagrees is said, as training's resume always did.
@pytest.mark.parametrize("named", ["ckpt-3", "/elsewhere/train/ckpt-3", "ckpt-99", "ckpt-20",
                                   "/elsewhere/train/ckpt-20", None])
def test_a_folder_means_its_newest_checkpoint_file_and_a_disagreeing_state_file_is_said(named, tmp_path):
    _write_checkpoint(tmp_path, "ckpt-3")
    _write_checkpoint(tmp_path, "ckpt-20")
    (tmp_path / "checkpoint").unlink(missing_ok=True)
    if named:
        (tmp_path / "checkpoint").write_text(f'model_checkpoint_path: "{named}"\n')
    said = []
    assert checkpoints.newest_readable(tmp_path, said.append) == str(tmp_path / "ckpt-20")
    if named and named.endswith("ckpt-20"):
        assert said == []
    else:
        assert said == [f"warning: the 'checkpoint' state file of {tmp_path} is missing or does not name the newest "
                        "checkpoint; trusting the files: ckpt-20 is the newest"]
    for given in ("ckpt-3", "ckpt-3.index"):  # a checkpoint named explicitly is that one
        assert checkpoints.newest_readable(tmp_path / given, said.append) == str(tmp_path / "ckpt-3")


def _break(folder, fault):
    """Make folder's newest checkpoint (ckpt-20) unreadable, or add an unreadable newer one."""
    data, index = folder / "ckpt-20.data-00000-of-00001", folder / "ckpt-20.index"
    if fault == "truncated .data":
        data.write_bytes(data.read_bytes()[:100])
    elif fault == "garbage .index":
        index.write_bytes(b"garbage" * 20)
    elif fault == "lost .index":
        index.unlink()
    else:
        (folder / "model.ckpt-100").write_text("not a checkpoint\n")


_REASONS = {"truncated .data": "IndexError: Read less bytes than requested", "garbage .index": "bad magic number",
            "lost .index": "its .index file is missing", "a text model.ckpt-100": "DataLossError"}


@pytest.mark.parametrize("fault", list(_REASONS))
def test_an_unreadable_newest_checkpoint_is_skipped_and_named(fault, tmp_path):
    _write_checkpoint(tmp_path, "ckpt-3")
    _write_checkpoint(tmp_path, "ckpt-20")
    _break(tmp_path, fault)
    bad = "model.ckpt-100" if fault.startswith("a text") else "ckpt-20"
    good = "ckpt-20" if fault.startswith("a text") else "ckpt-3"
    said = []
    assert checkpoints.newest_readable(tmp_path, said.append) == str(tmp_path / good)
    [warning] = [line for line in said if " is unreadable (" in line]
    assert warning.startswith(f"warning: {tmp_path / bad} is unreadable (") and warning.endswith(
        f"); using the newest readable checkpoint, {good}, instead")
    assert _REASONS[fault] in warning
    with pytest.raises(CheckpointError, match=f"{tmp_path / bad} cannot be read"):
        checkpoints.newest_readable(tmp_path / bad, said.append)


def test_a_folder_whose_checkpoints_all_fail_to_read_is_refused_naming_each(tmp_path):
    _write_checkpoint(tmp_path, "ckpt-3")
    _write_checkpoint(tmp_path, "ckpt-20")
    (tmp_path / "ckpt-3.index").unlink()
    _break(tmp_path, "truncated .data")
    with pytest.raises(CheckpointError, match=r"none of the checkpoints in .* can be read: ckpt-20 \(IndexError: "
                       r"Read less bytes than requested\); ckpt-3 \(its .index file is missing\)"):
        checkpoints.newest_readable(tmp_path)


def test_describe_says_format_and_step(reference_dir, tmp_path):
    released = write_released_checkpoint(reference_dir / REFERENCE_PREFIX, tmp_path)
    assert checkpoints.describe(released).endswith("(a checkpoint of the original TF1 code, V1 format, step 3000)")
    assert "V2 format, step 3000" in checkpoints.describe(str(reference_dir / REFERENCE_PREFIX))


def test_restore_is_strict_both_ways(tmp_path):
    small = checkpoints.TrainState(tiny_config(ONE_BLOCK))
    prefix = small.checkpoint.write(str(tmp_path / "ckpt-1"))
    bigger = checkpoints.TrainState(tiny_config(ONE_BLOCK, "num_blocks=2"))
    with pytest.raises(CheckpointError, match="is missing from the checkpoint") as missing:
        checkpoints.restore(bigger, prefix)
    assert len(str(missing.value)) < 2000
    wider = checkpoints.TrainState(tiny_config(ONE_BLOCK, "h_size=16"), with_optimizer=False)
    with pytest.raises(CheckpointError, match=r"x_enc/V is \[5, 5, 3, 8\] in the checkpoint but \[5, 5, 3, 16\]"):
        checkpoints.restore(wider, prefix)
    bigger.checkpoint.write(str(tmp_path / "ckpt-2"))
    with pytest.raises(CheckpointError, match="is in the checkpoint but not in the model"):
        checkpoints.restore(checkpoints.TrainState(tiny_config(ONE_BLOCK), with_optimizer=False),
                            str(tmp_path / "ckpt-2"))
