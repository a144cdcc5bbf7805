"""Training: the objective (`loss_fn`) and one step (`Trainer.train_step`), which reads top to bottom:
each replica's loss and gradients, their mean across replicas (the original's tower averaging), and on
every device the usable-update test, the moving averages (of the weights before this update, as the
original's) and Adamax. `train()` runs the loop of iaf_tf.loop around it.
"""

import tensorflow as tf

from iaf_tf import distribute, ema, noise, optim, programs
from iaf_tf import distributions as dist
from iaf_tf.checkpoints import TrainState
from iaf_tf.variables import local_copies, tf_variable


def free_bits_kl(kl_map, kl_min):
    """Per-image KL objective of one layer with the original's free bits: each channel's KL, summed over
    positions and averaged over the batch, is floored at kl_min; every image is charged the floored total."""
    if kl_min <= 0:
        return tf.reduce_sum(kl_map, axis=[1, 2, 3])
    per_channel = tf.reduce_mean(tf.reduce_sum(kl_map, axis=[1, 2]), axis=0)
    total = tf.reduce_sum(tf.maximum(per_channel, kl_min))
    return tf.fill([tf.shape(kl_map)[0]], total)


def loss_fn(model, images, seed, objective):
    """The original's objective on one replica's batch (summed over it), and the training summaries
    (means over the batch). `objective` is the config's objective section (kl_min, k)."""
    out = model(images, seed, k=objective.k)
    kl_obj_layers = [free_bits_kl(kl_map, objective.kl_min) for kl_map in out["kl_layers"]]
    kl_obj = tf.add_n(kl_obj_layers)
    loss = tf.reduce_sum(kl_obj - out["log_pxz"])
    nll = dist.importance_sampled_nll(out["log_pxz"], out["kl"], objective.k)
    metrics = {
        "bits_per_dim": dist.bits_per_dim(tf.reduce_mean(nll), 1, model.num_dims),
        model.spec.unit: model.score(nll),  # the dataset's reported unit (bits_per_dim again for CIFAR-10)
        "dec_log_stdv": tf.convert_to_tensor(model.dec_log_stdv),
        "kl_obj": tf.reduce_mean(kl_obj),
        "kl_cost": tf.reduce_mean(out["kl"]),
        "log_pxz": -tf.reduce_mean(out["log_pxz"]),
    }
    for (i, j), layer_obj, kl_map in zip(model.block_index, kl_obj_layers, out["kl_layers"]):
        metrics[f"kl_obj_{i:02d}_{j:02d}"] = tf.reduce_mean(layer_obj)
        metrics[f"kl_cost_{i:02d}_{j:02d}"] = tf.reduce_mean(tf.reduce_sum(kl_map, axis=[1, 2, 3]))
    return loss, metrics


class Trainer:
    """A run's TrainState (`state`) under a strategy, with the compiled training step and loop.

    The step has two compiled parts, each replica's loss and gradients (`_gradients`, compiled with XLA
    when jit_compile is on) and each device's update (`_update`), with the all-reduce between them:
    keeping it outside both is what lets jit_compile work under MirroredStrategy and
    MultiWorkerMirroredStrategy. With xla_programs (on GPUs by default) the update is compiled even
    without jit_compile: a dozen small element-wise ops for each of hundreds of variables, which XLA
    fuses into a few loops per variable; so are the weight norm and the noise (iaf_tf.programs).
    """

    def __init__(self, config, strategy=None):
        self.config = config
        self.strategy = strategy or distribute.make_strategy(config.runtime)
        self.num_replicas = self.strategy.num_replicas_in_sync
        with self.strategy.scope():
            self.state = TrainState(config)
        self.model = self.state.model
        # The variables that get gradients: set when the gradient function is first traced. The top
        # block's last up-pass conv does not reach the loss; it gets no update, as in TF1.
        self._updated = None
        self.metric_names = None  # the order of train_loop's metrics vector, set when it is traced
        # No AutoGraph anywhere: nothing here has tensor-dependent Python control flow, and AutoGraph's
        # cache of converted functions once handed a test the conversion of another (freed) function.
        compiled = dict(autograph=False)
        self.xla_programs = distribute.uses_xla_programs(config.runtime)
        self._gradients = tf.function(self._gradients, jit_compile=config.runtime.jit_compile, **compiled)
        self._update = tf.function(self._update, jit_compile=config.runtime.jit_compile or self.xla_programs,
                                   **compiled)
        self.train_step = tf.function(self.train_step, **compiled)
        self.train_loop = tf.function(self.train_loop, **compiled)

    def train_step(self, batch):
        """One step on a distributed batch; returns (metrics averaged over replicas, whether applied)."""
        state = self.state
        step = state.step.read_value()
        # Each replica: the loss on its batch and its gradients (compiled).
        grads, metrics = self.strategy.run(self._replica_gradients, args=(batch, step))
        # Their mean across replicas, between the two compiled parts.
        grads, metrics = self._mean_across_replicas(grads, metrics)
        # Each device updates its copy of the state with the same mean gradients (compiled, `_update`):
        # usable_update(...), then the moving averages, then Adamax; an unusable update changes nothing.
        learning_rate = tf.convert_to_tensor(state.optimizer.learning_rate)
        applied = []
        for device, device_grads, device_state in self._per_device(grads):
            with tf.device(device):
                applied.append(self._update(device_grads, metrics["objective"], learning_rate, *device_state))
        applied = applied[0]  # the same on every device
        state.optimizer.iterations.assign_add(tf.cast(applied, state.optimizer.iterations.dtype))
        state.step.assign_add(1)
        state.skipped.assign_add(1 - tf.cast(applied, tf.int64))
        return metrics, applied

    def _update(self, grads, objective, learning_rate, weights, first_moments, running_maxes, shadows):
        """One device's update, compiled: skipped by scalar selects that leave every value as it was, not
        by a branch (see optim.adamax_update). The averages move towards the weights before this update,
        as the original's: its EMA op reads the variables in the same step as Adamax writes them, and TF1
        runs the read first."""
        opt, adamax = self.config.optimization, self.state.optimizer
        norm = tf.linalg.global_norm(grads)
        usable = usable_update(objective, norm, opt.skip_threshold)
        if opt.grad_clip > 0:
            grads, _ = tf.clip_by_global_norm(grads, opt.grad_clip, use_norm=norm)
        # The step's scalars, selected once here for every variable.
        settings = (usable, optim.when_applied(usable, 1.0 - self.state.averages.decay, 0.0),
                    optim.adamax_coefficients(learning_rate, adamax.beta_1, adamax.beta_2, adamax.epsilon, usable))
        if programs.inside_xla():  # one program, which XLA fuses across variables
            _average_then_adamax(grads, weights, first_moments, running_maxes, shadows, *settings)
        else:
            for one_variable in zip(grads, weights, first_moments, running_maxes, shadows):
                _update_variable(*([v] for v in one_variable), *settings)
        return usable

    def train_loop(self, batches, num_steps):
        """`num_steps` steps from the distributed iterator `batches` in one call from the host. Returns the
        last step's metrics as one vector (in the order of `self.metric_names`, so that the host reads
        them at once) and whether each step was applied. Nothing in the loop's condition depends on the
        steps, so a GPU can run them back to back; the host judges the skips afterwards. `num_steps` is at
        most training.steps_per_loop."""
        if self.config.training.steps_per_loop == 1:
            # The default: one step a call, with no loop around it to trace, optimize and set up (the while
            # loop's graph took seconds more at the first call than the step's).
            metrics, applied = self.train_step(next(batches))
            return self._packed(metrics), applied[tf.newaxis]

        def another(done, flags, _):
            metrics, applied = self.train_step(next(batches))
            return done + 1, flags.write(done, applied), self._packed(metrics)

        # The first step is the loop's too, so that the graph holds train_step once (Grappler and the
        # executor's set-up pay for every copy); the metrics vector's length is known once the body is traced.
        start = (tf.constant(0), tf.TensorArray(tf.bool, size=num_steps), tf.zeros([0]))
        _, flags, packed = tf.while_loop(lambda done, *_: done < num_steps, another, start,
                                         shape_invariants=(tf.TensorShape([]), None, tf.TensorShape([None])))
        return packed, flags.stack()

    def _packed(self, metrics):
        self.metric_names = sorted(metrics)
        return tf.stack([metrics[name] for name in self.metric_names])

    def _replica_gradients(self, images, step):
        # The replica's noise seed is made here, outside the compiled function, which is traced once per
        # device: a seed made inside it could be one replica's constant.
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        return self._gradients(images, noise.training_key(self.config.runtime.seed, step, self.num_replicas, replica))

    def _gradients(self, images, seed):
        variables = self.state.variables
        with programs.enabled(self.xla_programs):
            with tf.GradientTape() as tape:
                loss, metrics = loss_fn(self.model, images, seed, self.config.objective)
            grads = tape.gradient(loss, variables)
        self._updated = [i for i, g in enumerate(grads) if g is not None]
        return [grads[i] for i in self._updated], dict(metrics, objective=loss)

    def _mean_across_replicas(self, grads, metrics):
        """The mean over replicas of gradients and summaries, in one batch (the original's tower averaging)."""
        names = sorted(metrics)
        values = list(grads) + [metrics[name] for name in names]
        destinations = [tf_variable(self.state.variables[i]) for i in self._updated] + [metrics[name] for name in names]
        reduced = self.strategy.extended.batch_reduce_to(tf.distribute.ReduceOp.MEAN, list(zip(values, destinations)))
        grads = reduced[:len(grads)]
        metrics = {name: local_copies(value)[0] for name, value in zip(names, reduced[len(grads):])}
        return grads, metrics

    def _per_device(self, grads):
        """For each device (mirrored copies stay equal: every device applies the same mean gradients):
        (the device, its copies of the gradients, [its weights, Adamax first moments, running maxes, averages])."""
        state, updated = self.state, self._updated
        groups = [[local_copies(v) for v in group] for group in (
            [tf_variable(state.variables[i]) for i in updated],
            [tf_variable(state.optimizer.first_moments[i]) for i in updated],
            [tf_variable(state.optimizer.running_maxes[i]) for i in updated],
            [state.averages.shadow_for(state.variables[i]) for i in updated])]
        grads = [local_copies(g) for g in grads]
        return [(groups[0][0][d].device, [g[d] for g in grads], [[v[d] for v in group] for group in groups])
                for d in range(len(grads[0]))]

    def initialize(self, images):
        """Data-dependent init on one replica-sized batch, then start the averages there."""
        with self.strategy.scope():
            self.model.initialize(tf.constant(images[:self.config.optimization.batch_size]),
                                  noise.key(self.config.runtime.seed, noise.INITIALIZATION))
            self.state.averages.reset()


def _average_then_adamax(grads, weights, first_moments, running_maxes, shadows, usable, average_rate,
                         adamax_coefficients):
    """The averages and Adamax, with rates already selected by `usable` (0 and no-op rates when it is False)."""
    ema.move_towards(shadows, weights, average_rate)
    optim.apply_adamax(grads, weights, first_moments, running_maxes, adamax_coefficients, usable)


# One variable's update as a function that is traced once per variable shape and called for every variable
# of that shape (the README recipe's hundreds of updated variables have a few dozen shapes): traced inline,
# the update was a large part of the step's graph, which tracing, Grappler and the executor's set-up pay for
# at the first step (BUILD.md, "Time to the first step"). `_noinline` keeps the calls as calls, so that
# Grappler optimizes each body once (a compiled `_update` traces the body inline: see programs.inside_xla).
_update_variable = tf.function(_average_then_adamax, autograph=False, experimental_attributes={"_noinline": True})


def usable_update(objective, grad_norm, skip_threshold):
    """Whether a step's update may be applied: its loss and gradients are finite (their global norm is
    finite exactly when every gradient is, short of float32 overflow of the squares, far beyond any
    usable update), and the norm is under skip_threshold when that is set."""
    usable = tf.logical_and(tf.math.is_finite(objective), tf.math.is_finite(grad_norm))
    if skip_threshold > 0:
        usable = tf.logical_and(usable, grad_norm < skip_threshold)
    return usable


def train(config, trainer=None, on_step=None, print_fn=print):
    """Train per `config` with `trainer` (default: a new Trainer): the loop of iaf_tf.loop, which resumes,
    runs the steps, writes checkpoints, summaries and pictures and stops. Returns a loop.TrainResult."""
    from iaf_tf import loop  # the loop builds on this module's Trainer
    return loop.run(config, trainer, on_step, print_fn)
