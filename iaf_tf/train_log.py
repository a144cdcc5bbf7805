"""The console lines, TensorBoard summaries and pictures of the training loop (`TrainLog`)."""

import time

import tensorflow as tf

from iaf_tf import images as images_lib

PICTURES, PICTURE_SCALE = 36, 4  # images per grid (half of them inputs, for reconstructions); enlargement


class TrainLog:
    """The console lines, TensorBoard summaries and pictures of the training loop, for a TrainState."""

    FIRST_LINES = 10  # the first steps of a run are logged one by one

    def __init__(self, state, train_dir, is_chief, say, pictures):
        self.state = state
        self.train_dir = train_dir
        self.say = say
        # Training images to reconstruct; none on other workers than the chief, which writes nothing.
        self.pictures = pictures if is_chief else None
        self.image_every = state.config.training.image_every
        self.summary_every = state.config.training.summary_every
        self.unit = state.spec.unit
        self.writer = tf.summary.create_file_writer(train_dir) if is_chief else tf.summary.create_noop_writer()
        self.skip_reason = "non-finite loss or gradient" + (
            " or gradient norm over skip_threshold" if state.config.optimization.skip_threshold else "")
        self.skipped = int(state.skipped.numpy())
        self.calls_reported = 0
        self.line_start = self.window_start = time.time()
        self.window_images = 0

    def step(self, step, applied, images):
        """After each step: count its images, and the step if it was skipped."""
        self.window_images += images
        if not applied:
            self.skipped += 1

    def skipped_update(self, step, in_a_row):
        self.say(f"Iteration {step}: {self.skip_reason}, update skipped ({in_a_row} in a row, {self.skipped} in all)")

    def report(self, step, metrics, in_a_skip_streak=False):
        """After each host call, with the metrics of its last step (summaries at every call of a streak
        of skipped steps)."""
        if self.calls_reported < self.FIRST_LINES or step % self.summary_every == 0:
            score = f"{float(metrics[self.unit]):.2f}" if self.unit == "nats_per_image" \
                else f"{float(metrics[self.unit]):.4f}"
            self.say(f"Iteration {step}, time = {time.time() - self.line_start:.2f}s, train {self.unit} = {score}, "
                     f"dec_log_stdv = {float(metrics['dec_log_stdv']):.4f}")
            self.line_start = time.time()
        if step % self.summary_every == 0 or in_a_skip_streak:
            self._summaries(step, metrics)
        if self.image_every and step % self.image_every == 0 and self.pictures is not None:
            self._write_pictures(step)
        self.calls_reported += 1

    def _summaries(self, step, metrics):
        elapsed = time.time() - self.window_start
        with self.writer.as_default(step=step):
            for name, value in metrics.items():
                if name != "objective":
                    tf.summary.scalar(f"model/{name}", value)
            if elapsed > 0:
                tf.summary.scalar("images_per_second", self.window_images / elapsed)
            tf.summary.scalar("train/skipped_steps", self.skipped)
        self.writer.flush()
        self.window_start, self.window_images = time.time(), 0

    def _write_pictures(self, step):
        """Reconstructions and prior samples of the moving-average weights, what evaluation will score."""
        seed, model = self.state.config.runtime.seed, self.state.model
        with self.state.averages.swapped_in():
            grids = {"reconstructions": images_lib.interleave(
                         self.pictures, images_lib.reconstructions(model, self.pictures, seed)),
                     "samples": images_lib.samples(model, PICTURES, seed=seed)}
        images_lib.write_pictures(self.writer, self.train_dir, step,
                                  {name: images_lib.tile(grid) for name, grid in grids.items()}, scale=PICTURE_SCALE)
        self.writer.flush()

    def close(self):
        self.writer.close()


