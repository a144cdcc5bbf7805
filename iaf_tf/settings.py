"""The table of settings: every setting of iaf-tf, in sections, each with its default, its check and its
help written once (`setting(...)`, `hparam(...)`, `flag(...)`). `SETTINGS` is the table flattened by key;
iaf_tf.config builds `Config`, the parser, the presets and the absl flags on it.
"""

from __future__ import annotations

import dataclasses
import math
import re

from iaf_tf import datasets


# Checks return None when the value is fine, else what is allowed.
def positive(value):
    return None if value >= 1 else "must be a positive integer"


def non_negative(value):
    return None if value >= 0 else "must be >= 0"


def finite_positive(value):
    # Written as "not (ok)" so that NaN fails too.
    return None if math.isfinite(value) and value > 0 else "must be a finite number > 0"


def finite_non_negative(value):
    return None if math.isfinite(value) and value >= 0 else "must be a finite number >= 0"


def one_of(*allowed):
    def check(value):
        return None if value in allowed else f"must be one of {', '.join(allowed)}"
    return check


def _depths(value):
    if value and not re.fullmatch(r"\d+(-\d+)*", value):
        return 'must be "" or positive integers joined by "-", e.g. 10-10'
    if value and 0 in [int(d) for d in value.split("-")]:
        return "every level needs at least one block"
    return None


def _ema_decay(value):
    return None if 0 <= value < 1 else "must be in [0, 1)"


def _seed(value):
    # NumPy's and Python's seeding accept 0 .. 2**32 - 1.
    return None if 0 <= value < 2**32 else f"must be in 0..{2**32 - 1}"


def _non_empty(value):
    return None if value is None or value.strip() else "must not be empty"


def setting(default, help, check=None, hparam=False, flag=False, kind=None):
    """A dataclass field with what the parser, the checks and the flags need to know about it."""
    kind = kind or type(default)
    return dataclasses.field(default=default, metadata=dict(
        help=help, check=check, hparam=hparam, flag=flag, kind=kind))


def hparam(default, help, check=None, flag=False):
    return setting(default, help, check, hparam=True, flag=flag)


def flag(default, help, check=None, kind=None):
    return setting(default, help, check, flag=True, kind=kind)


# The first twelve hyper-parameters are the original tf_train.py's, with its defaults; the others default
# to what the original hard-codes, so an empty hpconfig is the original model.

@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = hparam("cifar10", f"Dataset: {', '.join(datasets.names())} (see iaf_tf/datasets.py).",
                          one_of(*datasets.names()))
    image_size: int = hparam(0, "Height and width of the model's input images (0 = the dataset's own: "
                                + ", ".join(f"{s.name} {s.image_size}" for s in datasets.REGISTRY.values())
                                + "); another value must match the files.", non_negative)
    data_dir: str = flag(None, "Dataset folder (default: " + ", ".join(
        f"${s.folder_variable} for {s.name}" for s in datasets.REGISTRY.values()) + ").", _non_empty, kind=str)
    download: bool = flag(True, "Where the files are not found, download them (" + ", ".join(
        f"{s.name} with {s.download}" for s in datasets.REGISTRY.values() if s.download)
        + "; IAF_TF_NO_DOWNLOAD=1 in the environment turns this off too).")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    z_size: int = hparam(32, "Latent channels per stochastic layer.", positive)
    h_size: int = hparam(160, "Channels of the residual blocks.", positive)
    depth: int = hparam(2, "Levels of IAF blocks (each after the first halves the resolution).", positive)
    num_blocks: int = hparam(2, "IAF blocks per level.", positive)
    depths: str = hparam("", 'Blocks per level joined by "-" (e.g. 10-10); when set, it overrides depth and '
                             "num_blocks.", _depths)
    # The Theano system's options; the defaults are the TF1 model.
    posterior: str = hparam("down_iaf2_nl", "Where q(z|x) is sampled and which IAF step follows it "
                            "(see block.IAFBlock).", one_of("up_diag", "up_iaf1_nl", "up_iaf2_nl", "down_diag",
                                                            "down_iaf1_nl", "down_iaf2_nl"))
    depth_ar: int = hparam(2, "Hidden masked layers of the IAF network.", non_negative)
    prior: str = hparam("diag", "Prior of each stochastic layer: a diagonal Gaussian (the only one ported).",
                        one_of("diag"))

    @property
    def level_depths(self) -> list[int]:
        if self.depths:
            return [int(d) for d in self.depths.split("-")]
        return [self.num_blocks] * self.depth


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    kl_min: float = hparam(0.25, "Free bits: the floor of each latent channel's batch-mean KL (nats).",
                           finite_non_negative)
    k: int = hparam(1, "Importance samples per image (training objective and evaluation bound).", positive)


@dataclasses.dataclass(frozen=True)
class OptimizationConfig:
    batch_size: int = hparam(16, "Images per replica per step.", positive)
    learning_rate: float = hparam(0.01, "Adamax step size.", finite_positive)
    ema_decay: float = hparam(0.999, "Decay of the weights' moving averages (used for evaluation).", _ema_decay)
    grad_clip: float = hparam(0.0, "Clip the global gradient norm to this (0 = off, as the original).",
                              finite_non_negative)
    skip_threshold: float = hparam(0.0, "Skip updates whose global gradient norm is above this (0 = off, as the "
                                        "original); skipped steps count towards max_skips.", finite_non_negative)


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    max_steps: int = flag(0, "Stop training at this step (0 = run until stopped, as the original).", non_negative)
    checkpoint_every: int = flag(100, "Steps between checkpoints.", positive)
    summary_every: int = flag(20, "Steps between TensorBoard summaries and console lines.", positive)
    image_every: int = flag(1000, "Steps between samples and reconstructions of the moving-average weights "
                                  "(TensorBoard images and PNGs in <logdir>/train; 0 = none).", non_negative)
    steps_per_loop: int = flag(1, "Training steps per call from the host, which waits for the device once a "
                                  "call (a call also ends where a summary, checkpoint or picture is due).",
                               positive)
    max_skips: int = hparam(10, "Stop after this many consecutive steps with a non-finite loss or gradient "
                                "(each is skipped).", positive)
    max_to_keep: int = flag(5, "Checkpoints kept in <logdir>/train (the newest ones; older ones are deleted).",
                            positive)


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    eval_batch_size: int = hparam(100, "(image, sample) pairs per evaluation forward pass.", positive)
    once: bool = flag(False, "Evaluate the latest checkpoint once and exit, instead of watching.")
    num_images: int = flag(0, "Evaluate only the first N images of the split (0 = all).", non_negative)
    poll_seconds: float = flag(60.0, "How often to look for a new checkpoint when watching.", finite_positive)
    wait_seconds: float = flag(0.0, "Stop watching after this long without a new checkpoint (0 = never).",
                               finite_non_negative)
    num_samples: int = flag(64, "--mode sample: how many samples.", positive)
    temperature: float = flag(1.0, "--mode sample: scale of the prior noise.", finite_non_negative)


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    logdir: str = flag("/tmp/vae", "Logging directory.", _non_empty)
    checkpoint: str = flag(None, "A checkpoint (native or the original TF1 code's: a file, a prefix or a folder) "
                                 "to evaluate or sample instead of watching <logdir>/train, or to start a new "
                                 "training run from.", _non_empty, kind=str)
    num_gpus: int = hparam(8, "Data-parallel replicas (GPUs).", positive, flag=True)
    strategy: str = flag("mirrored", "mirrored: replicas on this machine; multi_worker: across the machines "
                                     "in TF_CONFIG.", one_of("mirrored", "multi_worker"))
    cpu_replicas: int = flag(0, "Run --num_gpus replicas on that many logical CPU devices (testing and "
                                "debugging on hosts without GPUs).", non_negative)
    threads: int = flag(0, "Intra-op threads (0 = TensorFlow's default).", non_negative)
    seed: int = flag(0, "Seed for initialization, data order and noise.", _seed)
    mixed_precision: bool = hparam(False, "Compute the IAF blocks in bfloat16 (weights, likelihood and "
                                          "optimizer stay float32).")
    jit_compile: bool = hparam(False, "Compile each replica's forward and backward pass, the weight update and "
                                      "evaluation with XLA.")
    xla_programs: str = hparam("auto", "Without jit_compile, run the weight update, each conv's weight norm and the "
                                       "noise as small XLA programs: far fewer kernel launches, which bound a GPU's "
                                       "step; on CPUs slower to start and no faster (BUILD.md). auto: on GPUs.",
                               one_of("auto", "on", "off"))


SECTIONS = {"data": DataConfig, "model": ModelConfig, "objective": ObjectiveConfig,
            "optimization": OptimizationConfig, "training": TrainingConfig, "evaluation": EvaluationConfig,
            "runtime": RuntimeConfig}


@dataclasses.dataclass(frozen=True)
class Setting:
    section: str
    name: str
    default: object
    kind: type
    help: str
    check: object
    hparam: bool
    flag: bool


def _settings():
    found = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.name in found:
                raise RuntimeError(f"setting {f.name!r} is in two sections")
            m = f.metadata
            found[f.name] = Setting(section, f.name, f.default, m["kind"], m["help"], m["check"], m["hparam"],
                                    m["flag"])
    return found


SETTINGS = _settings()
HPARAM_KEYS = sorted(name for name, s in SETTINGS.items() if s.hparam)
