"""Training from scratch, then the test bits/dim (k = 1) of the checkpoint with the moving averages (what
the original reports) and with the last weights, for each --posteriors (same seed, same data). The default
is the original's reference run, 3,000 steps of tf1_small scored on all 10,000 test images.

Usage:
  python bench/train_fidelity.py                        # the reference run (~10 minutes on 2 cores)
  python bench/train_fidelity.py --steps 20 --test_images 100                  # quick
  python bench/train_fidelity.py --posteriors down_diag,down_iaf1_nl,down_iaf2_nl --steps 2000 --test_images 2000
"""

import json
import tempfile
import time

import harness
from harness import Column


def main():
    parser = harness.arguments(__doc__)
    parser.add_argument("--preset", default="tf1_small")
    parser.add_argument("--posteriors", default="", help="comma-separated (default: the preset's)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--test_images", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    harness.setup()
    import iaf_tf
    from iaf_tf import datasets, train
    from iaf_tf.model import count_trainable_parameters

    base = harness.config(args.preset, args.hpconfig, max_steps=args.steps, seed=args.seed, data_dir=args.data_dir,
                          download=False, checkpoint_every=10**9)
    spec = datasets.get(base.data.dataset)
    test_images = spec.load("test", base.data.image_size, args.data_dir, evaluation=True)[:args.test_images]
    expected = json.loads((harness.REFERENCE_DIR / "expected.json").read_text())[
        "training_curve_from_scratch"]["ema_test_bpd_after_3000_steps"]
    rows = []
    for posterior in harness.listed(args.posteriors) or [base.model.posterior]:
        begin = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="iaf_fidelity_") as logdir:
            cfg = base.replace(posterior=posterior, logdir=logdir)
            result = train.train(cfg, print_fn=harness.quiet)
            row = {"posterior": posterior, "train_bpd": result.metrics["bits_per_dim"], "skipped": result.skipped,
                   "train_s": time.perf_counter() - begin}
            trained = iaf_tf.load(logdir, weights="ema")
            row["params"] = count_trainable_parameters(trained.model)
            for weights in ("ema", "raw"):
                trained.load_weights(trained.checkpoint, weights=weights)
                row[weights] = trained.score(trained.nll(test_images, k=1, seed=args.seed))
        rows.append(row)
        print(f"  {posterior}: done in {time.perf_counter() - begin:.0f}s", flush=True)
    harness.print_table([
        Column("posterior", "posterior"), Column("params", "params", "d"),
        Column("train bpd\n(last step)", "train_bpd", ".4f"), Column("test bpd\n(EMA)", "ema", ".4f"),
        Column("test bpd\n(last weights)", "raw", ".4f"), Column("skipped", "skipped", "d"),
        Column("train s", "train_s", ".0f")], rows, notes=[
        f"{args.preset} {args.hpconfig}: {args.steps} steps, seed {args.seed}, {len(test_images)} test images, k=1.",
        f"The original, tf1_small after 3,000 steps, all test images, EMA: {expected} (two seeds; target: "
        f"within 0.1 of their mean, {sum(expected) / len(expected):.4f})."])
    harness.save_json(args.json, rows)


if __name__ == "__main__":
    main()
