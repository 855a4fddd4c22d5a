"""MNIST with an MLP, full batch: the paper's first experiment."""

from __future__ import annotations

import torch

from samedge.data.mnist import load_mnist
from samedge.experiment.config import RunConfig
from samedge.experiment.tasks.base import Task, resolve_device, task_from_split
from samedge.models import MLP


def build_mnist(cfg: RunConfig) -> Task:
    dtype = getattr(torch, cfg.dtype)
    device = resolve_device(cfg.device)
    split = load_mnist(cfg.data, n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.seed, dtype=dtype)
    torch.manual_seed(cfg.seed)
    model = MLP(tuple(split.x_train.shape[1:]), 10, width=cfg.width, depth=cfg.depth, activation=cfg.activation)
    model = model.to(device=device, dtype=dtype)
    return task_from_split("mnist", cfg, model, split, device)
