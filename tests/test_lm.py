"""Decoder-only language models with a tied embedding/head (the models of bench/lm_bench.py, tiny):
the gram step against the dense float64 oracle on every route, no per-row gradient of the
vocabulary-sized table beyond a byte budget, the factor check in blocks, and an update that
releases each direction once its new value is formed."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F

import sven_ext
from sven_ext import factor_check
from sven_ext import routes as routes_module
from sven_ext.backends import factored
from sven_ext.backends.gram import GramBackend
from sven_ext.testing import (
    LargestStorage,
    compare_backends,
    sven_update,
    tiny_transformer,
)

F64 = 1e-9  # float64 gram vs float64 dense
VOCAB, BATCH, STEPS = 37, 4, 6


def _tokens(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (BATCH, STEPS + 1), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def _gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=STEPS, n_embd=8, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config._attn_implementation = "eager"
    model = transformers.GPT2LMHeadModel(config).double().eval()
    return model, lambda m, idx: m(input_ids=idx).logits


def _tiny():
    return tiny_transformer(VOCAB, 8, 2, STEPS, layers=2), lambda m, idx: m(idx)


def _lm_loss(logits_of, idx, targets):
    """Per-sequence mean next-token cross-entropy."""
    return lambda m: F.cross_entropy(logits_of(m, idx).transpose(1, 2), targets, reduction="none").mean(1)


@pytest.mark.parametrize("route", ["seq_gram", "rows"])
@pytest.mark.parametrize("build", [_tiny, _gpt2], ids=["tiny_transformer", "gpt2"])
def test_lm_step_matches_dense(monkeypatch, build, route):
    # Force the sequence layers' and the tied table's route, to check both against the oracle.
    monkeypatch.setattr(routes_module, "SEQ_GRAM_COST_FACTOR", 0.0 if route == "seq_gram" else float("inf"))
    model, logits_of = build()
    loss = _lm_loss(logits_of, *_tokens(1))
    assert compare_backends(model, loss, lr=0.1, k=3) < F64
    _, info = sven_update(model, loss, backend="gram", lr=0.1, k=3)
    table = "tok.weight" if "tok.weight" in info["paths"] else "transformer.wte.weight"
    assert info["paths"][table] == ("seq_gram + embedding_gram" if route == "seq_gram" else "rows")


def test_tied_table_rows_stay_within_the_budget(monkeypatch):
    # The per-row gradients of the tied table (R x V x d) are formed in blocks of table rows.
    monkeypatch.setattr(routes_module, "SEQ_GRAM_COST_FACTOR", float("inf"))
    model, logits_of = _tiny()
    loss = _lm_loss(logits_of, *_tokens(2))
    expected, _ = sven_update(model, loss, backend="dense", lr=0.1, k=3)
    per_row_table = BATCH * VOCAB * 8
    monkeypatch.setattr(GramBackend, "row_budget_bytes", per_row_table * 8 // 4)
    with LargestStorage() as mode:
        update, info = sven_update(model, loss, backend="gram", lr=0.1, k=3)
    assert info["paths"]["tok.weight"] == "rows"
    assert mode.largest < per_row_table
    num = sum(float((update[n] - e).square().sum()) for n, e in expected.items())
    assert (num / sum(float(e.square().sum()) for e in expected.values())) ** 0.5 < F64


@pytest.mark.parametrize("budget", [1 << 27, 256], ids=["one-block", "many-blocks"])
def test_the_factor_check_in_blocks_passes_exact_factors_and_catches_a_wrong_one(monkeypatch, budget):
    monkeypatch.setattr(GramBackend, "row_budget_bytes", budget)
    model, logits_of = _tiny()
    loss = _lm_loss(logits_of, *_tokens(3))
    opt = sven_ext.Sven(model, lr=0.1, k=3, backend="gram")
    opt.step(lambda: loss(model))
    assert opt.last_info["checked"]

    class Sneaky(torch.nn.Module):
        """Reads the head's weight outside the head as well: its factors miss that use."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, idx):
            return self.inner(idx) + 1e-3 * self.inner.tok(idx) @ self.inner.head.weight.T

    sneaky = Sneaky(tiny_transformer(VOCAB, 8, 2, STEPS, layers=2))
    before = [p.detach().clone() for p in sneaky.parameters()]
    opt = sven_ext.Sven(sneaky, lr=0.1, k=3, backend="gram")
    sneaky_loss = _lm_loss(lambda m, idx: m(idx), *_tokens(3))
    with pytest.raises(factor_check.FactorMismatch, match="tok.weight"):
        opt.step(lambda: sneaky_loss(sneaky))
    assert all(torch.equal(p, b) for p, b in zip(sneaky.parameters(), before))


def test_the_update_releases_the_factors_as_the_directions_form(monkeypatch):
    """The bare step never holds every direction: each component's factors are gone before the next
    component's directions are formed, and no list of directions is kept."""
    model, logits_of = _tiny()
    loss = _lm_loss(logits_of, *_tokens(4))
    opt = sven_ext.Sven(model, lr=0.1, k=3, backend="gram", safeguard=None)  # the safeguard's trials keep them
    seen, formed_before = [], []
    real, real_component = GramBackend.compute, factored._component_directions

    def compute(self, closure, settings):
        seen.append(real(self, closure, settings))
        return seen[-1]

    def component(uses, c):
        formed_before.append(sum(ref() is not None for ref in refs))
        refs.extend(weakref.ref(use) for use in uses)
        return real_component(uses, c)

    refs = []
    monkeypatch.setattr(GramBackend, "compute", compute)
    monkeypatch.setattr(factored, "_component_directions", component)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step(lambda: loss(model))
    (result,) = seen
    assert len(formed_before) > 3 and formed_before == [0] * len(formed_before)
    assert result.formed is None and result.contract.spent
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
