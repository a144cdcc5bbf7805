"""Hyperparameters: typed defaults, "key=value,..." overrides and preset files."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

PRESETS_DIR = Path(__file__).resolve().parent.parent / "hparams"

POSTERIORS = ("up_diag", "up_iaf1_nl", "up_iaf2_nl", "down_diag", "down_iaf1_nl", "down_iaf2_nl")
DATASETS = ("cifar10", "mnist")
PRIORS = ("diag",)

_POSITIVE_INTS = ("batch_size", "eval_batch_size", "num_gpus", "z_size", "h_size",
                  "depth", "num_blocks", "k", "image_size")


class HParamsError(ValueError):
    pass


@dataclasses.dataclass(frozen=True, repr=False)
class HParams:
    # The first twelve are the original tf_train.py defaults; the rest default to
    # what the original hard-codes, so an empty hpconfig reproduces it.
    batch_size: int = 16
    eval_batch_size: int = 100
    num_gpus: int = 8
    learning_rate: float = 0.01
    z_size: int = 32
    h_size: int = 160
    kl_min: float = 0.25
    depth: int = 2
    num_blocks: int = 2
    k: int = 1
    dataset: str = "cifar10"
    image_size: int = 32
    ema_decay: float = 0.999
    # The Theano system's options (the defaults are the TF1 model): where q(z|x) is sampled and which
    # IAF step follows it (see model.IAFBlock), and how many hidden masked layers the IAF network has.
    posterior: str = "down_iaf2_nl"
    depth_ar: int = 2
    # Per-level block counts joined by "-", because "," already separates hpconfig entries. When set it
    # is authoritative and depth / num_blocks are ignored; when empty, depth levels of num_blocks each.
    depths: str = ""
    prior: str = "diag"  # a diagonal Gaussian (as in Table 3), the only prior ported
    mixed_precision: bool = False
    jit_compile: bool = False
    # Training stops after this many consecutive steps with a non-finite loss or gradient (each is skipped).
    max_skips: int = 10
    # Global gradient-norm clipping; 0 = off, as the original.
    grad_clip: float = 0.0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = _TYPES[f.name]
            # Accept ints for float fields (learning_rate=1) but never bools for numbers.
            if kind is float and type(value) is int:
                value = float(value)
                object.__setattr__(self, f.name, value)
            if type(value) is not kind:
                raise HParamsError(f"invalid hparam {f.name}={value!r}: expected {kind.__name__}")
        self._check_values()

    def _check_values(self):
        def bad(key, why):
            raise HParamsError(f"invalid hparam {key}={getattr(self, key)!r}: {why}")

        for key in _POSITIVE_INTS:
            if getattr(self, key) < 1:
                bad(key, "must be a positive integer")
        if self.max_skips < 1:
            bad("max_skips", "must be a positive integer")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            bad("grad_clip", "must be a finite number >= 0 (0 turns clipping off)")
        if self.depth_ar < 0:
            bad("depth_ar", "must be >= 0")
        # Written as "not (ok)" so that NaN is rejected as well.
        if not (math.isfinite(self.kl_min) and self.kl_min >= 0):
            bad("kl_min", "must be a finite number >= 0")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            bad("learning_rate", "must be a finite number > 0")
        if not 0 <= self.ema_decay < 1:
            bad("ema_decay", "must be in [0, 1)")
        for key, allowed in (("dataset", DATASETS), ("posterior", POSTERIORS), ("prior", PRIORS)):
            if getattr(self, key) not in allowed:
                bad(key, f"must be one of {', '.join(allowed)}")
        if self.depths and not re.fullmatch(r"\d+(-\d+)*", self.depths):
            bad("depths", 'must be "" or positive integers joined by "-", e.g. 10-10')
        if self.depths and 0 in self.level_depths:
            bad("depths", "every level needs at least one block")

    @property
    def level_depths(self) -> list[int]:
        if self.depths:
            return [int(d) for d in self.depths.split("-")]
        return [self.num_blocks] * self.depth

    def values(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **kw) -> HParams:
        unknown = sorted(set(kw) - set(_TYPES))
        if unknown:
            raise HParamsError(f"unknown hparam {unknown[0]!r}; valid keys: {_valid_keys()}")
        return dataclasses.replace(self, **kw)

    def parse(self, text: str) -> HParams:
        overrides = {}
        for entry in text.split(","):
            entry = entry.strip()
            if not entry:
                continue
            key, sep, raw = entry.partition("=")
            if not sep:
                raise HParamsError(f"malformed hparam entry {entry!r}: expected key=value")
            key, raw = key.strip(), raw.strip()
            if key not in _TYPES:
                raise HParamsError(f"unknown hparam {key!r} in {entry!r}; valid keys: {_valid_keys()}")
            overrides[key] = _convert(key, raw, entry)  # later entries win, as in the original
        try:
            return self.replace(**overrides)
        except HParamsError as e:
            raise HParamsError(f"{e} (from {text.strip()!r})") from None

    def to_string(self) -> str:
        return ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                        for k, v in self.values().items())

    __repr__ = __str__ = to_string


_TYPES = {f.name: type(f.default) for f in dataclasses.fields(HParams)}


def _valid_keys() -> str:
    return ", ".join(sorted(_TYPES))


def _convert(key: str, raw: str, entry: str):
    kind = _TYPES[key]
    if kind is bool:
        if raw.lower() not in ("true", "false"):
            raise HParamsError(f"invalid bool in {entry!r}: use true or false")
        return raw.lower() == "true"
    if kind is str:
        return raw
    try:
        return kind(raw)
    except ValueError:
        raise HParamsError(f"invalid {kind.__name__} in {entry!r}") from None


def get_default_hparams() -> HParams:
    return HParams()


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.cfg"))


def read_preset(name: str) -> str:
    """The preset's hpconfig string: non-comment lines joined with ","."""
    available = list_presets()
    if name not in available:
        raise HParamsError(f"unknown preset {name!r}; available presets: "
                           f"{', '.join(available) or '(none)'} (files in {PRESETS_DIR})")
    lines = (PRESETS_DIR / f"{name}.cfg").read_text().splitlines()
    return ",".join(s for s in map(str.strip, lines) if s and not s.startswith("#"))


def load_preset(name: str) -> HParams:
    text = read_preset(name)
    try:
        return get_default_hparams().parse(text)
    except HParamsError as e:
        raise HParamsError(f"preset {name!r} ({PRESETS_DIR / name}.cfg): {e}") from None


def resolve_hparams(preset: str | None, hpconfig: str = "") -> HParams:
    base = load_preset(preset) if preset else get_default_hparams()
    return base.parse(hpconfig or "")
