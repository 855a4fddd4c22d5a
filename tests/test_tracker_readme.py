"""The README's 'your own model' snippet runs, and the tracker agrees with a dense Hessian."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from samedge import SAM, SharpnessTracker, sam_edge

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_own_model_snippet_runs(capsys):
    text = README.read_text()
    match = re.search(r"<!-- snippet: own-model -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lacks the own-model snippet"
    namespace: dict = {}
    exec(compile(match.group(1), "README-own-model", "exec"), namespace)
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) >= 2
    m = namespace["m"]
    assert m.sharpness > 0 and m.edge == pytest.approx(sam_edge(0.05, 0.05, m.grad_norm), rel=1e-12)


def test_tracker_matches_dense_hessian_and_sam_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 3, (40,))
    loss_fn = nn.CrossEntropyLoss()
    tracker = SharpnessTracker(model, loss_fn, (x, y), chunk_size=7, tol=1e-10)
    opt = SAM(model.parameters(), lr=0.5, rho=0.1)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    m = tracker.measure(eta=0.5, rho=0.1)
    params = [p.detach() for p in model.parameters()]
    shapes = [p.shape for p in params]
    flat = torch.cat([p.reshape(-1) for p in params])

    def loss_of(w):
        pieces, i = [], 0
        for s in shapes:
            n = int(torch.tensor(s).prod())
            pieces.append(w[i : i + n].view(s))
            i += n
        out = torch.func.functional_call(model, dict(zip([n for n, _ in model.named_parameters()], pieces)), (x,))
        return loss_fn(out, y)

    H = torch.autograd.functional.hessian(loss_of, flat)
    top = torch.linalg.eigvalsh(H)[-1].item()
    assert m.sharpness == pytest.approx(top, rel=1e-8)
    flat_req = flat.clone().requires_grad_()
    grad = torch.autograd.grad(loss_of(flat_req), flat_req)[0]
    assert m.grad_norm == pytest.approx(grad.norm().item(), rel=1e-10)
    assert opt.last_grad_norm is not None
    assert m.edge == pytest.approx(sam_edge(0.5, 0.1, m.grad_norm), rel=1e-12)
    evecs = torch.linalg.eigh(H).eigenvectors[:, -1]
    assert m.grad_alignment == pytest.approx(abs(torch.dot(grad, evecs).item()) / grad.norm().item(), abs=1e-6)
