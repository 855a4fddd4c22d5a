"""What every task is made of: :class:`Task` (model, objectives, minibatches) and the helpers the
task builders share (device, data path, minibatch objectives, labelled-image splits).

A :class:`Task` hands the runner the objective to train on at each step (the same full-batch
objective every step, or the step's minibatch) and the objective to test on.  In a run over many
processes each objective (each minibatch too) covers this rank's slice of its examples and sums
over the ranks (:func:`~samedge.experiment.world.sharded_objective`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from samedge.core.losses import get_loss
from samedge.core.objective import Objective
from samedge.data import DataError
from samedge.errors import ConfigError
from samedge.experiment.config import RunConfig
from samedge.experiment.world import sharded_objective

__all__ = [
    "Task",
    "resolve_device",
    "minibatch_objectives",
    "probe_batch_objectives",
    "task_from_split",
    "default_data_path",
]


@dataclass
class Task:
    name: str
    model: nn.Module
    train: Objective  # the full training set (chunked)
    test: Objective
    source: str  # where the data came from
    minibatch: Callable[[int], Objective] | None = None  # step -> that step's minibatch objective
    test_every_measurement: bool = False
    eval_batch: Objective | None = None  # a fixed training batch, also measured (minibatch runs)
    #: (step, count) -> that many seeded minibatch objectives for a batch-sharpness reading
    probe_batches: Callable[[int, int], list[Objective]] | None = None

    def objective_at(self, step: int) -> Objective:
        return self.train if self.minibatch is None else self.minibatch(step)

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def minibatch_objectives(
    cfg: RunConfig, model: nn.Module, loss, x: torch.Tensor, y: torch.Tensor
) -> tuple[Callable[[int], Objective] | None, Objective | None]:
    """For ``cfg.batch_size``: step -> that step's minibatch objective (a pure function of the
    seed and step), and the fixed evaluation batch of ``cfg.eval_batch_size`` training examples
    (None when that is unset or 0).
    ``(None, None)`` for full-batch training."""
    from samedge.data.sampling import MinibatchSampler, fixed_sample

    if cfg.batch_size is None:
        return None, None
    n = x.shape[0]
    for name in ("batch_size", "eval_batch_size"):
        value = getattr(cfg, name)
        if value and value > n:
            hint = "; pass a smaller --eval-batch-size, or 0 for none" if name == "eval_batch_size" else ""
            raise ConfigError(f"config field '{name}' ({value}) exceeds the {n} training examples{hint}")
    sampler = MinibatchSampler(n, cfg.batch_size, seed=cfg.seed)

    def minibatch(step: int) -> Objective:
        idx = sampler.batch_indices(step).to(x.device)
        return sharded_objective(model, loss, x[idx], y[idx], cfg.chunk_size, hvp_mode=cfg.hvp_mode)

    eval_batch = None
    if cfg.eval_batch_size:
        idx = fixed_sample(n, cfg.eval_batch_size, cfg.seed).to(x.device)
        eval_batch = sharded_objective(model, loss, x[idx], y[idx], cfg.chunk_size, hvp_mode=cfg.hvp_mode)
    return minibatch, eval_batch


def probe_batch_objectives(
    cfg: RunConfig, model: nn.Module, loss, x: torch.Tensor, y: torch.Tensor
) -> Callable[[int, int], list[Objective]] | None:
    """For ``cfg.batch_size``: (step, count) -> ``count`` minibatch objectives of ``batch_size``
    training examples, a pure function of the seed and step (``samedge.data.sampling.probe_batches``);
    None for full-batch training."""
    from samedge.data.sampling import probe_batches

    if cfg.batch_size is None:
        return None
    n, size = x.shape[0], cfg.batch_size

    def batches(step: int, count: int) -> list[Objective]:
        return [
            sharded_objective(model, loss, x[i.to(x.device)], y[i.to(x.device)], cfg.chunk_size, hvp_mode=cfg.hvp_mode)
            for i in probe_batches(n, size, count, cfg.seed, step)
        ]

    return batches


def task_from_split(name: str, cfg: RunConfig, model: nn.Module, split, device: torch.device) -> Task:
    """A labelled-image task (MNIST, CIFAR-10): chunked full-batch train and test objectives of
    ``cfg.loss`` on ``split`` (a :class:`~samedge.data.Split`), and minibatches if asked."""
    loss = get_loss(cfg.loss)
    x, y = split.x_train.to(device), split.y_train.to(device)
    train = sharded_objective(model, loss, x, y, cfg.chunk_size, hvp_mode=cfg.hvp_mode)
    test = sharded_objective(model, loss, split.x_test.to(device), split.y_test.to(device), cfg.chunk_size)
    minibatch, eval_batch = minibatch_objectives(cfg, model, loss, x, y)
    return Task(
        name,
        model,
        train,
        test,
        split.source,
        minibatch=minibatch,
        eval_batch=eval_batch,
        probe_batches=probe_batch_objectives(cfg, model, loss, x, y),
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config field 'device' is 'cuda' but no CUDA device is available; use cpu or auto")
    return torch.device(name)


def default_data_path(cfg: RunConfig, task: str, what: str) -> Path:
    """``cfg.data``, or where ``samedge download TASK`` puts the files (``data/TASK``)."""
    path = Path(cfg.data) if cfg.data is not None else Path("data") / task
    if not path.exists():
        hint = "" if cfg.data is not None else f" (no --data given; run `samedge download {task}` or pass --data)"
        raise DataError(f"{task} data not found at {path}{hint}; expected {what}")
    return path
