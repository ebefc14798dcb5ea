"""The dense backend against an independent float64 NumPy oracle, and the optimizer's API."""

import copy

import numpy as np
import pytest
import torch

import sven_ext
from sven_ext.testing import mlp

ATOL = 1e-10  # DESIGN.md section 1: the reference's absolute singular-value floor


def oracle_update(model, loss, *, lr, k, rtol, kappa=2.0, params=None):
    """``-lr V_k S_k^-1 U_k^T r`` from a Jacobian built one row at a time and ``numpy.linalg.svd``.

    Returns ``{name: delta}`` for every parameter (zero for those that do not move).
    """
    model = copy.deepcopy(model)
    named = dict(model.named_parameters())
    moving = list(named) if params is None else params
    out = loss(model)
    residual = out.values.reshape(-1) if isinstance(out, sven_ext.Residuals) else out ** (kappa / 2)
    tensors = [named[n] for n in moving]
    jac = np.zeros((residual.numel(), sum(t.numel() for t in tensors)))
    for i in range(residual.numel()):
        grads = torch.autograd.grad(residual[i], tensors, retain_graph=True, allow_unused=True)
        jac[i] = np.concatenate([
            np.zeros(t.numel()) if g is None else g.detach().reshape(-1).numpy() for t, g in zip(tensors, grads)
        ])
    r = residual.detach().numpy()
    u, s, vt = np.linalg.svd(jac, full_matrices=False)
    keep = (s > rtol * s[0]) & (s > ATOL)
    rank = int(np.argmin(keep)) if not keep.all() else len(s)
    rank = min(rank, k)
    delta = -lr * vt[:rank].T @ ((u[:, :rank].T @ r) / s[:rank])
    out, at = {}, 0
    for name, t in named.items():
        if name in moving:
            out[name] = torch.from_numpy(delta[at:at + t.numel()].reshape(t.shape))
            at += t.numel()
        else:
            out[name] = torch.zeros_like(t.detach())
    return out, s[:rank]


def step_update(model, loss, **kwargs):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = sven_ext.Sven(model, backend="dense", **{"safeguard": None, **kwargs})  # the bare step's arithmetic
    opt.step(lambda: loss(model))
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}, opt


def relative(update, reference):
    num = sum(float((update[n] - reference[n]).square().sum()) for n in reference)
    den = sum(float(r.square().sum()) for r in reference.values())
    return (num / den) ** 0.5


def make_loss(rows, x, y):
    if rows == "losses":
        return lambda model: (model(x) - y).square().sum(1) + 0.1
    if rows == "residuals_b":
        return lambda model: sven_ext.Residuals((model(x) - y).sum(1))
    return lambda model: sven_ext.Residuals(model(x) - y)


CASES = [
    # sizes, activation, rows, kappa, k, rtol
    ((3, 8, 2), "gelu", "losses", 2.0, 4, 1e-3),
    ((3, 8, 8, 2), "tanh", "losses", 1.0, 13, 1e-3),
    ((3, 8, 8, 8, 2), "gelu", "residuals_b", 2.0, 3, 1e-3),
    ((3, 6, 6, 2), "tanh", "residuals_bm", 2.0, 26, 1e-2),
    ((3, 5, 2), "gelu", "residuals_bm", 2.0, 7, 1e-6),
    ((3, 8, 8, 2), "gelu", "losses", 1.0, 5, 0.3),
]


@pytest.mark.parametrize("sizes,activation,rows,kappa,k,rtol", CASES, ids=lambda v: str(v).replace(" ", ""))
def test_dense_matches_numpy_oracle(sizes, activation, rows, kappa, k, rtol):
    torch.manual_seed(1)
    x = torch.randn(13, sizes[0], dtype=torch.float64)
    y = torch.randn(13, sizes[-1], dtype=torch.float64)
    model = mlp(sizes, activation, seed=len(sizes))
    loss = make_loss(rows, x, y)
    expected, kept = oracle_update(model, loss, lr=0.3, k=k, rtol=rtol, kappa=kappa)
    update, opt = step_update(model, loss, lr=0.3, k=k, rtol=rtol, kappa=kappa)
    assert relative(update, expected) < 1e-10
    info = opt.last_info
    assert info["backend"] == "dense"
    assert info["rank"] == len(kept) == info["singular_values"].numel()
    np.testing.assert_allclose(info["singular_values"].numpy(), kept, rtol=1e-10)
    assert (info["singular_values"].diff() <= 0).all()


def test_rank_cap_and_rtol_truncate():
    torch.manual_seed(2)
    x, y = torch.randn(13, 3, dtype=torch.float64), torch.randn(13, 2, dtype=torch.float64)
    loss = make_loss("losses", x, y)
    _, capped = step_update(mlp((3, 8, 2)), loss, lr=0.1, k=3, rtol=0.0)
    assert capped.last_info["rank"] == 3
    _, cut = step_update(mlp((3, 8, 2)), loss, lr=0.1, k=13, rtol=0.5)
    s = cut.last_info["singular_values"]
    assert 1 <= cut.last_info["rank"] < 13 and (s > 0.5 * s[0]).all()


def test_lr_is_read_from_param_groups_every_step():
    torch.manual_seed(3)
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    loss = make_loss("losses", x, y)
    model = mlp((3, 8, 2))
    opt = sven_ext.Sven(model, lr=0.2, k=3, backend="dense")
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.25)
    opt.step(lambda: loss(model))
    scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    expected, _ = oracle_update(model, loss, lr=0.05, k=3, rtol=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step(lambda: loss(model))
    update = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    assert relative(update, expected) < 1e-10


def test_state_dict_round_trip():
    torch.manual_seed(4)
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    loss = make_loss("losses", x, y)
    model = mlp((3, 8, 2))
    opt = sven_ext.Sven(model, lr=0.2, k=3, rtol=1e-2, backend="dense")
    opt.step(lambda: loss(model))
    opt.step(lambda: loss(model))
    state = opt.state_dict()
    state["param_groups"][0]["lr"] = 0.07
    other = sven_ext.Sven(model, lr=1.0, k=5, backend="dense")
    other.load_state_dict(state)
    group = other.param_groups[0]
    assert (group["lr"], group["k"], group["rtol"], group["backend"]) == (0.07, 3, 1e-2, "dense")
    assert other.state_dict()["state"] == opt.state_dict()["state"]
    expected, _ = oracle_update(model, loss, lr=0.07, k=3, rtol=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    other.step(lambda: loss(model))
    update = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    assert relative(update, expected) < 1e-10


def test_params_restricts_what_moves():
    torch.manual_seed(5)
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    loss = make_loss("residuals_bm", x, y)
    model = mlp((3, 8, 8, 2))
    moving = ["2.weight", "4.bias"]
    named = dict(model.named_parameters())
    expected, _ = oracle_update(model, loss, lr=0.1, k=6, rtol=1e-3, params=moving)
    before = {n: p.detach().clone() for n, p in named.items()}
    opt = sven_ext.Sven(model, lr=0.1, k=6, backend="dense", params=[named[n] for n in moving])
    opt.step(lambda: loss(model))
    for name, p in named.items():
        if name in moving:
            assert not torch.equal(p, before[name])
        else:
            assert torch.equal(p, before[name]), name
    update = {n: p.detach() - before[n] for n, p in named.items()}
    assert relative(update, expected) < 1e-10


class _WithUnused(torch.nn.Module):
    """An MLP with a Linear layer the forward pass never calls, between two that it does."""

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(3, 5)
        self.unused = torch.nn.Linear(4, 3)
        self.last = torch.nn.Linear(5, 2)

    def forward(self, x):
        return self.last(torch.tanh(self.first(x)))


def test_unused_parameter_gets_a_zero_column():
    torch.manual_seed(6)
    model = _WithUnused().double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    loss = make_loss("losses", x, y)
    expected, _ = oracle_update(model, loss, lr=0.1, k=6, rtol=1e-3)
    # chunk_rows=4: the unused parameter's columns are zeroed in every chunk of rows.
    update, _ = step_update(model, loss, lr=0.1, k=6, rtol=1e-3, chunk_rows=4)
    assert torch.equal(update["unused.weight"], torch.zeros(3, 4, dtype=torch.float64))
    assert torch.equal(update["unused.bias"], torch.zeros(3, dtype=torch.float64))
    assert relative(update, expected) < 1e-10


def test_closure_returning_a_scalar_is_rejected():
    model = mlp((3, 4, 1))
    x = torch.randn(5, 3, dtype=torch.float64)
    opt = sven_ext.Sven(model, backend="dense")
    with pytest.raises(ValueError, match=r"per-sample losses of shape \(B,\).*reduce the batch"):
        opt.step(lambda: model(x).square().mean())
