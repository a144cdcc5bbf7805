"""Importance sampling's peak memory and speed as k grows, on the original's reference checkpoint, a
process each. Target: the second run (k = 10,000 in chunks of 100) within 1.5x the first's (k = 100).

Usage:
  python bench/eval_memory.py                           # k = 100, 10,000 (chunks of 100), 2,000 (one pass)
  python bench/eval_memory.py --runs 10/10,200/10,50/50 # quick
  python bench/eval_memory.py --runs 10/100,100/100 --images 20 --baseline /tmp/iaf-baseline  # side by side
"""

import argparse
import time

import harness
from harness import Column


def child_nll(args):
    import iaf_tf
    from iaf_tf import data
    from iaf_tf.likelihood import plan_chunks

    # Each pass holds at most eval_batch_size (image, sample) pairs; the architecture is read off the file.
    trained = iaf_tf.load(args.checkpoint, eval_batch_size=args.max_batch)
    images = data.load_cifar10("test", args.data_dir)[:args.images]
    per_pass, samples = plan_chunks(args.k, args.max_batch)
    trained.nll(images[:per_pass], k=samples)  # trace the pass's shape outside timing
    begin = time.perf_counter()
    nll = trained.nll(images, k=args.k, seed=0)
    seconds = time.perf_counter() - begin
    return {"bpd": trained.score(nll), "seconds": seconds, "peak_mib": harness.peak_mib(),
            "samples_per_s": args.images * args.k / seconds, "images_per_s": args.images / seconds}


def main():
    parser = harness.arguments(__doc__, baseline=True, hpconfig=False)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--runs", default="100/100,10000/100,2000/2000",
                        help="k/samples per pass, comma-separated (the last default: all k in one pass)")
    parser.add_argument("--checkpoint", default=str(harness.REFERENCE_DIR / "model.ckpt-3000"))
    parser.add_argument("--k", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--max_batch", type=int, default=100, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return harness.run_as_child(args, {"nll": child_nll})

    runs = [tuple(map(int, run.split("/"))) for run in harness.listed(args.runs)]
    rows = []
    for checkout, root in harness.checkouts(args):
        ours = [dict(harness.run_child(__file__, [
            "--child", "nll", "--k", k, "--max_batch", max_batch, "--images", args.images, "--checkpoint",
            args.checkpoint, "--data_dir", args.data_dir, "--root", root]), checkout=checkout, k=k,
            max_batch=max_batch) for k, max_batch in runs]
        for r in ours:
            r["vs_first"] = harness.ratio(r.get("peak_mib"), ours[0].get("peak_mib"))
        rows += ours
    speeds = {(r["k"], r["max_batch"]): r.get("samples_per_s") for r in rows if r["checkout"] == "baseline"}
    for r in rows:
        r["speed_vs_baseline"] = harness.ratio(r.get("samples_per_s"), speeds.get((r["k"], r["max_batch"])))
    first = rows[0]
    columns = [Column("k", "k", "d"), Column("per pass", "max_batch", "d"), Column("bits/dim", "bpd", ".4f"),
               Column("peak MiB", "peak_mib", ".0f"), Column(f"vs k={first['k']}", "vs_first", "{:.2f}x"),
               Column("samples/s", "samples_per_s", ".0f"), Column("images/s", "images_per_s", ".3f")]
    if args.baseline:
        columns = [Column("checkout", "checkout")] + columns + [
            Column("samples/s\nvs baseline", "speed_vs_baseline", "{:.2f}x")]
    harness.print_table(columns, rows, labels=3 if args.baseline else 2,
                        title=f"{args.images} CIFAR-10 test images, {args.checkpoint}, EMA weights")
    if len(runs) > 1 and rows[1]["vs_first"] is not None:
        print(f"k={rows[1]['k']:,} peak memory is {rows[1]['vs_first']:.2f}x that of k={first['k']:,} "
              f"(target <= 1.5x): {'OK' if rows[1]['vs_first'] <= 1.5 else 'MISSED'}")
    harness.save_json(args.json, rows)


if __name__ == "__main__":
    main()
