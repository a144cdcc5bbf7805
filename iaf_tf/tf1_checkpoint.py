"""Read checkpoints written by the original TF1 code (iaf_tf.checkpoints.restore loads them into a model).

The original saves each weight as `model/<scope>/<V|g|b>` (plus `model/h_top`, `model/dec_log_stdv`,
`model/global_step`); its Adamax slots and moving averages sit under an extra leading scope, so they are
found by their endings: `<name>/Adamax` (the running max of |grad|), `<name>/Adamax_1` (the first
moment) and `<name>/ExponentialMovingAverage`. Kernels are layout-free, so NCHW training does not
matter here.
"""

import dataclasses
import re

import tensorflow as tf

from iaf_tf.errors import CheckpointError

_PREFIX = "model/"
_BLOCK = re.compile(r"^IAF_(\d+)_(\d+)/")


@dataclasses.dataclass
class TF1Checkpoint:
    path: str
    weights: dict      # name without the leading "model/" -> array
    ema: dict          # same names -> moving average
    adamax_max: dict   # same names -> Adamax running max of |grad| ("m" in the original)
    adamax_mean: dict  # same names -> Adamax first moment ("v" in the original)
    global_step: int

    def architecture(self):
        """depths per level, h_size, z_size and depth_ar, read off the variable shapes."""
        if "h_top" not in self.weights:
            raise CheckpointError(f"{self.path}: no 'model/h_top' variable; is this an openai/iaf TF1 checkpoint?")
        blocks = {}
        for name in self.weights:
            m = _BLOCK.match(name)
            if m:
                level, block = int(m.group(1)), int(m.group(2))
                blocks[level] = max(blocks.get(level, 0), block + 1)
        level_depths = [blocks.get(i, 0) for i in range(len(blocks))]
        if not blocks or 0 in level_depths:
            raise CheckpointError(f"{self.path}: could not find the IAF_<level>_<block> layers")
        h_size = int(self.weights["h_top"].shape[0])
        up = self.weights["IAF_0_0/up_conv1/V"].shape[-1]
        z_size = int(up - 2 * h_size) // 2
        depth_ar = sum(1 for n in self.weights if re.match(r"^IAF_0_0/ar_multiconv2d/layer_\d+/V$", n))
        return {"level_depths": level_depths, "h_size": h_size, "z_size": z_size, "depth_ar": depth_ar}


def read(prefix):
    """The TF1 checkpoint at `prefix` (see iaf_tf.checkpoints.resolve)."""
    try:
        reader = tf.train.load_checkpoint(prefix)
    except (tf.errors.OpError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {prefix}: {e}") from e
    names = reader.get_variable_to_shape_map()
    slots = {"ExponentialMovingAverage": {}, "Adamax": {}, "Adamax_1": {}}
    weights = {}
    global_step = 0
    for full in names:
        head, _, tail = full.rpartition("/")
        if tail in slots:
            # "<scope>/model/<name>/<slot>": strip everything up to the weight's own "model/".
            owner = head[head.rfind(_PREFIX, 0, len(head)) + len(_PREFIX):] if _PREFIX in head else head
            slots[tail][owner] = reader.get_tensor(full)
        elif full.startswith(_PREFIX):
            name = full[len(_PREFIX):]
            if name == "global_step":
                global_step = int(reader.get_tensor(full))
            else:
                weights[name] = reader.get_tensor(full)
    # A name like "model/model/x/Adamax" was resolved with rfind; check every slot names a weight.
    for kind, values in slots.items():
        stray = sorted(set(values) - set(weights))
        if stray:
            raise CheckpointError(f"{prefix}: {kind} slots for unknown weights: {stray[:5]}")
    return TF1Checkpoint(prefix, weights, slots["ExponentialMovingAverage"], slots["Adamax"],
                         slots["Adamax_1"], global_step)


def check_compatible(ckpt, model_config):
    """Raise CheckpointError naming each hyper-parameter the checkpoint contradicts."""
    arch = ckpt.architecture()
    wanted = {"level_depths": list(model_config.level_depths), "h_size": model_config.h_size,
              "z_size": model_config.z_size, "depth_ar": model_config.depth_ar}
    wrong = [f"{key}: checkpoint has {arch[key]}, hparams say {wanted[key]}" for key in wanted
             if arch[key] != wanted[key]]
    if wrong:
        raise CheckpointError(f"{ckpt.path} was written by another configuration: " + "; ".join(wrong)
                              + ". Pass matching --hpconfig values (e.g. depth, num_blocks, h_size, z_size).")
