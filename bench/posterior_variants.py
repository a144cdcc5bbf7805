"""Posterior variants side by side: train the same small config with each posterior for a fixed number
of steps (same seed, same data stream), then report the EMA test bits/dim (k = 1) of each.

Default budget (tf1_small, 2000 steps each, 2000 test images): about 10 minutes on 2 CPU cores. It
prints the bits/dim with the moving averages (what the original reports) and with the last weights.
Usage: python bench/posterior_variants.py [--steps 2000] [--test_images 2000] [--preset tf1_small]
           [--hpconfig ...] [--posteriors down_diag,down_iaf1_nl,down_iaf2_nl] [--data_dir ../shared/data]
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from iaf_tf import data, hparams, train  # noqa: E402
from iaf_tf.likelihood import Evaluator  # noqa: E402


def run(hps, train_images, test_images, steps, seed):
    trainer = train.Trainer(hps, tf.distribute.get_strategy(), seed=seed)
    batches = iter(data.train_dataset(train_images, hps.batch_size, seed=seed))
    trainer.initialize(next(batches).numpy())
    begin, recent = time.time(), []
    for _ in range(steps):
        metrics, _ = trainer.train_step(next(batches))
        recent = (recent + [float(metrics["bits_per_dim"])])[-100:]
    train_seconds = time.time() - begin
    evaluator = Evaluator(trainer.model)
    # The last weights too: after a short run the 0.999 averages still carry the early weights.
    raw_bpd, _ = evaluator.bits_per_dim(test_images, k=1, seed=seed)
    trainer.averages.copy_to_weights()
    test_bpd, eval_seconds = evaluator.bits_per_dim(test_images, k=1, seed=seed)
    return {"params": trainer.num_parameters, "train_bpd": float(np.mean(recent)), "test_bpd": test_bpd,
            "raw_bpd": raw_bpd, "skipped": int(trainer.skipped.numpy()), "train_s": train_seconds,
            "eval_s": 2 * eval_seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--test_images", type=int, default=2000)
    parser.add_argument("--preset", default="tf1_small")
    parser.add_argument("--hpconfig", default="", help="overrides on top of the preset, e.g. h_size=16")
    parser.add_argument("--posteriors", default="down_diag,down_iaf1_nl,down_iaf2_nl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", default=os.environ.get("CIFAR10_PATH", str(ROOT.parent / "shared" / "data")))
    args = parser.parse_args()

    base = hparams.resolve_hparams(args.preset, args.hpconfig).replace(num_gpus=1)
    train_images = data.load_images(base.dataset, "train", args.data_dir)
    test_images = data.load_eval_images(base.dataset, "test", args.data_dir)[:args.test_images]
    print(f"{args.preset} {args.hpconfig or ''}: {args.steps} steps each (batch {base.batch_size}, seed {args.seed}), "
          f"EMA weights on the first {len(test_images)} test images, k=1", flush=True)
    results = {}
    for posterior in args.posteriors.split(","):
        results[posterior] = run(base.replace(posterior=posterior), train_images, test_images, args.steps, args.seed)
        r = results[posterior]
        print(f"  {posterior}: done in {r['train_s'] + r['eval_s']:.0f}s", flush=True)

    print()
    print(f"{'posterior':14s} {'params':>8s} {'train bpd':>10s} {'test bpd':>9s} {'test bpd':>12s} {'skipped':>8s} "
          f"{'train s':>8s}")
    print(f"{'':14s} {'':>8s} {'(last 100)':>10s} {'(EMA)':>9s} {'(last step)':>12s}")
    for posterior, r in results.items():
        print(f"{posterior:14s} {r['params']:8d} {r['train_bpd']:10.4f} {r['test_bpd']:9.4f} {r['raw_bpd']:12.4f} "
              f"{r['skipped']:8d} {r['train_s']:8.0f}")


if __name__ == "__main__":
    main()
