"""Where the sharpness lies: the top eigenvector's mass per block of parameters, and each block's
own top eigenvalue.

A *block* is a set of parameters (a module, a layer, a group the user names).  With ``v`` the unit
top eigenvector of the Hessian ``H`` (flat, in the objective's parameter order) and ``v[B]`` its
entries in block ``B``:

* ``mass_B = ||v[B]||^2`` (the masses of a partition sum to 1): how much of the sharpest
  direction lies in ``B``;
* ``rayleigh_share_B = v[B]^T (H v)[B] / v^T H v`` (they sum to 1): ``B``'s part of the Rayleigh
  quotient.  It needs ``H v``, which the Lanczos solver has without another product
  (:attr:`~samedge.core.eigen.EigenResult.products`).  For an exact eigenvector ``H v = lambda v``
  and the share *equals* the mass; it differs by at most ``||v[B]|| ||r|| / lambda`` (``r`` the
  residual), so ``rayleigh_share - mass`` says how far the reading is from an eigenvector, per
  block, and nothing about the curvature beyond the mass;
* ``sharpness_B = lambda_max(H_BB)``: the top eigenvalue of the block's own Hessian (the operator
  ``v_B -> (H [v_B; 0])_B``, one HVP per product), by Lanczos (:class:`BlockEigensolver`,
  warm-started per block).  ``H_BB`` is a principal submatrix of ``H``, so by Cauchy interlacing
  ``lambda_max(H_BB) <= lambda_max(H)``; a Ritz value of ``H_BB`` is a lower bound of
  ``lambda_max(H_BB)``, so a block value above ``lambda_1 + residual_1`` means the main solve
  missed the top eigenvalue (:func:`interlacing_holds`).

Default blocks (:func:`module_blocks`): the model's top-level modules, looking through containers
(``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``: their children are the blocks), a
parameter registered on the model itself being its own block; ``by="leaves"``: the module that
owns each parameter.  :func:`group_blocks` builds blocks from ``{name: [parameter names or
prefixes]}``; parameters in no group form the block ``"other"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from samedge.core.eigen import EigenResult, lanczos
from samedge.core.operator import LinearOperator

__all__ = [
    "Block",
    "BlockReading",
    "module_blocks",
    "group_blocks",
    "parse_groups",
    "block_readings",
    "block_operator",
    "BlockEigensolver",
    "interlacing_holds",
    "OTHER",
]

#: the block of the parameters that no group names
OTHER = "other"
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class Block:
    """A named set of parameters and their ``(start, stop)`` ranges in the flat parameter vector."""

    name: str
    parameters: tuple[str, ...]
    ranges: tuple[tuple[int, int], ...]

    @property
    def size(self) -> int:
        return sum(b - a for a, b in self.ranges)

    def take(self, flat: Tensor) -> Tensor:
        """The block's entries of ``flat`` (its last dimension), concatenated."""
        return torch.cat([flat[..., a:b] for a, b in self.ranges], dim=-1)

    def put(self, values: Tensor, dim: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A flat vector of ``dim`` zeros with ``values`` in the block's entries."""
        out = torch.zeros(dim, dtype=dtype, device=device)
        at = 0
        for a, b in self.ranges:
            out[a:b] = values[at : at + b - a]
            at += b - a
        return out


@dataclass(frozen=True)
class BlockReading:
    """One block at one reading: its size, the top eigenvector's mass and Rayleigh share there
    and, where computed, its own top eigenvalue ``lambda_max(H_BB)`` (with the solve's relative
    residual, convergence and HVPs)."""

    name: str
    params: int
    mass: float
    rayleigh_share: float = math.nan
    sharpness: float | None = None
    relative_residual: float | None = None
    converged: bool | None = None
    hvps: int = 0


def _ranges(names: Sequence[str], sizes: Sequence[int]) -> dict[str, tuple[int, int]]:
    out, at = {}, 0
    for name, n in zip(names, sizes):
        out[name] = (at, at + int(n))
        at += int(n)
    return out


def _make(groups: dict[str, list[str]], names: Sequence[str], sizes: Sequence[int]) -> tuple[Block, ...]:
    where = _ranges(names, sizes)
    return tuple(
        Block(block, tuple(members), tuple(where[m] for m in members)) for block, members in groups.items() if members
    )


def _owner(model: nn.Module, name: str, by: str) -> str:
    parts = name.split(".")
    if by == "leaves":
        return ".".join(parts[:-1]) or name
    module, i = model, 0
    # descend through containers: a container's children are blocks, a module that is not one is a block
    while i < len(parts) - 1:
        child = getattr(module, parts[i], None)
        if not isinstance(child, nn.Module):
            break
        module, i = child, i + 1
        if not isinstance(module, _CONTAINERS):
            break
    return ".".join(parts[:i]) if i else name


def module_blocks(
    model: nn.Module, names: Sequence[str], sizes: Sequence[int], *, by: str = "modules"
) -> tuple[Block, ...]:
    """Blocks of the parameters ``names`` (of ``sizes`` entries, in flat order) by module:
    ``by="modules"`` the model's top-level modules, containers looked through; ``"leaves"`` the
    module owning each parameter."""
    if by not in ("modules", "leaves"):
        raise ValueError(f"by must be 'modules' or 'leaves', got {by!r}")
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(_owner(model, name, by), []).append(name)
    return _make(groups, names, sizes)


def _member(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def group_blocks(groups: Mapping[str, Sequence[str]], names: Sequence[str], sizes: Sequence[int]) -> tuple[Block, ...]:
    """Blocks named by ``groups``: each a list of parameter names or module prefixes (``"blocks.0.attn"``
    takes every parameter under that module).  A parameter in two groups, or a group that matches
    nothing, is an error; the parameters no group names form the block ``"other"``."""
    assigned: dict[str, str] = {}
    out: dict[str, list[str]] = {}
    for group, prefixes in groups.items():
        if not isinstance(group, str) or not group or group == OTHER:
            raise ValueError(f"group names must be non-empty strings other than {OTHER!r}, got {group!r}")
        if isinstance(prefixes, str):
            prefixes = [prefixes]
        members = [n for n in names if any(_member(n, p) for p in prefixes)]
        if not members:
            raise ValueError(
                f"group {group!r} ({', '.join(prefixes)}) matches no parameter; parameters: {', '.join(names)}"
            )
        for n in members:
            if n in assigned:
                raise ValueError(f"parameter {n!r} is in groups {assigned[n]!r} and {group!r}")
            assigned[n] = group
        out[group] = members
    rest = [n for n in names if n not in assigned]
    if rest:
        out[OTHER] = rest
    return _make(out, names, sizes)


def parse_groups(spec: str) -> dict[str, list[str]]:
    """``"embed=tok_emb,pos_emb; attn=blocks.0.attn"`` as ``{"embed": ["tok_emb", "pos_emb"], "attn":
    ["blocks.0.attn"]}`` (groups separated by ``;``, members by ``,``, spaces ignored)."""
    out: dict[str, list[str]] = {}
    for part in spec.split(";"):
        if not part.strip():
            continue
        name, eq, members = part.partition("=")
        name = name.strip()
        listed = [m.strip() for m in members.split(",") if m.strip()]
        if not eq or not name or not listed:
            raise ValueError(f"a group must read NAME=PARAM[,PARAM...], got {part.strip()!r}")
        if name in out:
            raise ValueError(f"group {name!r} is named twice")
        out[name] = listed
    if not out:
        raise ValueError(f"no groups in {spec!r}")
    return out


def block_readings(vector: Tensor, blocks: Sequence[Block], product: Tensor | None = None) -> tuple[BlockReading, ...]:
    """Mass (and, with ``product = H vector``, Rayleigh share) of each block for the eigenvector
    ``vector`` (normalized here, in float64)."""
    v = vector.double()
    v = v / torch.linalg.vector_norm(v)
    quotient = math.nan
    hv = None
    if product is not None:
        hv = product.double().to(v.device) / float(torch.linalg.vector_norm(vector.double()))
        quotient = float(torch.dot(v, hv))
    out = []
    for b in blocks:
        vb = b.take(v)
        share = math.nan
        if hv is not None and quotient != 0 and math.isfinite(quotient):
            share = float(torch.dot(vb, b.take(hv))) / quotient
        out.append(BlockReading(b.name, b.size, float(torch.dot(vb, vb)), share))
    return tuple(out)


def block_operator(operator: LinearOperator, block: Block) -> LinearOperator:
    """The block's Hessian ``H_BB`` as ``v_B -> (H [v_B; 0])_B``: one product of ``operator`` each."""

    def matvec(vb: Tensor) -> Tensor:
        return block.take(operator(block.put(vb, operator.dim, operator.dtype, operator.device)))

    return LinearOperator(matvec, block.size, dtype=operator.dtype, device=operator.device)


def interlacing_holds(block_sharpness: float, top: float, top_residual: float, tol: float = 1e-6) -> bool:
    """Whether ``lambda_max(H_BB) <= lambda_1`` as far as the readings can tell: a block's Ritz
    value is at most its true top eigenvalue, which is at most the true ``lambda_1``, which is at
    most ``top + top_residual`` when the main solve found the top eigenvalue."""
    return block_sharpness <= top + top_residual + tol * max(abs(top), 1.0)


class BlockEigensolver:
    """``lambda_max(H_BB)`` of each block by Lanczos, each block warm-started from its previous
    top eigenvector (the first time: the top eigenvector's part in the block, or a random vector)."""

    def __init__(self, *, tol: float = 1e-3, max_iter: int = 100, seed: int = 0):
        self.tol, self.max_iter = tol, max_iter
        self.generator = torch.Generator().manual_seed(seed)
        self.previous: dict[str, Tensor] = {}

    def __call__(
        self, operator: LinearOperator, blocks: Sequence[Block], top: Tensor | None = None
    ) -> dict[str, EigenResult]:
        out = {}
        for b in blocks:
            start = self.previous.get(b.name)
            if start is None and top is not None:
                part = b.take(top.to(operator.device))
                start = part if float(torch.linalg.vector_norm(part.double())) > 0 else None
            result = lanczos(
                block_operator(operator, b),
                v0=start,
                tol=self.tol,
                max_iter=self.max_iter,
                generator=self.generator,
            )
            if torch.isfinite(result.eigenvectors).all():
                self.previous[b.name] = result.eigenvectors[0].detach().clone()
            out[b.name] = result
        return out

    def state_dict(self) -> dict:
        return {"previous": dict(self.previous), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.previous = dict(state["previous"])
        self.generator.set_state(state["generator"])
