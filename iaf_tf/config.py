"""Every setting of iaf-tf, in sections, each with its default, its check and its help written once.

A setting is a hyper-parameter (given in `--hpconfig key=value,...`, the original's syntax, or in a
preset file), a flag (`--key`), or both (`num_gpus`, as in the original). Keys are unique across sections,
so `Config.replace(h_size=8, max_steps=5)` needs no section names; code reads `config.model.h_size`.
Adding a setting is one `setting(...)` line in its section; `bin/iaf.py --helpfull` lists them all.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

PRESETS_DIR = Path(__file__).resolve().parent / "presets"


from iaf_tf import datasets
from iaf_tf.errors import ConfigError


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
                            "(see model.IAFBlock).", one_of("up_diag", "up_iaf1_nl", "up_iaf2_nl", "down_diag",
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


@dataclasses.dataclass(frozen=True, repr=False)
class Config:
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    optimization: OptimizationConfig = OptimizationConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    def __post_init__(self):
        for s in SETTINGS.values():
            value = getattr(getattr(self, s.section), s.name)
            if value is None and s.default is None:
                continue
            if type(value) is not s.kind:
                raise ConfigError(f"invalid {_label(s)}={value!r}: expected {s.kind.__name__}")
            why = s.check(value) if s.check else None
            if why:
                raise ConfigError(f"invalid {_label(s)}={value!r}: {why}")
        if not self.data.image_size:
            own = datasets.get(self.data.dataset).image_size
            object.__setattr__(self, "data", dataclasses.replace(self.data, image_size=own))
        self._check_levels_fit()
        self._check_replicas()

    # Checks that compare settings live here, so that the command line and the Python API refuse the same.
    def _check_replicas(self):
        runtime = self.runtime
        if runtime.cpu_replicas and runtime.cpu_replicas != runtime.num_gpus:
            raise ConfigError(f"--cpu_replicas={runtime.cpu_replicas} must equal --num_gpus={runtime.num_gpus}")

    def _check_levels_fit(self):
        """Each level halves the resolution after the encoder's stride 2, down to at least 1x1."""
        levels, size = len(self.model.level_depths), self.data.image_size
        if size % 2**levels == 0:
            return
        fits = 0
        while size % 2 ** (fits + 1) == 0:
            fits += 1
        key = "depths" if self.model.depths else "depth"
        raise ConfigError(f"invalid hparam {key}={self.get(key)!r}: {levels} levels need image_size divisible by "
                          f"{2**levels}, and image_size={size} allows at most {fits} levels")

    def get(self, name):
        return getattr(getattr(self, SETTINGS[name].section), name)

    def replace(self, **values) -> Config:
        """A copy with these settings changed (any section, by key)."""
        unknown = sorted(set(values) - set(SETTINGS))
        if unknown:
            raise ConfigError(f"unknown hparam {unknown[0]!r}; valid keys: {', '.join(HPARAM_KEYS)}; other "
                              f"settings: {', '.join(sorted(set(SETTINGS) - set(HPARAM_KEYS)))}")
        if "dataset" in values and "image_size" not in values:
            values = dict(values, image_size=0)  # another dataset: its own size, unless given with it
        sections = {}
        for name, value in values.items():
            # Ints are accepted for float settings (learning_rate=1), bools never for numbers.
            if SETTINGS[name].kind is float and type(value) is int:
                value = float(value)
            sections.setdefault(SETTINGS[name].section, {})[name] = value
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)
                                            for section, changes in sections.items()})

    def parse(self, text: str) -> Config:
        """Apply an hpconfig string "key=value,key=value" (later entries win, as in the original)."""
        entries = parse_entries(text)
        try:
            return self.replace(**entries)
        except ConfigError as e:
            raise ConfigError(f"{e} (from {text.strip()!r})") from None

    def architecture(self) -> dict:
        """What the weights' shapes and meaning depend on: a run keeps these for life."""
        return dict(dataset=self.data.dataset, image_size=self.data.image_size, z_size=self.model.z_size,
                    h_size=self.model.h_size, level_depths=self.model.level_depths,
                    posterior=self.model.posterior, depth_ar=self.model.depth_ar, prior=self.model.prior)

    def hparams(self) -> dict:
        """The hyper-parameters (the --hpconfig keys) and their values."""
        return {name: self.get(name) for name in HPARAM_KEYS}

    def to_hpconfig(self) -> str:
        """The hyper-parameters in the --hpconfig syntax (parse() reads it back)."""
        return ",".join(f"{k}={_format(v)}" for k, v in self.hparams().items())

    __repr__ = __str__ = to_hpconfig


def parse_entries(text: str) -> dict:
    """{key: typed value} of an hpconfig string, checked against the hparam keys."""
    entries = {}
    for entry in (text or "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        key, sep, raw = entry.partition("=")
        if not sep:
            raise ConfigError(f"malformed hparam entry {entry!r}: expected key=value")
        key, raw = key.strip(), raw.strip()
        if key not in HPARAM_KEYS:
            raise ConfigError(f"unknown hparam {key!r} in {entry!r}; valid keys: {', '.join(HPARAM_KEYS)}")
        entries[key] = _convert(SETTINGS[key].kind, raw, entry)
    return entries


def _format(value):
    return str(value).lower() if isinstance(value, bool) else str(value)


def _label(s):
    return f"hparam {s.name}" if s.hparam else f"flag --{s.name}"


def _convert(kind, raw, entry):
    if kind is bool:
        if raw.lower() not in ("true", "false"):
            raise ConfigError(f"invalid bool in {entry!r}: use true or false")
        return raw.lower() == "true"
    if kind is str:
        return raw
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"invalid {kind.__name__} in {entry!r}") from None


# ---------------------------------------------------------------- presets

def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.cfg"))


def read_preset(name: str) -> str:
    """The preset's hpconfig string: its non-comment lines joined with ","."""
    available = list_presets()
    if name not in available:
        raise ConfigError(f"unknown preset {name!r}; available presets: {', '.join(available) or '(none)'} "
                          f"(files in {PRESETS_DIR})")
    lines = (PRESETS_DIR / f"{name}.cfg").read_text().splitlines()
    return ",".join(s for s in map(str.strip, lines) if s and not s.startswith("#"))


def load_preset(name: str) -> Config:
    try:
        return Config().parse(read_preset(name))
    except ConfigError as e:
        if str(e).startswith("unknown preset"):
            raise
        raise ConfigError(f"preset {name!r} ({PRESETS_DIR / name}.cfg): {e}") from None


def resolve(preset: str | None = None, hpconfig: str = "", **settings) -> Config:
    """The preset (or the defaults), then the hpconfig entries, then any other settings by key."""
    base = load_preset(preset) if preset else Config()
    return base.parse(hpconfig).replace(**settings)


# ---------------------------------------------------------------- absl flags

def define_flags(flags):
    """Define an absl flag for every flag setting, with its default and help from here."""
    keys = "\n".join(f"{name} ({SETTINGS[name].section}, default {_format(SETTINGS[name].default) or '(empty)'}): "
                     f"{SETTINGS[name].help}" for name in HPARAM_KEYS)
    flags.DEFINE_string("hpconfig", "", f"Hyper-parameters: key=value,key=value, with these keys:\n{keys}")
    flags.DEFINE_string("preset", "", f"Named preset ({', '.join(list_presets())}); --hpconfig overrides it.")
    for s in SETTINGS.values():
        if not s.flag:
            continue
        define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
                  str: flags.DEFINE_string}[s.kind]
        define(s.name, None if s.hparam else s.default, f"[{s.section}] {s.help}"
               + (f" Overrides the {s.name} hparam (default {s.default})." if s.hparam else ""))


def given_on_command_line(flag_values) -> dict:
    """{key: value} of every setting the command line gives: the preset's entries, then --hpconfig's, then
    the flags that are present."""
    given = parse_entries(read_preset(flag_values.preset)) if flag_values.preset else {}
    given.update(parse_entries(flag_values.hpconfig))
    given.update({s.name: flag_values[s.name].value for s in SETTINGS.values()
                  if s.flag and flag_values[s.name].present})
    return given
