"""The factor check (sven_ext.factor_check) and what capture decides per step: when the check
runs again, its scale-aware tolerance, batch axes, and tensors expanded to the batch."""

import copy

import pytest
import torch
from torch import nn

import sven_ext
from sven_ext import factor_check
from sven_ext.testing import mlp, relative_difference

F64 = 1e-9
BACKENDS = ["gram", "sketch", "auto"]
SETTINGS = dict(lr=0.1, k=32, oversampling=32)  # a sketch as wide as the rows: exact


def dense_step(model, loss):
    """The dense (float64 oracle) update from ``model``'s current weights, on a copy."""
    copied = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in copied.named_parameters()}
    sven_ext.Sven(copied, backend="dense", **SETTINGS).step(lambda: loss(copied))
    return {n: p.detach() - before[n] for n, p in copied.named_parameters()}


def step_against_dense(opt, model, loss):
    """Takes one step with ``opt`` and returns its relative difference to a fresh dense step."""
    expected = dense_step(model, loss)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step(lambda: loss(model))
    return relative_difference({n: p.detach() - before[n] for n, p in model.named_parameters()}, expected)


class ProbeCounter:
    """Counts the factor checks (each draws its random row weights once, a retry included)."""

    def __init__(self, monkeypatch):
        self.count = 0
        draw = factor_check.probe_weights

        def counting(*args):
            self.count += 1
            return draw(*args)

        monkeypatch.setattr(factor_check, "probe_weights", counting)


def inputs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, generator=g, dtype=torch.float64)


# ----------------------------------------------------------------------------- when the check runs


def test_the_check_runs_once_per_signature(monkeypatch):
    probes = ProbeCounter(monkeypatch)
    model = mlp((3, 6, 1), seed=1)
    full, last = inputs(8), inputs(3, seed=1)
    opt = sven_ext.Sven(model, backend="gram", **SETTINGS)
    for x in (full, full, last, full, last):  # a DataLoader's smaller last batch, epoch after epoch
        opt.step(lambda: model(x).square().sum(1))
    assert probes.count == 2
    assert opt.last_info["checked"] is False


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_hook_added_later_is_checked_and_exact(backend, monkeypatch):
    probes = ProbeCounter(monkeypatch)
    model = mlp((3, 6, 6, 1), seed=2)
    x = inputs(7)
    opt = sven_ext.Sven(model, backend=backend, **SETTINGS)
    loss = lambda m: m(x).square().sum(1)  # noqa: E731
    assert step_against_dense(opt, model, loss) < F64
    # A hook that rewrites a layer's output and mixes the samples, registered after the first step.
    model[2].register_forward_hook(lambda module, args, out: 2 * out + out.mean(0))
    assert step_against_dense(opt, model, loss) < F64
    # The second step's check fails on the mixing layer; the closure runs again with that layer
    # recorded whole, and that capture is checked too.
    assert probes.count == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_loss_that_starts_mixing_samples_is_checked_and_exact(backend):
    model = mlp((3, 6, 1), seed=3)
    x = inputs(7)
    opt = sven_ext.Sven(model, backend=backend, **SETTINGS)
    assert step_against_dense(opt, model, lambda m: m(x).square().sum(1)) < F64
    assert step_against_dense(opt, model, lambda m: (m(x) - m(x).mean(0)).square().sum(1)) < F64
    assert opt.last_info["recorded_whole"] == ["0", "2"]


def test_rows_that_mix_samples_at_any_scale_are_recorded_whole():
    class Flipped(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            out = self.lin(x)
            return 1e6 * (out + out.flip(0)).sum(1)  # row i depends on sample B - 1 - i too

    model = Flipped().double()
    x = inputs(5)
    opt = sven_ext.Sven(model, backend="gram", **SETTINGS)
    assert step_against_dense(opt, model, lambda m: sven_ext.Residuals(m(x))) < F64
    assert opt.last_info["recorded_whole"] == ["lin"]


def test_a_factorisation_that_misses_a_use_fails_the_check():
    # The weight is also read outside its module's forward: no recording recovers that part of
    # its gradient. Scaled by 1e6, the gradients dwarf the check's bar; the mismatch must show.
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return 1e6 * (self.lin(x) + x @ self.lin.weight.T).sum(1)

    model = Sneaky().double()
    x = inputs(5)
    opt = sven_ext.Sven(model, backend="gram", **SETTINGS)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(factor_check.FactorMismatch, match="lin.weight"):
        opt.step(lambda: sven_ext.Residuals(model(x)))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


# ----------------------------------------------------------------------------- tolerance


def test_an_exactly_zero_gradient_passes_the_check():
    # A bias before a softmax over its own axis: every per-sample gradient is zero up to rounding.
    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.key = nn.Linear(3, 4)
            self.head = nn.Linear(4, 1)

        def forward(self, x):
            return self.head(torch.softmax(self.key(x), dim=-1))

    model = Shifted().double()
    x = inputs(6)
    opt = sven_ext.Sven(model, backend="gram", **SETTINGS)
    assert step_against_dense(opt, model, lambda m: m(x).square().sum(1)) < F64


def test_tolerance_follows_the_lowest_precision():
    assert factor_check.tolerance({torch.float64}) == factor_check.tolerance({torch.float32})
    assert factor_check.tolerance({torch.float64, torch.bfloat16}) == 4 * torch.finfo(torch.bfloat16).eps
    assert factor_check.tolerance({torch.float16}) < factor_check.tolerance({torch.bfloat16})


# ----------------------------------------------------------------------------- batch axes


class SeqFirst(nn.Module):
    """Linear layers and a layer norm on ``(T, B, d)``: the batch is on axis 1."""

    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1)

    def forward(self, x):  # x: (B, T, 3)
        return self.b(self.norm(torch.tanh(self.a(x.transpose(0, 1))))).transpose(0, 1).sum((1, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_first_layers_factor_on_axis_1(backend):
    torch.manual_seed(4)
    model = SeqFirst().double()
    opt = sven_ext.Sven(model, backend=backend, **SETTINGS)
    for batch, steps in ((4, 6), (6, 6), (3, 5)):  # T == B at the second step
        x = torch.randn(batch, steps, 3, dtype=torch.float64)
        assert step_against_dense(opt, model, lambda m: m(x).square()) < F64
    assert opt.last_info["recorded_whole"] == []


# ----------------------------------------------------------------------------- expanded to the batch


class Positions(nn.Module):
    """Token and position tables; ``use`` says how the position vectors enter."""

    def __init__(self, use="add", leading_one=False):
        super().__init__()
        self.tok, self.pos, self.out = nn.Embedding(11, 4), nn.Embedding(9, 4), nn.Linear(4, 1)
        self.use, self.leading_one = use, leading_one

    def forward(self, idx):
        tok = self.tok(idx)  # looked up first, as in GPT-2 and BERT: its shape is the one to expand to
        where = torch.arange(idx.shape[1])
        pos = self.pos(where[None] if self.leading_one else where)
        h = tok + pos if self.use == "add" else tok * pos.sum(-1, keepdim=True)
        return self.out(torch.tanh(h)).squeeze(-1).square().sum(1)


def tokens(batch, steps, seed=0):
    return torch.randint(0, 11, (batch, steps), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("leading_one", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_position_table_is_expanded_after_one_step(backend, leading_one):
    model = Positions(leading_one=leading_one).double()
    opt = sven_ext.Sven(model, backend=backend, **SETTINGS)
    whole = []
    for batch, steps in ((4, 5), (4, 5), (3, 7), (5, 5)):
        idx = tokens(batch, steps, seed=batch + steps)
        assert step_against_dense(opt, model, lambda m: m(idx)) < F64
        whole.append(opt.last_info["recorded_whole"])
    assert whole == [["pos"], [], [], []]


def test_a_table_used_otherwise_is_not_expanded_and_a_changed_use_is_refused():
    model = Positions(use="scale").double()
    opt = sven_ext.Sven(model, backend="gram", **SETTINGS)
    idx = tokens(4, 5)
    for _ in range(2):
        assert step_against_dense(opt, model, lambda m: m(idx)) < F64
        assert opt.last_info["recorded_whole"] == ["pos"]
    # Expanded once it was only added; a later step that uses it otherwise changes nothing and says so.
    model.use = "add"
    opt.step(lambda: model(idx))
    assert opt.last_info["recorded_whole"] == ["pos"]
    opt.step(lambda: model(idx))
    assert opt.last_info["recorded_whole"] == []
    model.use = "scale"
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="can be run again"):
        opt.step(lambda: model(idx))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert step_against_dense(opt, model, lambda m: m(idx)) < F64


class Direct(nn.Module):
    """Parameters used directly in expressions: a leading-1 token, a per-feature scale, a matrix."""

    def __init__(self, matrix=False):
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.token = nn.Parameter(torch.randn(1, 1, 4))
        self.scale = nn.Parameter(torch.rand(4) + 0.5)
        self.mix = nn.Parameter(torch.randn(4, 4)) if matrix else None

    def forward(self, x):  # x: (B, T, 3)
        h = torch.cat([self.token.expand(x.shape[0], -1, -1), self.proj(x)], dim=1) * self.scale
        if self.mix is not None:
            h = h @ self.mix
        return torch.tanh(h).sum((1, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameters_used_in_expressions_are_expanded_after_one_step(backend, monkeypatch):
    model = Direct().double()
    opt = sven_ext.Sven(model, backend=backend, **SETTINGS)
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    assert step_against_dense(opt, model, lambda m: m(x).square()) < F64
    assert opt._checks.broadcasts.params == {id(model.token): 3, id(model.scale): 3}
    calls = []
    monkeypatch.setattr(torch, "vmap", lambda *args, **kwargs: calls.append(args) or pytest.fail("vmap"))
    assert step_against_dense(opt, model, lambda m: m(x).square()) < F64
    assert calls == []


def test_a_parameter_in_a_matrix_product_stays_with_the_fallback():
    model = Direct(matrix=True).double()
    opt = sven_ext.Sven(model, backend="gram", **SETTINGS)
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    for _ in range(2):
        assert step_against_dense(opt, model, lambda m: m(x).square()) < F64
    assert id(model.mix) not in opt._checks.broadcasts.params


# ----------------------------------------------------------------------------- clear errors


@pytest.mark.parametrize("backend", ["dense", *BACKENDS])
def test_a_compiled_model_is_refused_before_the_forward(backend):
    model = mlp((3, 4, 1))
    compiled = torch.compile(model, backend="eager")
    calls = []
    opt = sven_ext.Sven(compiled, backend=backend)
    with pytest.raises(ValueError, match="_orig_mod"):
        opt.step(lambda: calls.append(1) or compiled(inputs(4)).square().sum(1))
    assert calls == []


@pytest.mark.parametrize("backend", ["dense", *BACKENDS])
def test_a_module_run_only_without_gradients_is_refused(backend):
    model = mlp((3, 4, 4, 1))
    x = inputs(5)

    def closure():
        with torch.no_grad():
            h = model[0](x)
        return model[2](torch.tanh(h)).square().sum(1)

    opt = sven_ext.Sven(model, backend=backend)
    with pytest.raises(ValueError, match=r"module\(s\) \['0'\].*gradients disabled"):
        opt.step(closure)
