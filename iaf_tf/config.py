"""`Config`: a run's settings, in sections, built on the table of iaf_tf.settings; the --hpconfig parser,
the presets and the absl flags.

A setting is a hyper-parameter (given in `--hpconfig key=value,...`, the original's syntax, or in a
preset file), a flag (`--key`), or both (`num_gpus`, as in the original). Keys are unique across sections,
so `Config.replace(h_size=8, max_steps=5)` needs no section names; code reads `config.model.h_size`.
Adding a setting is one `setting(...)` line in its section of iaf_tf/settings.py; `bin/iaf.py --helpfull`
lists them all.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from iaf_tf import datasets
from iaf_tf.errors import ConfigError
from iaf_tf.settings import (HPARAM_KEYS, SETTINGS, DataConfig, EvaluationConfig, ModelConfig, ObjectiveConfig,
                             OptimizationConfig, RuntimeConfig, TrainingConfig)

PRESETS_DIR = Path(__file__).resolve().parent / "presets"


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
