#!/usr/bin/env python
"""`bin/iaf.py --mode convert` under its former name: --tf1_checkpoint is --checkpoint.

    python bin/convert_checkpoint.py --tf1_checkpoint ../shared/reference/tf1-small --logdir runs/converted
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from iaf_tf import cli  # noqa: E402

if __name__ == "__main__":
    sys.argv[1:] = ["--mode", "convert"] + [arg.replace("--tf1_checkpoint", "--checkpoint", 1)
                                            if arg.split("=", 1)[0] == "--tf1_checkpoint" else arg
                                            for arg in sys.argv[1:]]
    cli.run()
