"""Checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is taken at a step boundary: ``step`` is the next step to run, ``params`` is
``w_step``, ``rule`` and ``rule_state`` are the update rule's name and its state (its
``state_dict``: heavy-ball SGD's velocity), the eigen-solvers' warm-start vectors and generator
states are as they were when that step would start, and ``metrics`` is the text of
``metrics.csv`` before that step (so a resume can check and restore the file).  The data order
needs no state: minibatches are a pure function of (seed, step).

Checkpoints of an earlier samedge (formats 1 and 2) hold a heavy-ball ``velocity`` instead of a
rule's state; they are read as the state of heavy-ball SGD (``"sgd"``, the only rule they knew):
``{"velocity": velocity}``, or the rule's initial state where the velocity is None.

Verified and kept: each checkpoint records a SHA-256 digest of its whole content (every tensor's
bytes, every value), checked on load, so flipped bits are caught whatever ``torch.load`` makes of
them.  Files are written atomically (temporary file, fsync, rename); the checkpoint being replaced
is kept as ``checkpoint.prev.pt``.  A resume whose ``checkpoint.pt`` fails its check (or is
missing after a crash between the two renames) falls back to ``checkpoint.prev.pt`` and moves the
damaged file aside, never overwriting it; with no good checkpoint it is refused, and nothing is
changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from samedge.core.params import Params
from samedge.errors import CheckpointError
from samedge.experiment.store.files import with_path
from samedge.experiment.store.layout import RunDir

__all__ = [
    "TrainState",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "content_digest",
    "CHECKPOINT_NAME",
    "PREVIOUS_NAME",
]

CHECKPOINT_NAME = RunDir.CHECKPOINT
PREVIOUS_NAME = RunDir.PREVIOUS_CHECKPOINT
# 3: the update rule's "rule" and "rule_state"; 2: a heavy-ball "velocity", with "digest" and "metrics";
# 1 (earlier samedge): a "velocity", no digest, no metrics.  All are resumable.
_FORMAT = 3
_FORMATS = (1, 2, 3)
_REQUIRED = ("config", "step", "finished", "params", "solver", "perturbed_solver", "elapsed", "torch_rng")
_REQUIRED_BY_FORMAT = {1: ("velocity",), 2: ("velocity",), 3: ("rule", "rule_state")}
_LEGACY_RULE = "sgd"  # the update rule of formats 1 and 2 (heavy-ball SGD)


@dataclass
class TrainState:
    step: int
    params: Params
    rule_state: dict | None  # the update rule's state_dict (None: its initial state)
    solver: dict
    perturbed_solver: dict | None
    elapsed: float
    finished: bool = False
    eval_solver: dict | None = None  # the evaluation batch's solver (runs with eval_batch_size)
    metrics: str | None = None  # metrics.csv before ``step`` (None: a checkpoint of an earlier samedge)
    secant: dict | None = None  # the per-step secant estimate's pairs (runs with secant_pairs > 0)
    spectrum: dict | None = None  # trace/density probe generators (runs with trace_every/density_every)
    steps: str | None = None  # steps.csv before ``step`` (None: none written, or an earlier samedge)
    note: str | None = None  # what loading had to do (a fallback to the previous checkpoint)
    rule: str = _LEGACY_RULE  # the update rule's name in UPDATE_RULES (an earlier samedge: heavy-ball "sgd")
    #: preconditioned bases: the warm solvers of the preconditioned and effective readings, by name
    adaptive_solvers: dict | None = None
    layers: dict | None = None  # the per-block eigen-solvers' warm starts (runs with layer_sharpness_every)


def content_digest(obj: Any) -> str:
    """SHA-256 of a checkpoint's content: tensors by dtype, shape and bytes; other values by type
    and ``repr``; dictionaries in key order."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}:".encode())
        for key in sorted(obj, key=str):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}:".encode())
        for item in obj:
            _feed(h, item)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def save_checkpoint(
    run_dir: str | Path,
    config: dict[str, Any],
    state: TrainState,
    *,
    metrics: str | None = None,
    steps: str | None = None,
) -> Path:
    """Write ``checkpoint.pt`` (with its digest), keeping the one it replaces as ``checkpoint.prev.pt``."""
    path = Path(run_dir) / CHECKPOINT_NAME
    payload = {
        "format": _FORMAT,
        "config": config,
        "step": state.step,
        "finished": state.finished,
        "params": [p.detach().cpu() for p in state.params],
        "rule": state.rule,
        "rule_state": _tensors_to(state.rule_state, device="cpu"),
        "solver": _to_cpu(state.solver),
        "perturbed_solver": _to_cpu(state.perturbed_solver),
        "eval_solver": _to_cpu(state.eval_solver),
        "elapsed": state.elapsed,
        "torch_rng": torch.get_rng_state(),
        "metrics": metrics if metrics is not None else state.metrics,
        "steps": steps if steps is not None else state.steps,
        "secant": _tensors_to(state.secant, device="cpu"),
        "spectrum": _to_cpu(state.spectrum),
        "adaptive_solvers": None
        if state.adaptive_solvers is None
        else {k: _to_cpu(v) for k, v in state.adaptive_solvers.items()},
        "layers": _tensors_to(state.layers, device="cpu"),
    }
    payload["digest"] = content_digest(payload)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    # The new file is complete on disk before the old one moves: a crash between the two renames
    # leaves checkpoint.prev.pt (and the temporary file), and a resume falls back to the former.
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.replace(path, path.with_name(PREVIOUS_NAME))
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise with_path(err, tmp) from None
    return path


def _tensors_to(obj: Any, **to: Any) -> Any:
    """``obj`` (nested dicts, lists and tuples) with every tensor moved by ``Tensor.to(**to)``."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(**to)
    if isinstance(obj, dict):
        return {k: _tensors_to(v, **to) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tensors_to(v, **to) for v in obj)
    return obj


def _to_cpu(state: dict | None) -> dict | None:
    if state is None:
        return None
    return {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint file's payload, verified: :class:`CheckpointError` saying ``corrupted`` when it
    cannot be read, lacks what a checkpoint holds, or its content does not match its digest."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch raises many types for a damaged file
        raise CheckpointError(f"{path} is corrupted or not a samedge checkpoint ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") not in _FORMATS:
        raise CheckpointError(f"{path} is corrupted or not a samedge checkpoint (unknown format)")
    missing = [k for k in (*_REQUIRED, *_REQUIRED_BY_FORMAT[payload["format"]]) if k not in payload]
    if missing:
        raise CheckpointError(f"{path} is corrupted: it has no {missing[0]!r}")
    if payload["format"] >= 2:
        digest = payload.pop("digest", None)
        if digest != content_digest(payload):
            raise CheckpointError(f"{path} is corrupted: its content does not match its SHA-256 digest")
    if not isinstance(payload["config"], dict) or not isinstance(payload["params"], (list, tuple)):
        raise CheckpointError(f"{path} is corrupted: 'config' or 'params' has the wrong type")
    if payload["format"] >= 3 and (
        not isinstance(payload["rule"], str) or not isinstance(payload["rule_state"], (dict, type(None)))
    ):
        raise CheckpointError(f"{path} is corrupted: 'rule' or 'rule_state' has the wrong type")
    return payload


def _rule_and_state(payload: dict[str, Any]) -> tuple[str, dict | None]:
    """The update rule's name and state_dict in a payload of any format: formats 1 and 2 hold
    heavy-ball SGD's velocity (None before the first momentum step: the initial state)."""
    if payload["format"] >= 3:
        return payload["rule"], payload["rule_state"]
    velocity = payload["velocity"]
    return _LEGACY_RULE, None if velocity is None else {"velocity": list(velocity)}


def _set_aside(path: Path) -> Path:
    """Move a damaged checkpoint out of the way without overwriting anything."""
    n = 0
    while True:
        target = path.with_name(f"{path.name}.corrupt" + (f".{n}" if n else ""))
        if not target.exists():
            os.rename(path, target)
            return target
        n += 1


def load_checkpoint(
    run_dir: str | Path,
    config: dict[str, Any],
    like: Params,
    *,
    device: torch.device | str = "cpu",
    read_only: bool = False,
) -> TrainState:
    """Load and check a checkpoint against the run's configuration and parameter shapes.

    ``checkpoint.pt`` if it passes its check, else ``checkpoint.prev.pt``; :attr:`TrainState.note`
    says so, naming the step used.  The damaged file is moved to ``checkpoint.pt.corrupt`` unless
    ``read_only`` (a reader such as ``samedge measure``, or a rank that does not write: only the
    run directory's writer changes it).  With neither file usable, a :class:`CheckpointError` and
    nothing changed."""
    run_dir = Path(run_dir)
    path, previous = run_dir / CHECKPOINT_NAME, run_dir / PREVIOUS_NAME
    note = None
    try:
        payload = read_checkpoint(path)
    except (CheckpointError, FileNotFoundError) as err:
        problem = str(err) if isinstance(err, CheckpointError) else f"{run_dir} has no {CHECKPOINT_NAME}"
        try:
            payload = read_checkpoint(previous)
        except FileNotFoundError:
            if isinstance(err, FileNotFoundError):
                raise CheckpointError(f"{run_dir} has no {CHECKPOINT_NAME} to resume from") from None
            raise CheckpointError(f"{problem}, and there is no {PREVIOUS_NAME} to fall back to") from None
        except CheckpointError as prev_err:
            raise CheckpointError(f"{problem}; the previous one is no better: {prev_err}") from None
        state = _state(previous, payload, config, like, device)
        if read_only:
            note = f"{problem}; used {PREVIOUS_NAME} (step {state.step}) instead"
        elif path.exists():
            aside = _set_aside(path)
            note = f"{problem}; kept it as {aside.name} and resumed from {PREVIOUS_NAME} (step {state.step})"
        else:
            note = f"{problem}; resumed from {PREVIOUS_NAME} (step {state.step})"
        state.note = note
        return state
    return _state(path, payload, config, like, device)


def _state(path: Path, payload: dict, config: dict[str, Any], like: Params, device) -> TrainState:
    saved = payload["config"]
    # A setting the checkpoint does not record was added to samedge after it was written; such
    # settings are added with defaults that keep the old behaviour, and the run's config (read
    # through RunConfig) holds that default, so only recorded settings are compared.
    differing = sorted(k for k in saved if saved.get(k) != config.get(k))
    if differing:
        k = differing[0]
        raise CheckpointError(
            f"{path} was written with {k} = {saved.get(k)!r}, but the run's config.json has {config.get(k)!r}"
        )
    params = payload["params"]
    if len(params) != len(like) or any(
        not isinstance(p, torch.Tensor) or p.shape != q.shape for p, q in zip(params, like)
    ):
        raise CheckpointError(f"{path}: parameter shapes do not match the model built from the configuration")
    dtype = like[0].dtype

    def place_solver(state: dict | None) -> dict | None:
        if state is None or state.get("previous") is None:
            return state
        return {**state, "previous": state["previous"].to(device=device, dtype=dtype)}

    solver = place_solver(payload["solver"])
    if solver is None:
        raise CheckpointError(f"{path} has no eigen-solver state")
    metrics, steps = payload.get("metrics"), payload.get("steps")
    rule, rule_state = _rule_and_state(payload)  # placed on the run's device by the rule that reads it
    torch.set_rng_state(payload["torch_rng"])
    return TrainState(
        step=int(payload["step"]),
        params=tuple(t.to(device=device, dtype=dtype) for t in params),
        rule_state=rule_state,
        rule=rule,
        solver=solver,
        perturbed_solver=place_solver(payload["perturbed_solver"]),
        elapsed=float(payload["elapsed"]),
        finished=bool(payload["finished"]),
        eval_solver=place_solver(payload.get("eval_solver")),
        metrics=metrics if isinstance(metrics, str) else None,
        secant=_place_secant(payload.get("secant"), device, dtype),
        spectrum=payload.get("spectrum"),
        layers=payload.get("layers"),
        steps=steps if isinstance(steps, str) else None,
        adaptive_solvers=None
        if payload.get("adaptive_solvers") is None
        else {k: place_solver(v) for k, v in payload["adaptive_solvers"].items()},
    )


def _place_secant(state: dict | None, device: torch.device | str, dtype: torch.dtype) -> dict | None:
    """The secant pairs on the run's device and dtype (their Gram matrices stay float64)."""
    if state is None:
        return None
    window = state["window"]
    placed = {
        **window,
        "s": [t.to(device=device, dtype=dtype) for t in window["s"]],
        "y": [t.to(device=device, dtype=dtype) for t in window["y"]],
    }
    previous = state.get("previous")
    if previous is not None:
        previous = tuple(t.to(device=device, dtype=dtype) for t in previous)
    return {"window": placed, "previous": previous}
