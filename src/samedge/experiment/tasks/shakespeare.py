"""Tiny Shakespeare with a Transformer and minibatch (stochastic) GD/SAM: the paper's third
experiment.  Each step's objective is that step's minibatch, so the SAM perturbation, the
SAM-edge's ``||g||`` and the sharpness are all on the same minibatch, as in the paper."""

from __future__ import annotations

import torch

from samedge.core.losses import get_loss
from samedge.data.shakespeare import load_shakespeare
from samedge.errors import ConfigError
from samedge.experiment.config import RunConfig
from samedge.experiment.tasks.base import (
    Task,
    default_data_path,
    minibatch_objectives,
    probe_batch_objectives,
    resolve_device,
)
from samedge.experiment.world import sharded_objective
from samedge.models.transformer import Transformer


def build_shakespeare(cfg: RunConfig) -> Task:
    if cfg.batch_size is None:
        raise ConfigError("config field 'batch_size' must be set for shakespeare (minibatch SAM)")
    device = resolve_device(cfg.device)
    path = default_data_path(cfg, "shakespeare", "input.txt")
    if path.is_dir():
        path = path / "input.txt"
    split, vocab = load_shakespeare(path, seq_len=cfg.seq_len, vocab=cfg.vocab, seed=cfg.seed)
    n_train = split.n_train if cfg.n_train is None else cfg.n_train
    n_test = split.n_test if cfg.n_test is None else cfg.n_test
    for name, wanted, have in (("n_train", n_train, split.n_train), ("n_test", n_test, split.n_test)):
        if wanted > have:
            raise ConfigError(
                f"config field '{name}' is {wanted}, but {path} gives only {have} windows of {cfg.seq_len + 1}"
            )
    x_train, y_train = split.x_train[:n_train].to(device), split.y_train[:n_train].to(device)
    x_test, y_test = split.x_test[:n_test].to(device), split.y_test[:n_test].to(device)
    torch.manual_seed(cfg.seed)
    model = Transformer(
        vocab.size, cfg.seq_len, layers=cfg.layers, heads=cfg.heads, d_model=cfg.d_model, key_size=cfg.key_size
    ).to(device=device, dtype=getattr(torch, cfg.dtype))
    loss = get_loss(cfg.loss)
    minibatch, eval_batch = minibatch_objectives(cfg, model, loss, x_train, y_train)
    train = sharded_objective(model, loss, x_train, y_train, cfg.chunk_size or 256, hvp_mode=cfg.hvp_mode)
    test = sharded_objective(model, loss, x_test, y_test, cfg.chunk_size or 256)
    source = f"{split.source}; using {n_train} train / {n_test} test windows, minibatches of {cfg.batch_size}"
    return Task(
        "shakespeare",
        model,
        train,
        test,
        source,
        minibatch=minibatch,
        test_every_measurement=True,
        eval_batch=eval_batch,
        probe_batches=probe_batch_objectives(cfg, model, loss, x_train, y_train),
    )
