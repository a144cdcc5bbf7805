"""Posterior variants side by side: the same config trained with each posterior for the same steps (same
seed, same data stream) by the real training loop, then the test bits/dim (k = 1) of each checkpoint with
the moving averages (what the original reports) and with the last weights (after a short run the 0.999
averages still carry the early weights).

Usage:
  python bench/posterior_variants.py                    # tf1_small, 2000 steps each, 2000 test images (~10 min)
  python bench/posterior_variants.py --steps 20 --test_images 100      # quick
  python bench/posterior_variants.py --hpconfig h_size=16 --posteriors down_diag,down_iaf2_nl --seed 1
"""

import tempfile
import time

import harness
from harness import Column

def run(cfg, test_images):
    from iaf_tf.model import count_trainable_parameters

    scores = harness.train_and_score(cfg, test_images, weights=("ema", "raw"))
    return {"posterior": cfg.model.posterior, "params": count_trainable_parameters(scores["trained"].model),
            "train_bpd": scores["result"].metrics["bits_per_dim"], "skipped": scores["result"].skipped, **scores}


def main():
    parser = harness.arguments(__doc__)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--test_images", type=int, default=2000)
    parser.add_argument("--preset", default="tf1_small")
    parser.add_argument("--posteriors", default="down_diag,down_iaf1_nl,down_iaf2_nl")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    harness.setup()
    from iaf_tf import datasets

    base = harness.config(args.preset, args.hpconfig, max_steps=args.steps, seed=args.seed, data_dir=args.data_dir,
                          download=False, checkpoint_every=10**9)
    spec = datasets.get(base.data.dataset)
    test_images = spec.load("test", base.data.image_size, args.data_dir, evaluation=True)[:args.test_images]
    print(f"{args.preset} {args.hpconfig}: {args.steps} steps each (batch {base.optimization.batch_size}, "
          f"seed {args.seed}), the first {len(test_images)} test images, k=1", flush=True)
    rows = []
    for posterior in harness.listed(args.posteriors):
        begin = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="iaf_posterior_") as logdir:
            rows.append(run(base.replace(posterior=posterior, logdir=logdir), test_images))
        print(f"  {posterior}: done in {time.perf_counter() - begin:.0f}s", flush=True)
    print()
    harness.print_table([
        Column("posterior", "posterior"), Column("params", "params", "d"),
        Column("train bpd\n(last step)", "train_bpd", ".4f"), Column("test bpd\n(EMA)", "ema", ".4f"),
        Column("test bpd\n(last step)", "raw", ".4f"), Column("skipped", "skipped", "d"),
        Column("train s", "train_s", ".0f")], rows)


if __name__ == "__main__":
    main()
