"""The exact Gram backend against the dense oracle, and the guarantees it makes."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sven_ext
from sven_ext import routes as routes_module
from sven_ext.backends import gram as gram_module
from sven_ext.testing import (
    LargestStorage, compare_backends, mlp, relative_difference, small_cnn, steps_against_dense, sven_update,
    tiny_transformer,
)

# small_cnn has an even kernel with padding="same" on purpose (asymmetric padding).
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")

F64 = 1e-9  # float64 gram vs float64 dense
F32 = 1e-4  # float32 gram vs float64 dense of the same weights


def regression(x, y, rows="losses"):
    """Closure factory: per-sample squared errors, or signed residuals ``(B,)`` / ``(B, m)``."""

    def loss(model):
        out = model(x.to(next(model.parameters()).dtype)) - y.to(next(model.parameters()).dtype)
        if rows == "losses":
            return out.square().sum(1)
        if rows == "residuals_b":
            return sven_ext.Residuals(out.sum(1))
        return sven_ext.Residuals(out)

    return loss


def token_loss(idx, targets):
    def loss(model):
        logits = model(idx)
        return nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)

    return loss


def data(batch, inputs, outputs, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, *inputs, generator=g, dtype=torch.float64),
            torch.randn(batch, outputs, generator=g, dtype=torch.float64))


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("sizes,activation,batch,rows,kappa,k", [
    ((3, 8, 2), "gelu", 7, "losses", 2.0, 4),
    ((3, 8, 8, 2), "tanh", 13, "losses", 1.0, 13),
    ((3, 6, 6, 6, 2), "gelu", 13, "residuals_b", 2.0, 2),
    ((3, 8, 1), "tanh", 13, "residuals_bm", 2.0, 5),
    ((3, 6, 6, 3), "tanh", 7, "residuals_bm", 2.0, 21),
], ids=["1hidden", "2hidden-kappa1", "3hidden-k2", "m1", "m3"])
def test_mlp(sizes, activation, batch, rows, kappa, k):
    x, y = data(batch, (sizes[0],), sizes[-1])
    model = mlp(sizes, activation, seed=batch)
    loss = regression(x, y, rows)
    assert compare_backends(model, loss, lr=0.2, k=k, kappa=kappa) < F64
    _, info = sven_update(model, loss, backend="gram", lr=0.2, k=k, kappa=kappa)
    assert info["backend"] == "gram" and info["rank"] <= k
    assert info["rank"] == info["singular_values"].numel()


def test_rank_truncation_matches():
    x, y = data(13, (3,), 2)
    model = mlp((3, 8, 8, 2))
    for k, rtol in ((2, 1e-3), (13, 0.2)):
        g, info = sven_update(model, regression(x, y), backend="gram", lr=0.1, k=k, rtol=rtol)
        d, dense_info = sven_update(model, regression(x, y), backend="dense", lr=0.1, k=k, rtol=rtol)
        assert relative_difference(g, d) < F64
        assert info["rank"] == dense_info["rank"] < 13
        torch.testing.assert_close(info["singular_values"], dense_info["singular_values"], rtol=1e-9, atol=0)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_cnn(bias):
    x, y = data(7, (3, 7, 7), 3)
    assert compare_backends(small_cnn(bias=bias), regression(x, y, "residuals_bm"), lr=0.1, k=9) < F64


def test_conv3d_groupnorm_and_eval_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(2, 4, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(2, 1, 1), groups=2),
        nn.GroupNorm(2, 4), nn.Tanh(),
        nn.Conv3d(4, 2, 2, padding="same", padding_mode="replicate"),
        nn.BatchNorm3d(2), nn.Flatten(), nn.LazyLinear(2),
    ).double()
    x, y = data(7, (2, 4, 5, 3), 2)
    model(x)  # materialise the lazy layer
    for _ in range(2):  # running statistics
        model(x + torch.randn_like(x))
    model.eval()
    assert compare_backends(model, regression(x, y), lr=0.1, k=5) < F64


@pytest.mark.parametrize("shared_positions", [False, True], ids=["per-sample-positions", "shared-positions"])
@pytest.mark.parametrize("route", ["seq_gram", "rows"])
def test_transformer(monkeypatch, shared_positions, route):
    # Force the cost model's choice for sequence layers, to check both routes.
    monkeypatch.setattr(routes_module, "SEQ_GRAM_COST_FACTOR", 0.0 if route == "seq_gram" else float("inf"))
    g = torch.Generator().manual_seed(3)
    idx, targets = torch.randint(0, 11, (7, 5), generator=g), torch.randint(0, 11, (7, 5), generator=g)
    model = tiny_transformer(11, 8, 2, 5, shared_positions=shared_positions)
    loss = token_loss(idx, targets)
    assert compare_backends(model, loss, lr=0.1, k=5) < F64
    _, info = sven_update(model, loss, backend="gram", lr=0.1, k=5)
    paths = info["paths"]
    assert paths["blocks.0.qkv.weight"] == route
    # Tied to the head (an Embedding use and a Linear use): both routes and their cross term, or the
    # per-row gradients of both uses formed together.
    assert paths["tok.weight"] == ("seq_gram + embedding_gram" if route == "seq_gram" else "rows")
    assert paths["pos.weight"] == "embedding_gram"


@pytest.mark.parametrize("backend,route", [("gram", "seq_gram"), ("gram", "rows"), ("sketch", None)])
def test_tied_head_with_a_row_per_token(monkeypatch, backend, route):
    # m = T rows per sample: the tied routes map rows to their samples' lookups.
    monkeypatch.setattr(routes_module, "SEQ_GRAM_COST_FACTOR", 0.0 if route == "seq_gram" else float("inf"))
    g = torch.Generator().manual_seed(4)
    idx, targets = torch.randint(0, 11, (4, 5), generator=g), torch.randint(0, 11, (4, 5), generator=g)
    model = tiny_transformer(11, 8, 2, 5)

    def per_token(m):
        losses = nn.functional.cross_entropy(m(idx).transpose(1, 2), targets, reduction="none")
        return sven_ext.Residuals(losses.sqrt())

    assert compare_backends(model, per_token, backend, lr=0.1, k=20, oversampling=10) < F64
    if route is not None:
        _, info = sven_update(model, per_token, backend="gram", lr=0.1, k=20)
        assert info["paths"]["tok.weight"] == ("seq_gram + embedding_gram" if route == "seq_gram" else "rows")


def test_transformer_rmsnorm_untied_two_layers():
    g = torch.Generator().manual_seed(4)
    idx, targets = torch.randint(0, 9, (13, 4), generator=g), torch.randint(0, 9, (13, 4), generator=g)
    model = tiny_transformer(9, 8, 2, 4, tied=False, layers=2, norm=nn.RMSNorm)
    assert compare_backends(model, token_loss(idx, targets), lr=0.1, k=6, kappa=1.0) < F64


class Attention(nn.Module):
    """``nn.MultiheadAttention`` between two Linear layers (it reads ``out_proj.weight`` directly)."""

    def __init__(self, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(3, 8)
        self.att = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = self.inp(x)
        h = h if self.batch_first else h.transpose(0, 1)
        a, _ = self.att(h, h, h)
        a = a if self.batch_first else a.transpose(0, 1)
        return self.out(a).mean(1)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
def test_multihead_attention_fallback(batch_first):
    torch.manual_seed(5)
    model = Attention(batch_first).double()
    x, y = data(7, (4, 3), 2)
    assert compare_backends(model, regression(x, y, "residuals_bm"), lr=0.1, k=8) < F64
    _, info = sven_update(model, regression(x, y), backend="gram", lr=0.1, k=8)
    assert info["paths"]["att.out_proj.weight"] == "rows"


class Twice(nn.Module):
    """One Linear called twice (2-D input), one with a sequence axis called twice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.a(torch.tanh(self.a(x))))
        s = torch.tanh(self.b(torch.tanh(self.b(h.unsqueeze(1) * torch.ones(3, 1, dtype=h.dtype)))))
        return self.head(s.mean(1))


@pytest.mark.parametrize("rows", ["losses", "residuals_bm"])
def test_module_called_twice(rows):
    torch.manual_seed(6)
    x, y = data(7, (4,), 2)
    assert compare_backends(Twice().double(), regression(x, y, rows), lr=0.1, k=7) < F64


def test_frozen_parameters_stay_put():
    model = mlp((3, 8, 8, 2), seed=7)
    model[0].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    x, y = data(13, (3,), 2)
    update, info = sven_update(model, regression(x, y), backend="gram", lr=0.1, k=6)
    assert not update["0.weight"].any() and not update["2.bias"].any()
    assert "0.weight" not in info["paths"]
    assert compare_backends(model, regression(x, y), lr=0.1, k=6) < F64


def test_params_argument_restricts_what_moves():
    model = mlp((3, 8, 8, 2), seed=8)
    x, y = data(7, (3,), 2)
    moving = ["2.weight", "0.bias"]
    update, info = sven_update(model, regression(x, y), backend="gram", lr=0.1, k=4, params=moving)
    assert sorted(info["paths"]) == sorted(moving)
    for name, delta in update.items():
        assert delta.any() == (name in moving), name
    assert compare_backends(model, regression(x, y), lr=0.1, k=4, params=moving) < F64


# ----------------------------------------------------------------------------- float32


@pytest.mark.parametrize("case", ["mlp", "cnn", "transformer"])
def test_float32_against_float64_dense(case):
    if case == "mlp":
        model, (x, y) = mlp((3, 16, 16, 2), seed=9), data(13, (3,), 2)
        loss = regression(x, y, "residuals_bm")
    elif case == "cnn":
        model, (x, y) = small_cnn(seed=9), data(7, (3, 7, 7), 3)
        loss = regression(x, y)
    else:
        g = torch.Generator().manual_seed(9)
        idx, targets = torch.randint(0, 11, (7, 5), generator=g), torch.randint(0, 11, (7, 5), generator=g)
        model, loss = tiny_transformer(seed=9), token_loss(idx, targets)
    model = model.float()  # float32 weights; the float64 oracle starts from exactly these
    assert compare_backends(model, loss, lr=0.1, k=5, dtype=torch.float32) < F32


# ----------------------------------------------------------------------------- errors and guarantees


def test_batchnorm_in_train_mode_is_refused_by_name():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double()
    x, y = data(7, (3,), 1)
    opt = sven_ext.Sven(model, backend="gram")
    with pytest.raises(ValueError, match=r"module '1' \(BatchNorm1d\).*batch statistics"):
        opt.step(lambda: regression(x, y)(model))
    model.eval()
    assert compare_backends(model, regression(x, y), lr=0.1, k=3) < F64


def test_parameter_used_outside_its_module_is_named():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(3, 4)
            self.scale = nn.Linear(4, 1)

        def forward(self, x):
            return torch.tanh(self.layer(x)) @ self.scale.weight.T

    model = Functional().double()
    x, y = data(7, (3,), 1)
    opt = sven_ext.Sven(model, backend="gram")
    with pytest.raises(RuntimeError, match=r"scale\.weight"):
        opt.step(lambda: regression(x, y)(model))


def test_residuals_that_mix_samples_are_recorded_whole():
    # The first step's check finds the per-sample factors wrong; recorded whole, the layers are exact.
    model = mlp((3, 6, 1), seed=10)
    x, _ = data(7, (3,), 1)

    def mixed(m):
        return (m(x) - m(x).mean()).square().sum(1)

    assert compare_backends(model, mixed, lr=0.1) < F64
    opt = sven_ext.Sven(model, backend="gram", lr=0.1)
    opt.step(lambda: mixed(model))
    assert shared_modules(opt) == {id(model[0]), id(model[2])}


def shared_modules(opt) -> set:
    """Ids of the modules the factor checks found shared by every sample, over all step signatures."""
    return {key for verdict in opt._checks._verdicts.values() for key, _ in verdict.shared}


class SeqFirst(nn.Module):
    """Linear layers applied to ``(T, B, d)``: the batch is on axis 1."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x.transpose(0, 1)))).transpose(0, 1).sum((1, 2))


def test_batch_not_on_axis_0():
    torch.manual_seed(12)
    model = SeqFirst().double()
    # T != B: the outputs have no batch axis 0, so the layers are recorded whole (exact, slower).
    x = torch.randn(7, 4, 3, dtype=torch.float64)
    assert compare_backends(model, lambda m: m(x).square(), lr=0.1) < F64
    # T == B looks batch-first; the first step's check against autograd catches it, and the layers
    # are recorded whole from then on.
    x = torch.randn(7, 7, 3, dtype=torch.float64)
    assert compare_backends(model, lambda m: m(x).square(), lr=0.1) < F64
    opt = sven_ext.Sven(model, backend="gram", lr=0.1)
    trajectory = copy.deepcopy(model)
    oracle = sven_ext.Sven(trajectory, backend="dense", lr=0.1)
    for _ in range(3):  # later steps (no check) keep the layers whole
        opt.step(lambda: model(x).square())
        oracle.step(lambda: trajectory(x).square())
    assert relative_difference({n: p.detach() for n, p in model.named_parameters()},
                               {n: p.detach() for n, p in trajectory.named_parameters()}) < F64


def test_a_shared_position_embedding_with_as_many_positions_as_samples():
    model = tiny_transformer(11, 8, 2, 5, shared_positions=True)
    g = torch.Generator().manual_seed(7)
    idx, targets = torch.randint(0, 11, (5, 5), generator=g), torch.randint(0, 11, (5, 5), generator=g)

    def losses(m):
        return F.cross_entropy(m(idx).transpose(1, 2), targets, reduction="none").mean(1)

    for backend in ("gram", "sketch", "auto"):
        assert compare_backends(model, losses, backend, lr=0.5, k=3, oversampling=10) < F64, backend
    # param_fraction draws backends for new subsets: they share what the first check found.
    opt = sven_ext.Sven(model, backend="gram", lr=0.5, k=3, param_fraction=0.5, seed=2)
    for _ in range(4):
        opt.step(lambda: losses(model))
    assert id(model.pos) in shared_modules(opt)


class _NormTwice(nn.Module):
    """One LayerNorm applied at two depths (its two calls' uses are formed inside the backward pass)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.first, self.second = nn.Linear(3, 6, dtype=torch.float64), nn.Linear(6, 2, dtype=torch.float64)
        self.norm = nn.LayerNorm(6, dtype=torch.float64)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        h = self.norm(torch.tanh(self.first(x)))
        return self.second(self.norm(h * h))


def test_a_norm_called_twice_is_exact_while_batches_and_hooks_change():
    model = _NormTwice()
    losses = [regression(*data(batch, (3,), 2, seed=seed)) for seed, batch in enumerate((7, 4, 9))]

    def rescale_with_a_hook(m):  # a hook on the norm that rewrites its output, added before the last step
        if not m.norm._forward_hooks:
            m.norm.register_forward_hook(lambda module, args, out: 1.5 * out)
        return losses[2](m)

    differences = steps_against_dense(model, [losses[0], losses[1], rescale_with_a_hook], backend="gram",
                                      lr=0.5, k=4)
    assert max(differences) < F64


def test_auto_uses_gram():
    model = mlp((3, 6, 1))
    x, y = data(7, (3,), 1)
    opt = sven_ext.Sven(model, lr=0.1)
    opt.step(lambda: regression(x, y)(model))
    assert opt.last_info["backend"] == "gram"
    assert opt.last_info["gram_bytes"] == 7 * 7 * 8


def test_never_allocates_the_jacobian():
    model = mlp((16, 32, 32, 32, 3), seed=11)
    x, y = data(13, (16,), 3)
    loss = regression(x, y, "residuals_bm")
    rows = 13 * 3
    params = sum(p.numel() for p in model.parameters())
    largest_layer = max(p.numel() for p in model.parameters())
    # Not the Jacobian, and not even one layer's per-sample gradients.
    limit = rows * largest_layer
    assert limit < rows * params
    for backend, expect_below in (("gram", True), ("dense", False)):
        opt = sven_ext.Sven(model, lr=0.1, backend=backend)
        for _ in range(2):  # the first gram step also checks its factors against autograd
            with LargestStorage() as mode:
                opt.step(lambda: loss(model))
            assert (mode.largest < limit) is expect_below, (backend, mode.largest, limit)


@pytest.mark.parametrize("rows", ["losses", "residuals"])
def test_gram_matrix_equals_explicit_jacobian_gram(rows):
    model = tiny_transformer(steps=4)
    torch.manual_seed(3)
    tokens = torch.randint(0, 11, (7, 4))

    def closure():
        logits = model(tokens)
        if rows == "residuals":
            return sven_ext.Residuals(logits[:, -1, :3])
        return logits.square().mean(dim=(1, 2))

    gram = sven_ext.gram_matrix(model, closure)
    output = closure()
    residual = output.values.reshape(-1) if rows == "residuals" else output
    params = list(model.parameters())
    jac = torch.cat([
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(r, params, retain_graph=True, allow_unused=True,
                                                            materialize_grads=True)])[None]
        for r in residual
    ])
    expected = jac @ jac.T
    assert gram.shape == (residual.numel(), residual.numel())
    assert float((gram - expected).norm() / expected.norm()) < 1e-12


@pytest.mark.parametrize("route,steps,seq_gram_cost", [("gemm", 1, 1.0), ("seq_gram", 3, 0.0), ("rows", 3, 1e9)])
def test_float32_factors_with_a_small_rtol_give_the_dense_step(monkeypatch, route, steps, seq_gram_cost):
    """Inputs spanning 1e5: K's eigenvalues span ~1e10, below float32 products' rounding."""
    monkeypatch.setattr(routes_module, "SEQ_GRAM_COST_FACTOR", seq_gram_cost)
    torch.manual_seed(0)
    model = nn.Linear(16, 1)
    x = torch.randn(12, steps, 16) * torch.logspace(0, -5, 16)
    y = torch.randn(12, steps, 1)

    def loss(model):
        return (model(x) - y).square().sum((1, 2))

    kwargs = dict(lr=1.0, k=12, rtol=1e-6)
    dense, _ = sven_update(model, loss, backend="dense", **kwargs)
    gram, info = sven_update(model, loss, backend="gram", **kwargs)
    assert info["paths"]["weight"] == route
    assert relative_difference(gram, dense) < 1e-3
    # The case needs the precise products: float32 ones move the step by far more.
    monkeypatch.setattr(gram_module, "FLOAT32_GRAM_RTOL", 0.0)
    rounded, _ = sven_update(model, loss, backend="gram", **kwargs)
    assert relative_difference(rounded, dense) > 0.05
