"""Peak memory and speed of importance-sampled evaluation as k grows.

Each configuration runs in its own process (peak RSS is per process), on the same test images, with
the reference checkpoint of the original code. Target: k = 10,000 within 1.5x the memory of k = 100
(in general: the second run within 1.5x the first).

Usage:
  python bench/eval_memory.py                           # full: k = 100, 10,000 (chunks of 100), 2,000 (one pass)
  python bench/eval_memory.py --runs 10/10,200/10,50/50 # quick
  python bench/eval_memory.py --images 4 --checkpoint ../shared/reference/tf1-small/model.ckpt-3000
"""

import argparse
import time

import harness
from harness import Column


def child(args):
    harness.setup()
    import iaf_tf
    from iaf_tf import data

    # Each pass holds at most eval_batch_size (image, sample) pairs; the architecture is read off the file.
    trained = iaf_tf.load(args.checkpoint, eval_batch_size=args.max_batch)
    images = data.load_cifar10("test", args.data_dir)[:args.images]
    trained.nll(images[:1], k=min(args.k, args.max_batch))  # trace outside timing
    begin = time.perf_counter()
    nll = trained.nll(images, k=args.k, seed=0)
    seconds = time.perf_counter() - begin
    harness.write_record(args.record, {
        "k": args.k, "max_batch": args.max_batch, "bpd": trained.score(nll), "seconds": seconds,
        "peak_mib": harness.peak_mib(), "samples_per_s": args.images * args.k / seconds,
        "images_per_s": args.images / seconds})


def parse_runs(text):
    """"k/per_pass,..." -> [(k, per_pass), ...]"""
    return [tuple(int(n) for n in run.split("/")) for run in text.split(",") if run]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--runs", default="100/100,10000/100,2000/2000",
                        help="k/samples per pass, comma-separated; the last default is one pass of all k "
                             "samples, no chunking")
    parser.add_argument("--checkpoint", default=str(harness.REFERENCE_DIR / "model.ckpt-3000"),
                        help="the checkpoint to evaluate (the original's TF1 reference by default)")
    parser.add_argument("--data_dir", default=harness.DATA_DIR)
    # Child-process arguments.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--max_batch", type=int, default=100, help=argparse.SUPPRESS)
    harness.add_child_arguments(parser)
    args = parser.parse_args()
    if args.child:
        return child(args)

    rows = [dict(harness.run_child(__file__, ["--child", "--k", k, "--max_batch", max_batch, "--images", args.images,
                                              "--checkpoint", args.checkpoint, "--data_dir", args.data_dir]),
                 k=k, max_batch=max_batch) for k, max_batch in parse_runs(args.runs)]
    first = rows[0]
    for r in rows:
        r["vs_first"] = r["peak_mib"] / first["peak_mib"] if "error" not in r and "error" not in first else None
    harness.print_table(
        [Column("k", "k", "d"), Column("per pass", "max_batch", "d"), Column("bits/dim", "bpd", ".4f"),
         Column("peak MiB", "peak_mib", ".0f"), Column(f"vs k={first['k']}", "vs_first", "{:.2f}x"),
         Column("samples/s", "samples_per_s", ".0f"), Column("images/s", "images_per_s", ".3f")],
        rows, labels=2, title=f"{args.images} CIFAR-10 test images, {args.checkpoint}, EMA weights")
    if len(rows) > 1 and rows[1].get("vs_first") is not None:
        ratio = rows[1]["vs_first"]
        print(f"k={rows[1]['k']:,} peak memory is {ratio:.2f}x that of k={first['k']:,} (target <= 1.5x): "
              f"{'OK' if ratio <= 1.5 else 'MISSED'}")


if __name__ == "__main__":
    main()
