"""Run configuration: one flat, validated record of every setting of a run.

Settings come from (later wins) the task's default preset, a named preset (``--preset``), a TOML
file (``--config``) and command-line flags.  Every field is checked for type and range; an
unknown key or a bad value raises :class:`ConfigError` with a one-line message naming the field
and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from samedge.core.blocks import parse_groups
from samedge.core.curvature import METHODS as EIG_METHODS
from samedge.core.curvature import ONE_EIGENPAIR_METHODS
from samedge.core.losses import LOSSES
from samedge.core.method import BASES, METHOD_KINDS, Method
from samedge.core.objective import HVP_MODES
from samedge.data.cifar10 import SUBSETS
from samedge.data.shakespeare import VOCABS
from samedge.errors import ConfigError
from samedge.models.mlp import ACTIVATIONS

#: the tasks a configuration may name: each has a builder in :mod:`samedge.experiment.tasks.registry`
#: and a preset of its name in ``presets/``
TASKS: tuple[str, ...] = ("mnist", "cifar10", "shakespeare")
DTYPES = ("float32", "float64")
DEVICES = ("cpu", "cuda", "auto")
# (smallest normal, largest finite) of each dtype: torch.finfo's values
_DTYPE_LIMITS = {
    "float32": (1.1754943508222875e-38, 3.4028234663852886e38),
    "float64": (2.2250738585072014e-308, 1.7976931348623157e308),
}

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["RunConfig", "ConfigError", "load_toml", "preset_names", "load_preset", "build_config", "TASKS"]


@dataclass(frozen=True)
class RunConfig:
    task: str = "mnist"
    # optimizer
    optimizer: str = "sam"
    eta: float = 0.1
    rho: float = 0.1
    momentum: float = 0.0
    # the update rule (base optimizer) and its torch.optim hyperparameters; sgd is the method of
    # earlier samedge (a config without these keys keeps its meaning)
    base: str = "sgd"
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    alpha: float = 0.99
    steps: int = 1000
    batch_size: int | None = None  # None: full batch
    eval_batch_size: int | None = None  # minibatch runs: also measure on a fixed batch of this size (0: off)
    # measurements
    measure_every: int = 10
    eig_k: int = 1
    eig_method: str = "lanczos"
    eig_tol: float = 1e-3
    eig_max_iter: int = 100
    measure_perturbed: bool = False
    hvp_mode: str = "double-backward"
    trace_every: int = 0  # Hutchinson trace every N steps (a multiple of measure_every; 0: off)
    trace_probes: int = 32
    density_every: int = 0  # SLQ spectral density every N steps (a multiple of measure_every; 0: off)
    density_probes: int = 4
    density_steps: int = 64  # Lanczos steps per density probe
    # layers.csv: the top eigenvector's mass per block at every reading (no HVP); blocks: "" the model's
    # top-level modules, "leaves" the module owning each parameter, "NAME=PARAM,PARAM;NAME=..." named
    # groups (parameter names or module prefixes; the rest is "other"), "off" no layers.csv
    layer_groups: str = ""
    layer_sharpness_every: int = 0  # each block's lambda_max(H_BB) every N steps (a multiple of measure_every; 0: off)
    # batch sharpness over N seeded minibatches at each reading; None: 8 for minibatch runs, off for full batch
    batch_sharpness_batches: int | None = None
    measure_test: bool = False  # also evaluate the test set at every measurement
    checkpoint_every: int = 100  # steps; 0: only at the end (and on Ctrl-C)
    secant_pairs: int | None = (
        None  # per-step secant sharpness from the last N pairs (steps.csv); None: by kind; 0: off
    )
    # data
    data: str | None = None
    n_train: int | None = 2000
    n_test: int | None = 1000
    subset: str = "first"
    chunk_size: int | None = None
    loss: str = "mse"
    # models
    width: int = 256
    depth: int = 4
    activation: str = "relu"
    cnn_blocks: int = 2
    cnn_layers_per_block: int = 1
    cnn_channels: int = 16
    seq_len: int = 64
    vocab: str = "text"  # shakespeare: the text's distinct characters, or all 128 of ASCII
    layers: int = 2
    heads: int = 4
    d_model: int = 64
    key_size: int = 16
    # reproducibility and placement
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None  # torch threads (None: torch's default); sums depend on the count

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def batch_sharpness_count(self) -> int:
        """The minibatches of a batch-sharpness reading (0: none): ``batch_sharpness_batches``, or by
        default 8 for minibatch runs and 0 for full-batch ones."""
        if self.batch_sharpness_batches is not None:
            return self.batch_sharpness_batches
        return 8 if self.batch_size is not None else 0

    def method(self) -> Method:
        """The optimizer method of this run."""
        return Method(
            self.optimizer,
            self.eta,
            self.rho,
            self.momentum,
            **{name: getattr(self, name) for name in Method.HYPERPARAMETERS},
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> RunConfig:
        return from_mapping({**self.to_dict(), **changes})


# The allowed values come from the registries that give them meaning.
_CHOICES: dict[str, tuple] = {
    "task": tuple(TASKS),
    "optimizer": METHOD_KINDS,
    "base": BASES,
    "eig_method": tuple(EIG_METHODS),
    "hvp_mode": tuple(HVP_MODES),
    "subset": tuple(SUBSETS),
    "loss": tuple(LOSSES),
    "vocab": tuple(VOCABS),
    "activation": tuple(ACTIVATIONS),
    "dtype": DTYPES,
    "device": DEVICES,
}
# (minimum, maximum, minimum inclusive) for numeric fields
_RANGES: dict[str, tuple[float, float, bool]] = {
    "eta": (0.0, math.inf, False),
    "rho": (0.0, math.inf, True),
    "momentum": (0.0, 1.0, True),
    "dampening": (0.0, 1.0, True),
    "weight_decay": (0.0, math.inf, True),
    "beta1": (0.0, 1.0, True),
    "beta2": (0.0, 1.0, True),
    "eps": (0.0, math.inf, False),
    "alpha": (0.0, 1.0, True),
    "steps": (0, math.inf, True),
    "batch_size": (1, math.inf, True),
    "eval_batch_size": (0, math.inf, True),
    "measure_every": (1, math.inf, True),
    "checkpoint_every": (0, math.inf, True),
    "secant_pairs": (0, 1000, True),
    "trace_every": (0, math.inf, True),
    "trace_probes": (2, math.inf, True),
    "density_every": (0, math.inf, True),
    "density_probes": (1, math.inf, True),
    "density_steps": (1, math.inf, True),
    "layer_sharpness_every": (0, math.inf, True),
    "batch_sharpness_batches": (0, 100000, True),
    "eig_k": (1, 64, True),
    "eig_tol": (0.0, 1.0, False),
    "eig_max_iter": (1, 100000, True),
    "n_train": (1, math.inf, True),
    "n_test": (1, math.inf, True),
    "chunk_size": (1, math.inf, True),
    "width": (1, 1 << 20, True),
    "depth": (1, 1000, True),
    "cnn_blocks": (1, 5, True),
    "cnn_layers_per_block": (1, 100, True),
    "cnn_channels": (1, 4096, True),
    "seq_len": (1, 1 << 16, True),
    "layers": (1, 1000, True),
    "heads": (1, 1024, True),
    "d_model": (1, 1 << 16, True),
    "key_size": (1, 1 << 16, True),
    "seed": (0, 2**63 - 1, True),
    "threads": (1, 4096, True),
}


def _describe(lo: float, hi: float, inclusive: bool) -> str:
    lower = f"{'>=' if inclusive else '>'} {lo:g}"
    if hi == math.inf:
        return lower
    return f"in {'[' if inclusive else '('}{lo:g}, {hi:g}{')' if hi == 1.0 else ']'}"


def _validate(cfg: RunConfig) -> None:
    hints = {f.name: f.type for f in fields(cfg)}
    for name, kind in hints.items():
        value = getattr(cfg, name)
        optional = "None" in str(kind)
        if value is None:
            if optional:
                continue
            raise ConfigError(f"config field '{name}' must be set")
        base = str(kind).replace(" | None", "")
        if base == "bool":
            if not isinstance(value, bool):
                raise ConfigError(f"config field '{name}' must be true or false, got {value!r}")
        elif base == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"config field '{name}' must be an integer, got {value!r}")
        elif base == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"config field '{name}' must be a finite number, got {value!r}")
        elif base == "str":
            if not isinstance(value, str):
                raise ConfigError(f"config field '{name}' must be a string, got {value!r}")
        if name in _CHOICES and value not in _CHOICES[name]:
            raise ConfigError(f"config field '{name}' must be one of {', '.join(_CHOICES[name])}; got {value!r}")
        if name in _RANGES:
            lo, hi, inclusive = _RANGES[name]
            ok = (value >= lo if inclusive else value > lo) and (value < hi if hi == 1.0 else value <= hi)
            if not ok:
                raise ConfigError(f"config field '{name}' must be {_describe(lo, hi, inclusive)}, got {value!r}")
    # Settings that the run's dtype cannot hold would overflow to inf (or vanish) in its tensors.
    tiny, huge = _DTYPE_LIMITS[cfg.dtype]
    for name in ("eta", "rho"):
        value = getattr(cfg, name)
        if value > huge or 0 < value < tiny:
            raise ConfigError(
                f"config field '{name}' = {value!r} cannot be represented in {cfg.dtype} "
                f"(normal numbers {tiny:.4g} to {huge:.4g}); use dtype float64 or another value"
            )
    if cfg.eig_method in ONE_EIGENPAIR_METHODS and cfg.eig_k != 1:
        raise ConfigError(f"config field 'eig_k' must be 1 with eig_method {cfg.eig_method!r}, got {cfg.eig_k}")
    for name in ("trace_every", "density_every", "layer_sharpness_every"):
        every = getattr(cfg, name)
        if isinstance(every, int) and every > 0 and every % cfg.measure_every:
            raise ConfigError(
                f"config field '{name}' ({every}) must be a multiple of measure_every ({cfg.measure_every}): "
                "the trace and density are taken at measurements"
            )
    if cfg.layer_groups.strip() not in ("", "leaves", "off"):
        try:
            parse_groups(cfg.layer_groups)
        except ValueError as err:
            raise ConfigError(f"config field 'layer_groups': {err}") from None
    if cfg.layer_sharpness_every and cfg.layer_groups.strip() == "off":
        raise ConfigError("config field 'layer_sharpness_every' needs blocks; layer_groups is 'off'")
    if cfg.batch_sharpness_batches and cfg.batch_size is None:
        raise ConfigError(
            "config field 'batch_sharpness_batches' needs 'batch_size' (minibatch training); "
            "batch sharpness is the minibatches' curvature"
        )
    if cfg.eval_batch_size and cfg.batch_size is None:
        raise ConfigError(
            "config field 'eval_batch_size' needs 'batch_size' (minibatch training); "
            "a full-batch run already measures on the whole training set"
        )
    try:
        cfg.method()
    except ValueError as err:  # what the method itself refuses (rho > 0 with gd); it names the field first
        name, _, rest = str(err).partition(" ")
        raise ConfigError(f"config field '{name}' {rest}") from None


def from_mapping(values: dict[str, Any], where: str = "config") -> RunConfig:
    known = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown {where} key '{unknown[0]}'; allowed keys: {', '.join(sorted(known))}")
    values = dict(values)
    floats = ("eta", "rho", "momentum", "eig_tol", "dampening", "weight_decay", "beta1", "beta2", "eps", "alpha")
    for name in floats:  # TOML writes 1 for 1.0
        if isinstance(values.get(name), int) and not isinstance(values.get(name), bool):
            values[name] = float(values[name])
    for name in ("data",):
        if isinstance(values.get(name), Path):
            values[name] = str(values[name])
    return RunConfig(**values)


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read: {err}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    nested = [k for k, v in data.items() if isinstance(v, dict)]
    if nested:
        raise ConfigError(f"config file {path}: unexpected table [{nested[0]}]; settings are top-level keys")
    return data


def preset_names() -> list[str]:
    folder = resources.files("samedge.experiment") / "presets"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_preset(name: str) -> dict[str, Any]:
    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(preset_names())}")
    text = (resources.files("samedge.experiment") / "presets" / f"{name}.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def build_config(
    task: str,
    *,
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> RunConfig:
    """Task default preset, then ``preset``, then ``config_file``, then ``overrides``."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    values: dict[str, Any] = {}
    values.update(load_preset(task))
    if preset is not None:
        chosen = load_preset(preset)
        if chosen.get("task", task) != task:
            raise ConfigError(f"preset {preset!r} is for task {chosen['task']!r}, not {task!r}")
        values.update(chosen)
    if config_file is not None:
        from_file = load_toml(config_file)
        if from_file.get("task", task) != task:
            raise ConfigError(f"config file {config_file} is for task {from_file['task']!r}, not {task!r}")
        values.update(from_file)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    values.update(given)
    rho_explicit = "rho" in given or (config_file is not None and "rho" in from_file)
    if values.get("optimizer") in METHOD_KINDS and not Method.takes_rho(values["optimizer"]) and not rho_explicit:
        values["rho"] = 0.0  # GD ignores a preset's rho; an explicit rho with gd is an error
    values["task"] = task
    return from_mapping(values)
