"""Posterior variants side by side: train the same small config with each posterior for a fixed number
of steps (same seed, same data stream) with the real training loop, then report the test bits/dim
(k = 1) of each saved checkpoint, with the moving averages (what the original reports) and with the last
weights (after a short run the 0.999 averages still carry the early weights).

Usage:
  python bench/posterior_variants.py                    # full: tf1_small, 2000 steps each, 2000 test
                                                        # images; about 10 minutes on 2 CPU cores
  python bench/posterior_variants.py --steps 20 --test_images 100      # quick
  python bench/posterior_variants.py --preset tf1_small --hpconfig h_size=16 \\
      --posteriors down_diag,down_iaf1_nl,down_iaf2_nl --seed 0 --data_dir ../shared/data
"""

import argparse
import collections
import tempfile
import time

import harness
from harness import Column

RECENT_STEPS = 100  # the training bits/dim column averages the last this many steps


def run(cfg, test_images):
    """Train with train.train, then evaluate the checkpoint it saved; returns the table's row."""
    import numpy as np
    import iaf_tf
    from iaf_tf import train
    from iaf_tf.model import count_trainable_parameters

    trainer = train.Trainer(cfg)
    recent = collections.deque(maxlen=RECENT_STEPS)
    # The step callback reports times, not metrics: read the training bits/dim off the public step.
    harness.watch_steps(trainer, lambda _seconds, metrics: recent.append(float(metrics["bits_per_dim"])))
    step_seconds = []
    result = train.train(cfg, trainer=trainer, on_step=lambda record: step_seconds.append(record.seconds),
                         print_fn=harness.quiet)

    trained = iaf_tf.load(cfg.runtime.logdir, weights="ema")
    ema_bpd = trained.score(trained.nll(test_images, k=1, seed=cfg.runtime.seed))
    trained.load_weights(trained.checkpoint, weights="raw")
    return {"posterior": cfg.model.posterior, "params": count_trainable_parameters(trained.model),
            "train_bpd": float(np.mean(recent)), "test_bpd": ema_bpd,
            "raw_bpd": trained.score(trained.nll(test_images, k=1, seed=cfg.runtime.seed)),
            "skipped": result.skipped, "train_s": sum(step_seconds)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--test_images", type=int, default=2000)
    parser.add_argument("--preset", default="tf1_small")
    parser.add_argument("--hpconfig", default="", help="overrides on top of the preset, e.g. h_size=16")
    parser.add_argument("--posteriors", default="down_diag,down_iaf1_nl,down_iaf2_nl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", default=harness.DATA_DIR)
    args = parser.parse_args()

    harness.setup()
    from iaf_tf import config, datasets

    base = config.resolve(args.preset, args.hpconfig, num_gpus=1, max_steps=args.steps, seed=args.seed,
                          data_dir=args.data_dir, download=False, checkpoint_every=10**9)
    spec = datasets.get(base.data.dataset)
    test_images = spec.load("test", base.data.image_size, args.data_dir, evaluation=True)[:args.test_images]
    print(f"{args.preset} {args.hpconfig or ''}: {args.steps} steps each (batch {base.optimization.batch_size}, "
          f"seed {args.seed}), EMA weights on the first {len(test_images)} test images, k=1", flush=True)
    rows = []
    for posterior in args.posteriors.split(","):
        begin = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="iaf_posterior_") as logdir:
            rows.append(run(base.replace(posterior=posterior, logdir=logdir), test_images))
        print(f"  {posterior}: done in {time.perf_counter() - begin:.0f}s", flush=True)

    print()
    harness.print_table([
        Column("posterior", "posterior"), Column("params", "params", "d"),
        Column(f"train bpd\n(last {RECENT_STEPS})", "train_bpd", ".4f"), Column("test bpd\n(EMA)", "test_bpd", ".4f"),
        Column("test bpd\n(last step)", "raw_bpd", ".4f"), Column("skipped", "skipped", "d"),
        Column("train s", "train_s", ".0f")], rows)


if __name__ == "__main__":
    main()
