"""MNIST with an MLP, full batch: the paper's first experiment."""

from __future__ import annotations

import torch

from ..config import RunConfig
from ..data.mnist import load_mnist
from ..losses import get_loss
from ..models import MLP
from ..objective import Objective
from . import Task, minibatch_objectives, resolve_device


def build_mnist(cfg: RunConfig) -> Task:
    dtype = getattr(torch, cfg.dtype)
    device = resolve_device(cfg.device)
    split = load_mnist(cfg.data, n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.seed, dtype=dtype)
    torch.manual_seed(cfg.seed)
    model = MLP(tuple(split.x_train.shape[1:]), 10, width=cfg.width, depth=cfg.depth, activation=cfg.activation)
    model = model.to(device=device, dtype=dtype)
    loss = get_loss(cfg.loss)
    train_x, train_y = split.x_train.to(device), split.y_train.to(device)
    train = Objective.from_tensors(model, loss, train_x, train_y, cfg.chunk_size, hvp_mode=cfg.hvp_mode)
    test = Objective.from_tensors(model, loss, split.x_test.to(device), split.y_test.to(device), cfg.chunk_size)
    minibatch, eval_batch = minibatch_objectives(cfg, model, loss, train_x, train_y)
    return Task("mnist", model, train, test, split.source, minibatch=minibatch, eval_batch=eval_batch)
