"""Training fidelity against the original: 3,000 steps of the reference config from a fresh
data-dependent init, then the EMA test bits/dim on all 10,000 CIFAR-10 test images (k = 1).

The original reached 6.1029 and 6.1339 (two seeds; ../shared/reference/tf1-small/expected.json).
Usage: python bench/train_fidelity.py [--steps 3000] [--seed 0] [--data_dir ../shared/data]
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from iaf_tf import data, hparams, train  # noqa: E402
from iaf_tf.likelihood import Evaluator  # noqa: E402

REFERENCE = ROOT.parent / "shared" / "reference" / "tf1-small" / "expected.json"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", default=os.environ.get("CIFAR10_PATH", str(ROOT.parent / "shared" / "data")))
    parser.add_argument("--logdir", default=None)
    args = parser.parse_args()

    hps = hparams.load_preset("tf1_small")
    logdir = args.logdir or tempfile.mkdtemp(prefix="iaf_fidelity_")
    config = train.TrainConfig(logdir=logdir, max_steps=args.steps, seed=args.seed, data_dir=args.data_dir,
                               summary_every=500, checkpoint_every=1000, print_fn=lambda s: None)
    begin = time.time()
    result = train.train(hps, config)
    train_seconds = time.time() - begin
    trainer = result["trainer"]
    test = data.load_cifar10("test", args.data_dir)
    trainer.averages.copy_to_weights()
    bpd, eval_seconds = Evaluator(trainer.model).bits_per_dim(test, k=1, seed=args.seed)

    expected = json.loads(REFERENCE.read_text())["training_curve_from_scratch"]["ema_test_bpd_after_3000_steps"]
    print(f"{'':34s} {'ours':>8s}  original (2 seeds)")
    print(f"{'EMA test bits/dim after %d steps' % args.steps:34s} {bpd:8.4f}  {expected}")
    print(f"{'difference to the originals mean':34s} {bpd - sum(expected) / len(expected):+8.4f}  (target: within 0.1)")
    print(f"train: {train_seconds:.0f}s ({args.steps / train_seconds:.1f} steps/s), eval: {eval_seconds:.0f}s, "
          f"last train bits/dim {result['metrics']['bits_per_dim']:.4f}, logdir {logdir}")


if __name__ == "__main__":
    main()
