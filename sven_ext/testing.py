"""Small random models and a backend comparison, shared by the tests and the benchmarks."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .optimizer import Sven

_ACTIVATIONS = {"gelu": nn.GELU, "tanh": nn.Tanh, "relu": nn.ReLU}


def mlp(sizes, activation: str = "gelu", *, bias: bool = True, dtype=torch.float64, seed: int = 0) -> nn.Sequential:
    """``Linear(sizes[0], sizes[1]) - act - ... - Linear(sizes[-2], sizes[-1])``.

    Args:
        sizes: layer widths, input first.
        activation: ``"gelu"``, ``"tanh"`` or ``"relu"``.
        bias: whether the Linear layers have biases.
        dtype: parameter dtype.
        seed: initialisation seed.
    """
    torch.manual_seed(seed)
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(_ACTIVATIONS[activation]())
        layers.append(nn.Linear(fan_in, fan_out, bias=bias))
    return nn.Sequential(*layers).to(dtype)


class SmallCNN(nn.Module):
    """Conv2d (stride, padding, circular padding, dilation, groups) then Conv1d then Linear.

    Input ``(B, 3, 7, 7)``, output ``(B, outputs)``.
    """

    def __init__(self, outputs: int = 3, bias: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=3, bias=bias, padding_mode="circular")
        self.conv3 = nn.Conv1d(6, 4, 3, stride=2, padding="valid", dilation=2, groups=2, bias=bias)
        self.conv4 = nn.Conv1d(4, 4, 2, padding="same", bias=bias)
        self.head = nn.Linear(4 * 6, outputs, bias=bias)

    def forward(self, x):
        h = torch.tanh(self.conv1(x))
        h = torch.tanh(self.conv2(h))
        h = torch.tanh(self.conv3(h.flatten(2)))
        h = torch.tanh(self.conv4(h))
        return self.head(h.flatten(1))


def small_cnn(outputs: int = 3, *, bias: bool = True, dtype=torch.float64, seed: int = 0) -> SmallCNN:
    """A :class:`SmallCNN` with random weights."""
    torch.manual_seed(seed)
    return SmallCNN(outputs, bias).to(dtype)


class Block(nn.Module):
    """Pre-norm transformer block: causal multi-head self-attention from Linear layers, then an MLP."""

    def __init__(self, d: int, heads: int, norm: type = nn.LayerNorm):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = norm(d), norm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


class TinyTransformer(nn.Module):
    """Token and position embeddings, ``layers`` blocks, final norm, output head (tied by default).

    Input ``(B, T)`` int64 tokens, output ``(B, T, vocab)`` logits.

    Args:
        shared_positions: look positions up once, ``pos(arange(T))`` broadcast over the batch
            (the usual form; it has no batch axis), instead of per sample.
    """

    def __init__(self, vocab: int, d: int, heads: int, steps: int, *, tied: bool = True, layers: int = 1,
                 norm: type = nn.LayerNorm, shared_positions: bool = False):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(steps, d)
        self.blocks = nn.ModuleList(Block(d, heads, norm) for _ in range(layers))
        self.norm = norm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.tok.weight
        self.shared_positions = shared_positions

    def forward(self, idx):
        positions = torch.arange(idx.shape[1], device=idx.device)
        if not self.shared_positions:
            positions = positions.expand(idx.shape)
        x = self.tok(idx) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def tiny_transformer(vocab: int = 11, d: int = 8, heads: int = 2, steps: int = 5, *, tied: bool = True,
                     layers: int = 1, norm: type = nn.LayerNorm, shared_positions: bool = False,
                     dtype=torch.float64, seed: int = 0) -> TinyTransformer:
    """A :class:`TinyTransformer` with random weights."""
    torch.manual_seed(seed)
    return TinyTransformer(vocab, d, heads, steps, tied=tied, layers=layers, norm=norm,
                           shared_positions=shared_positions).to(dtype)


class Counter(nn.Module):
    """A layer whose forward moves a buffer in place and reassigns another (like running statistics)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1).double()
        self.register_buffer("calls", torch.zeros(1, dtype=torch.float64))
        self.register_buffer("last", torch.zeros(3, dtype=torch.float64))

    def forward(self, x):
        self.calls += 1
        self.last = x.detach().mean(0)
        return self.lin(x)


def sven_update(model: nn.Module, loss, *, dtype=None, params=None, **sven_kwargs):
    """The parameter change of one Sven step on a copy of ``model``.

    Args:
        model: left untouched.
        loss: ``loss(model)`` returns what a Sven closure returns for that model.
        dtype: cast the copy to this dtype first (``None``: keep).
        params: names of the parameters that move (``None``: every trainable one).
        sven_kwargs: passed to :class:`sven_ext.Sven` (``backend``, ``lr``, ``k``, ...); ``safeguard``
            is ``None`` unless given: the helpers compare the bare step's arithmetic.

    Returns:
        ``(deltas, last_info)``: ``{name: new - old}`` in the copy's dtype, and the step's info.
    """
    model = copy.deepcopy(model)
    if dtype is not None:
        model.to(dtype)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    if params is not None:
        named = dict(model.named_parameters())
        sven_kwargs["params"] = [named[name] for name in params]
    optimizer = Sven(model, **{"safeguard": None, **sven_kwargs})
    optimizer.step(lambda: loss(model))
    return {name: p.detach() - before[name] for name, p in model.named_parameters()}, optimizer.last_info


class UsesSeen:
    """Records the kinds of use (``LinearUse``, ``DirectUse``, ...) every captured parameter of ``model``
    took, by name, from now on: it wraps ``Capture.uses`` through ``monkeypatch`` (pytest's fixture, which
    undoes it)."""

    def __init__(self, monkeypatch, model: nn.Module):
        from . import capture

        self.names = {id(p): n for n, p in model.named_parameters()}
        self.kinds: dict[str, set] = {}
        uses = capture.Capture.uses

        def recording(cap, *args, **kwargs):
            found = uses(cap, *args, **kwargs)
            for use in found:
                for p in use.params:
                    self.kinds.setdefault(self.names[id(p)], set()).add(type(use).__name__)
            return found

        monkeypatch.setattr(capture.Capture, "uses", recording)


def steps_against_dense(model: nn.Module, losses, **sven_kwargs) -> list[float]:
    """One :class:`sven_ext.Sven` (``sven_kwargs``) steps on each of ``losses`` in turn (``loss(model)``
    returns what a closure returns; batches, sequence lengths or hooks may change between them);
    each step is compared with a fresh dense step with the safeguard from the same weights.

    Returns:
        Per step, :func:`relative_difference` of the step's update to the dense one.
    """
    optimizer = Sven(model, **sven_kwargs)
    settings = {k: v for k, v in sven_kwargs.items() if k != "backend"}
    differences = []
    for loss in losses:
        expected = sven_update(model, loss, **{"safeguard": "backtracking", **settings, "backend": "dense"})[0]
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.step(lambda loss=loss: loss(model))
        differences.append(relative_difference({n: p.detach() - before[n] for n, p in model.named_parameters()},
                                               expected))
    return differences


def relative_difference(update: dict, reference: dict) -> float:
    """``||update - reference|| / ||reference||`` over all parameters, in float64."""
    num = sum(float((update[n].double() - r.double()).square().sum()) for n, r in reference.items())
    den = sum(float(r.double().square().sum()) for r in reference.values())
    return (num / den) ** 0.5


def compare_backends(model: nn.Module, loss, backend: str = "gram", reference: str = "dense", *,
                     dtype=None, reference_dtype=torch.float64, **sven_kwargs) -> float:
    """Relative difference between one step of ``backend`` and one of ``reference`` from the same weights.

    ``backend`` runs in ``dtype`` (``None``: the model's); ``reference`` in ``reference_dtype``.
    """
    mine, _ = sven_update(model, loss, dtype=dtype, backend=backend, **sven_kwargs)
    oracle, _ = sven_update(model, loss, dtype=reference_dtype, backend=reference, **sven_kwargs)
    return relative_difference(mine, oracle)


class LargestStorage(TorchDispatchMode):
    """Records the largest storage (in elements) behind any tensor an op returns.

    Used to show a backend never allocates the Jacobian or a whole random matrix.
    """

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out
