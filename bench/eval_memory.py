"""Peak memory and speed of importance-sampled evaluation as k grows.

Each configuration runs in its own process (peak RSS is per process), on the same test images, with
the reference checkpoint of the original code. Target: k = 10,000 within 1.5x the memory of k = 100.
Usage: python bench/eval_memory.py [--images 2] [--data_dir ../shared/data]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REFERENCE = ROOT.parent / "shared" / "reference" / "tf1-small"


def child(args):
    from iaf_tf import data, evaluate, hparams
    from iaf_tf.likelihood import Evaluator

    averaged = evaluate.AveragedModel(hparams.load_preset("tf1_small"))
    averaged.restore(str(REFERENCE / "model.ckpt-3000"))
    images = data.load_cifar10("test", args.data_dir)[:args.images]
    evaluator = Evaluator(averaged.model)
    evaluator.nll(images[:1], k=min(args.k, args.max_batch), max_batch=args.max_batch)  # trace outside timing
    begin = time.time()
    bpd = float(evaluator.bits_per_dim(images, k=args.k, seed=0, max_batch=args.max_batch)[0])
    seconds = time.time() - begin
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"k": args.k, "max_batch": args.max_batch, "bpd": bpd, "seconds": seconds,
                      "peak_mib": peak_mib, "samples_per_s": args.images * args.k / seconds,
                      "images_per_s": args.images / seconds}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--data_dir", default=os.environ.get("CIFAR10_PATH", str(ROOT.parent / "shared" / "data")))
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--max_batch", type=int, default=100)
    args = parser.parse_args()
    if args.child:
        return child(args)

    runs = [(100, 100), (10_000, 100), (2_000, 2_000)]  # the last: one pass of all k samples, no chunking
    rows = []
    for k, max_batch in runs:
        out = subprocess.run([sys.executable, __file__, "--child", "--k", str(k), "--max_batch", str(max_batch),
                              "--images", str(args.images), "--data_dir", args.data_dir],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]["peak_mib"]
    print(f"{args.images} CIFAR-10 test images, reference checkpoint (tf1_small), EMA weights")
    print(f"{'k':>7s} {'per pass':>9s} {'bits/dim':>9s} {'peak MiB':>9s} {'vs k=100':>9s} "
          f"{'samples/s':>10s} {'images/s':>9s}")
    for r in rows:
        print(f"{r['k']:7d} {r['max_batch']:9d} {r['bpd']:9.4f} {r['peak_mib']:9.0f} {r['peak_mib'] / base:8.2f}x "
              f"{r['samples_per_s']:10.0f} {r['images_per_s']:9.3f}")
    ratio = rows[1]["peak_mib"] / base
    print(f"k=10,000 peak memory is {ratio:.2f}x that of k=100 (target <= 1.5x): {'OK' if ratio <= 1.5 else 'MISSED'}")


if __name__ == "__main__":
    main()
