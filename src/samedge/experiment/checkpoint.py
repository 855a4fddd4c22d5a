"""Checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is taken at a step boundary: ``step`` is the next step to run, ``params`` and
``velocity`` are ``w_step`` and the heavy-ball buffer, the eigen-solvers' warm-start vectors and
generator states are as they were when that step would start.  The data order needs no state:
minibatches are a pure function of (seed, step).  Files are written atomically (temporary file,
fsync, rename), so a crash while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from samedge.core.params import Params
from samedge.errors import CheckpointError

__all__ = ["TrainState", "CheckpointError", "save_checkpoint", "load_checkpoint", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "checkpoint.pt"
_FORMAT = 1


@dataclass
class TrainState:
    step: int
    params: Params
    velocity: Params | None
    solver: dict
    perturbed_solver: dict | None
    elapsed: float
    finished: bool = False
    eval_solver: dict | None = None  # the evaluation batch's solver (runs with eval_batch_size)
    secant: dict | None = None  # the per-step secant estimate's pairs (runs with secant_pairs > 0)
    spectrum: dict | None = None  # trace/density probe generators (runs with trace_every/density_every)


def save_checkpoint(run_dir: str | Path, config: dict[str, Any], state: TrainState) -> Path:
    path = Path(run_dir) / CHECKPOINT_NAME
    payload = {
        "format": _FORMAT,
        "config": config,
        "step": state.step,
        "finished": state.finished,
        "params": [p.detach().cpu() for p in state.params],
        "velocity": None if state.velocity is None else [v.detach().cpu() for v in state.velocity],
        "solver": _to_cpu(state.solver),
        "perturbed_solver": _to_cpu(state.perturbed_solver),
        "eval_solver": _to_cpu(state.eval_solver),
        "secant": _tensors_to(state.secant, device="cpu"),
        "spectrum": _to_cpu(state.spectrum),
        "elapsed": state.elapsed,
        "torch_rng": torch.get_rng_state(),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(buffer.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
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


def load_checkpoint(
    run_dir: str | Path, config: dict[str, Any], like: Params, *, device: torch.device | str = "cpu"
) -> TrainState:
    """Load and check a checkpoint against the run's configuration and parameter shapes."""
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.exists():
        raise CheckpointError(f"{run_dir} has no {CHECKPOINT_NAME} to resume from")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        raise CheckpointError(f"{path} is corrupted or not a samedge checkpoint ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise CheckpointError(f"{path} is not a samedge checkpoint of format {_FORMAT}")
    saved = payload.get("config", {})
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
    if len(params) != len(like) or any(p.shape != q.shape for p, q in zip(params, like)):
        raise CheckpointError(f"{path}: parameter shapes do not match the model built from the configuration")
    dtype = like[0].dtype

    def place(tensors):
        return None if tensors is None else tuple(t.to(device=device, dtype=dtype) for t in tensors)

    def place_solver(state: dict | None) -> dict | None:
        if state is None or state.get("previous") is None:
            return state
        return {**state, "previous": state["previous"].to(device=device, dtype=dtype)}

    solver = place_solver(payload["solver"])
    if solver is None:
        raise CheckpointError(f"{path} has no eigen-solver state")
    torch.set_rng_state(payload["torch_rng"])
    return TrainState(
        step=int(payload["step"]),
        params=place(params),
        velocity=place(payload["velocity"]),
        solver=solver,
        perturbed_solver=place_solver(payload["perturbed_solver"]),
        elapsed=float(payload["elapsed"]),
        finished=bool(payload["finished"]),
        eval_solver=place_solver(payload.get("eval_solver")),
        secant=_place_secant(payload.get("secant"), device, dtype),
        spectrum=payload.get("spectrum"),
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
