"""CIFAR-10 with the paper's CNN, full batch in chunks: the paper's second experiment."""

from __future__ import annotations

import torch

from ..config import RunConfig
from ..data.cifar10 import load_cifar10
from ..losses import get_loss
from ..models.cnn import CNN
from ..objective import Objective
from . import Task, minibatch_objectives, default_data_path, resolve_device


def build_cifar10(cfg: RunConfig) -> Task:
    dtype = getattr(torch, cfg.dtype)
    device = resolve_device(cfg.device)
    path = default_data_path(cfg, "cifar10", "cifar-10-python.tar.gz or cifar-10-batches-py/")
    split = load_cifar10(path, n_train=cfg.n_train, n_test=cfg.n_test, subset=cfg.subset, seed=cfg.seed, dtype=dtype)
    torch.manual_seed(cfg.seed)
    model = CNN(
        tuple(split.x_train.shape[1:]), 10,
        blocks=cfg.cnn_blocks, layers_per_block=cfg.cnn_layers_per_block, channel_multiplier=cfg.cnn_channels,
    ).to(device=device, dtype=dtype)
    loss = get_loss(cfg.loss)
    train_x, train_y = split.x_train.to(device), split.y_train.to(device)
    train = Objective.from_tensors(model, loss, train_x, train_y, cfg.chunk_size, hvp_mode=cfg.hvp_mode)
    test = Objective.from_tensors(model, loss, split.x_test.to(device), split.y_test.to(device), cfg.chunk_size)
    minibatch, eval_batch = minibatch_objectives(cfg, model, loss, train_x, train_y)
    return Task("cifar10", model, train, test, split.source, minibatch=minibatch, eval_batch=eval_batch)
