#!/usr/bin/env python
"""Convert a checkpoint of the original openai/iaf TF1 code into a native iaf-tf checkpoint.

    python bin/convert_checkpoint.py --tf1_checkpoint ../shared/reference/tf1-small --logdir runs/converted
    python bin/iaf.py --mode eval_test --once --logdir runs/converted
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # see iaf_tf.cli.run
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags, logging  # noqa: E402

from iaf_tf import config, convert, errors  # noqa: E402

flags.DEFINE_string("tf1_checkpoint", None, "TF1 checkpoint: a directory or a prefix like model.ckpt-3000.")
flags.DEFINE_string("logdir", None, "Where to write <logdir>/train/ckpt-<step>.")
flags.DEFINE_string("hpconfig", "", "Hyper-parameters of the run (the architecture is checked against the "
                    "checkpoint; left empty, it is read off the checkpoint).")
flags.DEFINE_string("preset", "", "Named preset (see bin/iaf.py --helpfull); --hpconfig overrides it.")
flags.mark_flags_as_required(["tf1_checkpoint", "logdir"])


def main(argv):
    del argv
    F = flags.FLAGS
    if not F["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        given = config.resolve(F.preset or None, F.hpconfig) if (F.preset or F.hpconfig) else None
        path, cfg = convert.convert(F.tf1_checkpoint, F.logdir, given)
    except errors.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    print(f"hpconfig: {cfg.to_hpconfig()}")
    return 0


if __name__ == "__main__":
    app.run(main)
