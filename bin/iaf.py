#!/usr/bin/env python
"""iaf-tf entry point, with the original's flags: --logdir, --hpconfig, --mode, --num_gpus (see --helpfull)."""

import os
import sys

# Run from a checkout without installing: the package is beside this folder.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from iaf_tf import cli  # noqa: E402

if __name__ == "__main__":
    cli.run()
