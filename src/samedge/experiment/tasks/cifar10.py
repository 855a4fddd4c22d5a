"""CIFAR-10 with the paper's CNN, full batch in chunks: the paper's second experiment."""

from __future__ import annotations

import torch

from samedge.data.cifar10 import load_cifar10
from samedge.experiment.config import RunConfig
from samedge.experiment.tasks.base import Task, default_data_path, resolve_device, task_from_split
from samedge.models.cnn import CNN


def build_cifar10(cfg: RunConfig) -> Task:
    dtype = getattr(torch, cfg.dtype)
    device = resolve_device(cfg.device)
    path = default_data_path(cfg, "cifar10", "cifar-10-python.tar.gz or cifar-10-batches-py/")
    split = load_cifar10(path, n_train=cfg.n_train, n_test=cfg.n_test, subset=cfg.subset, seed=cfg.seed, dtype=dtype)
    torch.manual_seed(cfg.seed)
    model = CNN(
        tuple(split.x_train.shape[1:]),
        10,
        blocks=cfg.cnn_blocks,
        layers_per_block=cfg.cnn_layers_per_block,
        channel_multiplier=cfg.cnn_channels,
    ).to(device=device, dtype=dtype)
    return task_from_split("cifar10", cfg, model, split, device)
