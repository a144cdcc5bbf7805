"""Memory of a training step through weight-normed transposed convs: the layer's hand-written gradient
against plain autodiff of the same formula.

Each (mode, variant) runs in a fresh subprocess: a chain of `--layers` stride-2 transposed convs, each
followed by 2x2 average pooling (so the grid stays `--grid`) and an ELU, a loss, and the gradients of
all variables, each reduced to a scalar as soon as it exists (in a real step they pile up while the
activations are freed; here that would only blur the figures). One step warms up (tracing, graph
optimization, oneDNN primitives); during a second one it records, above the bytes in use before it,

- kept after forward: the bytes in use once the forward pass is done, read by a tf.py_function that
  the backward pass waits for: the activations and whatever else the backward pass is to read;
- step peak: the peak of the bytes in use during the step.

"Bytes in use" are those of TensorFlow's CPU allocator (tf.config.experimental.get_memory_info). It
keeps these statistics with the oneDNN allocator (the default on x86; not with TF_ENABLE_ONEDNN_OPTS=0),
for its pool of large buffers only (from about 256 KiB), which holds every kernel- and activation-sized
tensor here; the pool counts whole chunks, so a tensor may count for up to twice its size. The
process's resident size would not do: the pool keeps what it once allocated.

Variants: `custom` is WNConv2D's call (the kernel recomputed in the backward pass); `autodiff` is the
formula in plain TF ops (it keeps the kernel, the unit direction and what their gradients need);
`custom-merged` is `custom` without the backward pass's data dependency on dy (weight_norm._after), which
lets Grappler merge the recomputed kernel with the forward one (graph mode only: eager mode runs no
graph optimizer). Eager mode also keeps each conv's output (the tape holds AvgPool's input), whatever
the variant.

    .venv/bin/python bench/wn_memory.py [--channels 256 --layers 16 --batch 8 --grid 16 --repeats 3]
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"graph": ("custom", "custom-merged", "autodiff"), "eager": ("custom", "autodiff")}
MB = 1e6


def child(args):
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import tensorflow as tf

    from iaf_tf import weight_norm
    from iaf_tf.layers import WNConv2D

    if args.variant == "custom-merged":
        weight_norm._after = lambda dy, v: v

    rng = np.random.default_rng(0)
    convs = [WNConv2D(args.channels, (3, 3), (2, 2), transpose=True) for _ in range(args.layers)]
    x = tf.constant(rng.normal(size=[args.batch, args.grid, args.grid, args.channels]), tf.float32)
    for conv in convs:
        conv.build(x.shape)
        conv.g.assign(rng.normal(0, 0.3, conv.g.shape))
        conv.b.assign(rng.normal(0, 0.3, conv.b.shape))
    variables = [v for conv in convs for v in conv.trainable_variables]

    def plain(conv, h):
        v = tf.convert_to_tensor(conv.V)
        direction = v / tf.sqrt(tf.maximum(tf.reduce_sum(tf.square(v), [0, 1, 2], keepdims=True), 1e-12))
        kernel = tf.reshape(tf.exp(tf.convert_to_tensor(conv.g)), [1, 1, -1, 1]) * direction
        shape = [h.shape[0], 2 * h.shape[1], 2 * h.shape[2], conv.filters]
        return tf.nn.conv2d_transpose(h, kernel, shape, [1, 2, 2, 1], "SAME") + conv.b

    apply = plain if args.variant == "autodiff" else (lambda conv, h: conv(h))

    def in_use():
        return tf.config.experimental.get_memory_info("CPU:0")["current"]

    def step(x):
        with tf.GradientTape() as tape:
            h = x
            for conv in convs:
                h = tf.nn.elu(tf.nn.avg_pool2d(apply(conv, h), 2, 2, "VALID"))
            loss = tf.reduce_sum(tf.sin(h))
        # Reads the allocator between the passes: it needs the loss, and the backward pass needs it.
        turn = tf.py_function(lambda loss: float(in_use()), [loss], tf.float64)
        seed = tf.cast(turn >= 0, loss.dtype)
        grads = tape.gradient(loss, variables, output_gradients=seed)
        return turn, tf.add_n([tf.reduce_sum(tf.square(g)) for g in grads])

    if args.mode == "graph":
        step = tf.function(step)
    float(step(x)[1])
    before = in_use()
    tf.config.experimental.reset_memory_stats("CPU:0")
    turn, _ = step(x)
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    print(json.dumps({"kept_after_forward": float(turn) - before, "step_peak": peak - before}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="subprocesses per variant; the median is shown")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.mode, args.variant = args.child
        return child(args)

    kernels = 9 * args.channels ** 2 * 4 * args.layers
    activations = args.batch * args.grid ** 2 * args.channels * 4 * args.layers
    print(f"{args.layers} transposed convs 3x3 stride 2, {args.channels} -> {args.channels} channels, batch "
          f"{args.batch}, {args.grid}x{args.grid} -> {2 * args.grid}x{2 * args.grid}, in all: one kernel copy "
          f"per layer {kernels / MB:.1f} MB, the ELU outputs {activations / MB:.1f} MB, the conv outputs "
          f"{4 * activations / MB:.1f} MB")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    sizes = [f"--{k}={getattr(args, k)}" for k in ("channels", "grid", "batch", "layers")]
    print(f"\n{'mode':6} {'variant':14} {'kept after forward MB':>22} {'step peak MB':>13}   runs (kept/peak)")
    for mode, variants in VARIANTS.items():
        for variant in variants:
            runs = [json.loads(subprocess.run([sys.executable, __file__, *sizes, "--child", mode, variant], env=env,
                                              check=True, capture_output=True, text=True).stdout.splitlines()[-1])
                    for _ in range(args.repeats)]

            def median(key):
                values = sorted(run[key] / MB for run in runs)
                return values[len(values) // 2]

            each = " ".join(f"{run['kept_after_forward'] / MB:.1f}/{run['step_peak'] / MB:.1f}" for run in runs)
            print(f"{mode:6} {variant:14} {median('kept_after_forward'):22.1f} {median('step_peak'):13.1f}   {each}")

if __name__ == "__main__":
    main()
