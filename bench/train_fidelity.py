"""Training fidelity against the original: 3,000 steps of the reference config (tf1_small) from a fresh
data-dependent init, then the EMA test bits/dim of the saved checkpoint on all 10,000 CIFAR-10 test
images (k = 1), next to the original's two seeds (../shared/reference/tf1-small/expected.json).

Usage:
  python bench/train_fidelity.py                        # 3000 steps (the comparison holds only for it)
  python bench/train_fidelity.py --steps 20             # quick: checks that it runs
  python bench/train_fidelity.py --seed 1 --logdir /tmp/fidelity
"""

import json
import tempfile

import harness
from harness import Column


def main():
    parser = harness.arguments(__doc__)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logdir", default=None, help="where to train (default: a new temporary folder, kept)")
    args = parser.parse_args()

    harness.setup()
    from iaf_tf import data

    logdir = args.logdir or tempfile.mkdtemp(prefix="iaf_fidelity_")
    cfg = harness.config("tf1_small", args.hpconfig, logdir=logdir, max_steps=args.steps, seed=args.seed,
                         data_dir=args.data_dir, download=False, summary_every=500, checkpoint_every=1000)
    scores = harness.train_and_score(cfg, data.load_cifar10("test", args.data_dir))
    expected = json.loads((harness.REFERENCE_DIR / "expected.json").read_text())[
        "training_curve_from_scratch"]["ema_test_bpd_after_3000_steps"]
    # "{}": the cells are formatted per row, and right-aligned as numbers.
    harness.print_table([Column("", "what"), Column("ours", "ours", "{}"), Column("original (2 seeds)", "original")], [
        {"what": f"EMA test bits/dim after {scores['trained'].step} steps", "ours": f"{scores['ema']:.4f}",
         "original": expected},
        {"what": "difference to the originals mean", "ours": f"{scores['ema'] - sum(expected) / len(expected):+.4f}",
         "original": "(target: within 0.1)"}])
    print(f"train: {scores['train_s']:.0f}s ({args.steps / scores['train_s']:.1f} steps/s), last train bits/dim "
          f"{scores['result'].metrics['bits_per_dim']:.4f}, logdir {logdir}")


if __name__ == "__main__":
    main()
