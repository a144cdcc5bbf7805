"""Training fidelity against the original: 3,000 steps of the reference config from a fresh
data-dependent init, then the EMA test bits/dim of the saved checkpoint on all 10,000 CIFAR-10 test
images (k = 1).

The original reached 6.1029 and 6.1339 (two seeds; ../shared/reference/tf1-small/expected.json).

Usage:
  python bench/train_fidelity.py                        # full: 3000 steps (the comparison holds only for it)
  python bench/train_fidelity.py --steps 20             # quick: checks that it runs
  python bench/train_fidelity.py --steps 3000 --seed 1 --logdir /tmp/fidelity --data_dir ../shared/data
"""

import argparse
import json
import tempfile
import time

import harness
from harness import Column


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", default=harness.DATA_DIR)
    parser.add_argument("--logdir", default=None, help="where to train (default: a new temporary folder, kept)")
    args = parser.parse_args()

    harness.setup()
    import iaf_tf
    from iaf_tf import config, data, train

    logdir = args.logdir or tempfile.mkdtemp(prefix="iaf_fidelity_")
    cfg = config.resolve("tf1_small", logdir=logdir, max_steps=args.steps, seed=args.seed, data_dir=args.data_dir,
                         download=False, summary_every=500, checkpoint_every=1000)
    begin = time.perf_counter()
    result = train.train(cfg, print_fn=harness.quiet)
    train_seconds = time.perf_counter() - begin

    trained = iaf_tf.load(logdir, weights="ema")
    test = data.load_cifar10("test", args.data_dir)
    begin = time.perf_counter()
    bpd = trained.score(trained.nll(test, k=1, seed=args.seed))
    eval_seconds = time.perf_counter() - begin

    reference = json.loads((harness.REFERENCE_DIR / "expected.json").read_text())
    expected = reference["training_curve_from_scratch"]["ema_test_bpd_after_3000_steps"]
    # "{}": the cells are formatted per row, and right-aligned as numbers.
    harness.print_table([Column("", "what"), Column("ours", "ours", "{}"), Column("original (2 seeds)", "original")], [
        {"what": f"EMA test bits/dim after {trained.step} steps", "ours": f"{bpd:.4f}", "original": expected},
        {"what": "difference to the originals mean", "ours": f"{bpd - sum(expected) / len(expected):+.4f}",
         "original": "(target: within 0.1)"}])
    print(f"train: {train_seconds:.0f}s ({args.steps / train_seconds:.1f} steps/s), eval: {eval_seconds:.0f}s, "
          f"last train bits/dim {result.metrics['bits_per_dim']:.4f}, logdir {logdir}")


if __name__ == "__main__":
    main()
