"""Sharpness measurements inside a user's own training loop.

    tracker = SharpnessTracker(model, loss_fn, (x, y))         # any nn.Module, any loss
    m = tracker.measure(eta=0.1, rho=0.05, optimizer="sam")     # at the model's current weights
    m = tracker.measure(optimizer=opt)                          # SGD, Adam, AdamW, RMSprop or SAM over one
    m = tracker.measure(eta=0.1, batch=(xb, yb))                # on a new minibatch
    m.sharpness, m.edge, m.sharpness_over_edge, m.grad_alignment

The loss function takes ``(outputs, targets)`` and returns the loss of a batch (the outputs may
be a tuple or dict: only the loss looks inside them).  ``data`` is one ``(inputs, targets)``
pair (split into ``chunk_size`` pieces) or a list of such batches; their combination is the
full-batch loss (a ``torch.nn`` loss module is combined with its own normaliser, see
:mod:`samedge.core.losses`).  Eigen-solves are warm-started from the previous call.

What is measured: the Hessian of the loss in the parameters with ``requires_grad=True`` (those
the loss does not use are left out, with a warning, once).  A reading never changes the model:
buffers (BatchNorm's running statistics) are copied, and random layers (dropout) draw their
numbers from a seed of the reading (drawn from ``seed``), the same in every gradient and HVP of
the reading, with the caller's random state untouched.  ``mode="eval"`` measures the model in
eval mode (training flags restored afterwards).  Two extra HVPs check that the function did not
change between products; a reading where it did is reported as not converged.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from samedge.core.batch_sharpness import BatchSharpness, batch_sharpness
from samedge.core.blocks import BlockEigensolver, BlockReading, block_readings, group_blocks, module_blocks
from samedge.core.curvature import HessianEigensolver
from samedge.core.distributed import ShardedObjective
from samedge.core.measurements import Measurement, measure
from samedge.core.method import Method
from samedge.core.objective import HVP_MODES, MODES, Objective
from samedge.core.secant import PERTURBATION_PAIRS, SecantEstimate, SecantWindow
from samedge.core.spectrum import SpectralDensity, TraceEstimate, hessian_density, hessian_trace
from samedge.core.validation import positive_int

__all__ = ["SharpnessTracker"]

Batch = tuple[Any, Tensor]


def _check_batch(batch: object, what: str) -> Batch:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], Tensor)):
        raise ValueError(f"{what} must be a pair (inputs, targets) with targets a tensor, got {type(batch).__name__}")
    inputs, targets = batch
    if targets.numel() == 0:
        raise ValueError(f"{what} has no targets")
    if isinstance(inputs, Tensor) and inputs.ndim > 0 and targets.ndim > 0 and len(inputs) != len(targets):
        raise ValueError(f"{what}: {len(inputs)} inputs but {len(targets)} targets")
    return inputs, targets


class SharpnessTracker:
    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Tensor], Tensor],
        data: Batch | Sequence[Batch],
        *,
        chunk_size: int | None = None,
        k: int = 1,
        tol: float = 1e-3,
        max_iter: int = 100,
        method: str = "lanczos",
        seed: int = 0,
        mode: str | None = None,
        hvp_mode: str = "double-backward",
        distributed: bool = False,
        process_group: Any = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (outputs, targets) -> loss, got {type(loss_fn).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be None, 'train' or 'eval', got {mode!r}")
        if hvp_mode not in HVP_MODES:
            raise ValueError(f"unknown hvp_mode {hvp_mode!r}; choose one of {', '.join(HVP_MODES)}")
        self.model, self.loss_fn = model, loss_fn
        self.chunk_size = positive_int("chunk_size", chunk_size, optional=True)
        self.mode, self.hvp_mode = mode, hvp_mode
        self._unused: tuple[str, ...] = ()
        # In a torch.distributed program each rank passes its shard; every rank gets the same reading.
        self.distributed, self.process_group = distributed, process_group
        self.objective = self._objective(data)
        self.solver = HessianEigensolver(k=k, method=method, tol=tol, max_iter=max_iter, seed=seed)
        self._seed = seed
        self._adaptive_solvers: dict[str, HessianEigensolver] = {}
        # the seeds of the readings (random layers), apart from the eigen-solver's start vectors
        self._seeds = torch.Generator().manual_seed(seed + 0x5EED)

    def _objective(self, data: Batch | Sequence[Batch], what: str = "data") -> Objective:
        kw: dict[str, Any] = dict(hvp_mode=self.hvp_mode, mode=self.mode)
        if self._unused:
            kw["parameter_names"] = [
                n for n, p in self.model.named_parameters() if p.requires_grad and n not in self._unused
            ]
        if isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], Tensor):
            inputs, targets = _check_batch(data, what)
            if isinstance(inputs, Tensor):
                local = Objective.from_tensors(self.model, self.loss_fn, inputs, targets, self.chunk_size, **kw)
            else:
                local = Objective(self.model, self.loss_fn, [(inputs, targets)], **kw)
        elif not isinstance(data, (list, tuple)) or not data:
            raise ValueError(f"{what} must be (inputs, targets) or a non-empty list of such batches")
        else:
            local = Objective(
                self.model, self.loss_fn, [_check_batch(b, f"{what} batch {i}") for i, b in enumerate(data)], **kw
            )
        return ShardedObjective(local, group=self.process_group) if self.distributed else local

    def measure(
        self,
        method: Method | None = None,
        *,
        eta: float | None = None,
        rho: float | None = None,
        optimizer: str | torch.optim.Optimizer | None = None,
        momentum: float | None = None,
        batch: Batch | Sequence[Batch] | None = None,
        preconditioner: Sequence[Tensor] | None = None,
        groups: Mapping[str, Sequence[str | Tensor]] | None = None,
        by_module: bool = False,
        block_sharpness: bool = False,
    ) -> Measurement:
        """Sharpness, gradient norm, edges and alignments at the model's current parameters.

        The method is ``method`` (a :class:`Method`), or ``optimizer`` ("sam", "usam", "gd"; the
        default "sam") with ``eta``, ``rho`` and ``momentum``, or ``optimizer`` a ``torch.optim``
        ``SGD``, ``Adam``, ``AdamW``, ``RMSprop`` or a ``samedge.SAM`` over one of them, whose
        hyperparameters give the edge and whose state gives an adaptive base's preconditioner
        (Adam's ``exp_avg_sq`` and ``step``; RMSprop's ``square_avg``).  For an adaptive base the
        reading also has ``preconditioned_sharpness`` (and ``effective_sharpness`` for SAM/USAM),
        and ``sharpness_over_edge`` compares that with the base's threshold; ``preconditioner``
        gives P by hand (one tensor per measured parameter) where no optimizer is passed.
        ``batch`` measures on that data instead of the tracker's (the eigen-solvers' warm starts
        are kept).  Everything is checked before any work.

        ``groups={name: [parameters or parameter names or module prefixes]}`` or ``by_module=True``
        (the model's top-level modules) add ``m.blocks``: per block, the top eigenvector's mass and
        Rayleigh share (no extra HVP); with ``block_sharpness=True`` also each block's own top
        eigenvalue ``lambda_max(H_BB)`` (Lanczos per block, its HVPs in the block's ``hvps``)."""
        method = self._method(method, eta, rho, optimizer, momentum)
        torch_optimizer = optimizer if isinstance(optimizer, torch.optim.Optimizer) else None
        if preconditioner is not None and torch_optimizer is not None:
            raise ValueError("pass preconditioner= or an optimizer whose state gives it, not both")
        if torch_optimizer is not None:
            mine = {id(p) for p in self.model.parameters()}
            held = [p for group in torch_optimizer.param_groups for p in group["params"]]
            if any(id(p) not in mine for p in held):
                raise ValueError(
                    f"the {type(torch_optimizer).__name__} optimizer holds parameters that are not this model's; "
                    "pass the optimizer that trains the tracked model"
                )
        if block_sharpness and groups is None and not by_module:
            raise ValueError("block_sharpness needs groups= or by_module=True")
        named_groups = self._group_names(groups) if groups is not None else None
        objective = self.objective if batch is None else self._objective(batch, "batch")
        # the reading's seed (on the local objective of a sharded one: the one that calls the model)
        getattr(objective, "local", objective).seed = int(torch.randint(0, 2**62, (), generator=self._seeds))
        params = objective.parameters()
        ev = objective.loss_and_grad(params)
        assert ev.grad is not None
        grad = ev.grad
        if not (math.isfinite(ev.loss) and all(bool(torch.isfinite(g).all()) for g in grad)):
            raise ValueError(
                f"the loss ({ev.loss:g}) or its gradient is not finite at the model's parameters; "
                "a Hessian reading needs finite values (check the inputs, targets and weights for NaN or inf)"
            )
        if objective.unused:
            objective, params, grad = self._leave_out(objective, params, grad)
        sam_grad = method.direction(objective.grad, params, grad)
        P: Sequence[Tensor] | None = None
        if method.preconditioned:
            if torch_optimizer is not None:
                P = self._optimizer_preconditioner(torch_optimizer, method, objective.names, params)
            elif preconditioner is not None:
                P = tuple(preconditioner)
                if len(P) != len(params) or any(p.shape != q.shape for p, q in zip(P, params)):
                    raise ValueError("preconditioner must hold one tensor shaped like each measured parameter")
        m = measure(
            objective,
            params,
            grad,
            sam_grad,
            self.solver,
            method=method,
            check_repeat=True,
            preconditioner=P,
            preconditioned_solver=self._adaptive("preconditioned"),
            effective_solver=self._adaptive("effective"),
        )

        if named_groups is None and not by_module:
            return m
        sizes = [p.numel() for p in params]
        names = objective.names
        blocks = (
            module_blocks(self.model, names, sizes)
            if named_groups is None
            else group_blocks(named_groups, names, sizes)
        )
        last = self.solver.last
        assert last is not None
        readings = block_readings(last.eigenvectors[0], blocks, None if last.products is None else last.products[0])
        if block_sharpness:
            readings = self._block_sharpness(objective, params, blocks, readings, last.eigenvectors[0])
        return dataclasses.replace(m, blocks=readings)

    def _group_names(self, groups: Mapping[str, Sequence[str | Tensor]]) -> dict[str, list[str]]:
        """``groups`` with parameters (tensors) replaced by their names in the model."""
        if not isinstance(groups, Mapping):
            raise ValueError(f"groups must be a mapping name -> parameters, got {type(groups).__name__}")
        by_id = {id(p): n for n, p in self.model.named_parameters()}
        out: dict[str, list[str]] = {}
        for name, members in groups.items():
            listed = [members] if isinstance(members, (str, Tensor)) else list(members)
            out[name] = []
            for member in listed:
                if isinstance(member, Tensor):
                    if id(member) not in by_id:
                        raise ValueError(f"group {name!r} holds a tensor that is not a parameter of the model")
                    out[name].append(by_id[id(member)])
                elif isinstance(member, str):
                    out[name].append(member)
                else:
                    raise ValueError(
                        f"group {name!r}: members must be parameters or names, got {type(member).__name__}"
                    )
        return out

    def _block_sharpness(self, objective, params, blocks, readings, top: Tensor) -> tuple[BlockReading, ...]:
        if getattr(self, "_block_solver", None) is None:
            seed = self.solver.generator.initial_seed() + 5
            self._block_solver = BlockEigensolver(tol=self.solver.tol, max_iter=self.solver.max_iter, seed=seed)
        try:
            results = self._block_solver(objective.hvp_operator(params), blocks, top)
        finally:
            objective.release_hvp_graph()
        return tuple(
            dataclasses.replace(
                r,
                sharpness=float(results[r.name].eigenvalues[0]),
                relative_residual=float(results[r.name].relative_residuals[0]),
                converged=bool(results[r.name].converged),
                hvps=results[r.name].matvecs,
            )
            for r in readings
        )

    def batch_sharpness(
        self,
        batches: Sequence[Batch],
        method: Method | None = None,
        *,
        eta: float | None = None,
        rho: float | None = None,
        optimizer: str | torch.optim.Optimizer | None = None,
        momentum: float | None = None,
    ) -> BatchSharpness:
        """Batch sharpness ``mean_B g_B^T H_B g_B / ||g_B||^2`` over ``batches`` (each an ``(inputs,
        targets)`` pair) at the model's current parameters, with its standard error, and the batch
        step sharpness ``mean_B d_B^T H_B d_B / g_B^T d_B`` of the method's step ``d_B`` (compare
        both with ``2/eta``; :mod:`samedge.core.batch_sharpness`).  The method is given as to
        :meth:`measure`; without one, GD at ``eta = 1``."""
        if not isinstance(batches, (list, tuple)) or not batches:
            raise ValueError("batches must be a non-empty list of (inputs, targets) pairs")
        if method is None and eta is None and optimizer is None:
            method = Method("gd", 1.0)
        method = self._method(method, eta, rho, optimizer, momentum)
        objectives = [self._objective(_check_batch(b, f"batch {i}"), f"batch {i}") for i, b in enumerate(batches)]
        seed = int(torch.randint(0, 2**62, (), generator=self._seeds))
        for o in objectives:
            getattr(o, "local", o).seed = seed
        return batch_sharpness(objectives, objectives[0].parameters(), method)

    def _adaptive(self, name: str) -> HessianEigensolver:
        """The warm solver of the preconditioned (seed + 5) or effective (seed + 6) reading."""
        if name not in self._adaptive_solvers:
            main = self.solver
            offset = 5 if name == "preconditioned" else 6
            self._adaptive_solvers[name] = HessianEigensolver(
                k=1, method=main.method, tol=main.tol, max_iter=main.max_iter, seed=self._seed + offset
            )
        return self._adaptive_solvers[name]

    def _optimizer_preconditioner(
        self, optimizer: torch.optim.Optimizer, method: Method, names: Sequence[str], params: Sequence[Tensor]
    ) -> tuple[Tensor, ...] | None:
        """The adaptive base's P from the optimizer's state, in the order of the measured
        parameters; None before its first step (no state yet)."""
        inner = getattr(optimizer, "base_optimizer", None) or optimizer
        named = dict(self.model.named_parameters())
        states = [inner.state.get(named[name], {}) for name in names]
        key = "square_avg" if method.base == "rmsprop" else "exp_avg_sq"
        if not any(states):
            return None
        if not all(key in st and "step" in st for st in states):
            raise ValueError(
                f"the optimizer has state for some measured parameters but not others: P (its {key}) is incomplete"
            )
        steps = {int(st["step"]) for st in states}
        if len(steps) != 1:
            raise ValueError(f"the parameters' Adam steps differ ({sorted(steps)}): one preconditioner does not apply")
        rule = method.rule
        state: dict[str, Any] = {key: tuple(st[key] for st in states), "step": steps.pop()}
        P = rule.preconditioner(state)
        return None if P is None else tuple(p.detach().to(q.dtype) for p, q in zip(P, params))

    def _leave_out(self, objective: Objective, params, grad):
        """Drop the parameters the loss does not use (said once); ``params`` and ``grad`` follow."""
        warnings.warn(
            f"parameters {', '.join(objective.unused)} are not used by the loss: left out of the Hessian and the "
            "gradient",
            stacklevel=3,
        )
        self._unused = self._unused + objective.unused
        keep = [i for i, name in enumerate(objective.names) if name not in objective.unused]
        restricted = objective.restricted([objective.names[i] for i in keep])
        if self.distributed and not isinstance(restricted, ShardedObjective):
            restricted = ShardedObjective(restricted, group=self.process_group)
        if objective is self.objective:
            self.objective = restricted
        return restricted, tuple(params[i] for i in keep), tuple(grad[i] for i in keep)

    @staticmethod
    def _method(
        method: Method | None,
        eta: float | None,
        rho: float | None,
        optimizer: str | torch.optim.Optimizer | None,
        momentum: float | None,
    ) -> Method:
        keywords = {k: v for k, v in dict(eta=eta, rho=rho, momentum=momentum).items() if v is not None}
        if method is not None:
            if not isinstance(method, Method):
                raise ValueError(f"method must be a samedge.Method, got {method!r}")
            if keywords or optimizer is not None:
                raise ValueError("pass either method= or optimizer/eta/rho/momentum, not both")
            return method
        if isinstance(optimizer, torch.optim.Optimizer):
            if keywords:
                raise ValueError(f"optimizer= an optimizer object gives the method; do not pass {', '.join(keywords)}")
            return Method.from_optimizer(optimizer)
        if eta is None:
            raise ValueError(
                "measure needs eta (or method=Method(...), or optimizer= a torch.optim or samedge.SAM optimizer)"
            )
        return Method(optimizer if optimizer is not None else "sam", eta, rho or 0.0, momentum or 0.0)

    # Beyond the top eigenvalue (samedge.core.spectrum): the probes come from one generator,
    # seeded with ``seed + 3`` when first used, so a tracker's sequence of readings is reproducible.
    def _probe_generator(self) -> torch.Generator:
        if getattr(self, "_probes", None) is None:
            self._probes = torch.Generator().manual_seed(self.solver.generator.initial_seed() + 3)
        return self._probes

    # Per-step sharpness for free (samedge.core.secant): pairs from the user's own loop.
    def secant(
        self, s: Tensor | None = None, y: Tensor | None = None, *, pairs: int = PERTURBATION_PAIRS
    ) -> SecantEstimate | None:
        """Add the secant pair ``(s, y)`` (``y = grad(w + s) - grad(w)``, e.g. ``SAM(...,
        secant_pair=True).last_secant_pair``, or consecutive steps) if given, and return
        Rayleigh-Ritz on the last ``pairs`` pairs (None before the first): a sharpness estimate
        that costs no gradient and no HVP.  Trust it where ``estimate.trusted`` (its residual
        is within :data:`~samedge.core.secant.SECANT_MAX_RESIDUAL`)."""
        window = getattr(self, "_secants", None)
        if window is None or window.size != pairs:
            window = self._secants = SecantWindow(pairs)
        if (s is None) != (y is None):
            raise ValueError("pass both s and y (a secant pair), or neither")
        if s is not None and y is not None:
            window.push(s, y)
        return window.estimate(with_vector=True)

    def trace(self, *, probes: int = 32, deflate: bool = False) -> TraceEstimate:
        """Hutchinson trace of the Hessian at the model's current parameters, with its standard
        error; ``deflate`` handles the span of the last :meth:`measure`'s eigenvectors exactly."""
        params = self.objective.parameters()
        vectors = self.solver.previous if deflate else None
        return hessian_trace(self.objective, params, probes=probes, generator=self._probe_generator(), deflate=vectors)

    def density(self, *, probes: int = 4, steps: int = 64) -> SpectralDensity:
        """SLQ spectral density of the Hessian at the model's current parameters."""
        params = self.objective.parameters()
        return hessian_density(self.objective, params, probes=probes, steps=steps, generator=self._probe_generator())
