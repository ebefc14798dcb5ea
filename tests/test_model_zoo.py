"""Third-party models (transformers, torchvision, timm, torch.nn), every backend against dense.

Tiny configurations with random weights (nothing is downloaded), float64, a few samples: each step of
``gram``, ``sketch`` (sketch size above the row count, so exact) and ``auto`` must equal the dense
float64 step, or stop with a clear error before any parameter moves.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sven_ext
from sven_ext import capture as capture_module
from sven_ext.testing import relative_difference, sven_update, tiny_transformer

transformers = pytest.importorskip("transformers")
torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

# Float64 steps through different factorisations: the rounding of a few hundred products, amplified by
# the kept spectrum's condition number (rtol 1e-3 caps it at 1e3).
EXACT = 1e-9
SETTINGS = dict(lr=0.1, k=8, rtol=1e-3, kappa=2.0, oversampling=10)  # k above every step's rows
BACKENDS = ["gram", "sketch", "auto"]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tokens(batch: int, steps: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(vocab, (batch, steps), generator=_generator(seed))


def _images(batch: int, channels: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=_generator(seed), dtype=torch.float64)


def lm_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean token cross-entropy: ``(B, T, V)``, ``(B, T)`` -> ``(B,)``."""
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)


def class_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


# ----------------------------------------------------------------------------- models


def gpt2(batch=4, steps=6):
    """HF GPT-2: ``Conv1D`` layers, learned positions ``wpe(position_ids)``, output head tied to ``wte``."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=13, n_positions=8, n_embd=8, n_layer=1, n_head=2, n_inner=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config._attn_implementation = "eager"
    model = transformers.GPT2LMHeadModel(config).double().eval()
    ids, targets = _tokens(batch, steps, 13, 1), _tokens(batch, steps, 13, 2)
    return model, lambda m: lm_losses(m(ids).logits, targets)


def llama(batch=4, steps=6):
    """HF ``LlamaForCausalLM``: rotary positions, ``LlamaRMSNorm``, grouped-query attention, SwiGLU MLP."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=13, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(config).double().eval()
    ids, targets = _tokens(batch, steps, 13, 1), _tokens(batch, steps, 13, 2)
    return model, lambda m: lm_losses(m(ids).logits, targets)


def bert(batch=4, steps=6):
    """HF ``BertForSequenceClassification``: word, position and token-type embeddings, a pooler."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=13, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config._attn_implementation = "eager"
    model = transformers.BertForSequenceClassification(config).double().eval()
    ids, labels = _tokens(batch, steps, 13, 1), torch.randint(3, (batch,), generator=_generator(2))
    return model, lambda m: class_losses(m(ids).logits, labels)


class TinyResNet(nn.Module):
    """torchvision's ``BasicBlock`` (BatchNorm in eval mode), with and without a strided downsample."""

    def __init__(self):
        super().__init__()
        resnet = torchvision.models.resnet
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        downsample = nn.Sequential(resnet.conv1x1(8, 16, stride=2), nn.BatchNorm2d(16))
        self.blocks = nn.Sequential(resnet.BasicBlock(8, 8), resnet.BasicBlock(8, 16, stride=2, downsample=downsample))
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def resnet(batch=4):
    torch.manual_seed(0)
    model = TinyResNet().double()
    for module in model.modules():  # running statistics away from the initial 0 and 1
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    model.eval()
    x, labels = _images(batch, 3, 8, 1), torch.randint(3, (batch,), generator=_generator(2))
    return model, lambda m: class_losses(m(x), labels)


def mobilenet(batch=4):
    """torchvision MobileNetV3-small (squeeze-excitation, hardswish, BatchNorm in eval mode)."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=3, width_mult=0.25).double().eval()
    x, labels = _images(batch, 3, 16, 1), torch.randint(3, (batch,), generator=_generator(2))
    return model, lambda m: class_losses(m(x), labels)


def convnext(batch=4):
    """torchvision ConvNeXt: its own ``LayerNorm2d`` (a LayerNorm subclass over channels) and ``layer_scale``."""
    torch.manual_seed(0)
    cnn = torchvision.models.convnext
    model = cnn.ConvNeXt([cnn.CNBlockConfig(8, 16, 1), cnn.CNBlockConfig(16, None, 1)], layer_scale=0.5,
                         num_classes=3).double().eval()
    x, labels = _images(batch, 3, 16, 1), torch.randint(3, (batch,), generator=_generator(2))
    return model, lambda m: class_losses(m(x), labels)


def vit(batch=4):
    """timm ``VisionTransformer``: ``cls_token`` and ``pos_embed`` parameters used directly."""
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=8, patch_size=4, in_chans=3, num_classes=3, embed_dim=8, depth=1, num_heads=2, mlp_ratio=2.0)
    model = model.double().eval()
    x, labels = _images(batch, 3, 8, 1), torch.randint(3, (batch,), generator=_generator(2))
    return model, lambda m: class_losses(m(x), labels)


class RecurrentClassifier(nn.Module):
    """``nn.LSTM`` or ``nn.GRU`` (batch first) over a sequence, a Linear head on the last state."""

    def __init__(self, cell: type):
        super().__init__()
        self.rnn = cell(3, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def recurrent(cell: type, dtype=torch.float64, batch=4, steps=5):
    torch.manual_seed(0)
    model = RecurrentClassifier(cell).to(dtype)
    x = torch.randn(batch, steps, 3, generator=_generator(1), dtype=dtype)
    labels = torch.randint(3, (batch,), generator=_generator(2))
    # The float64 oracle of a float32 model reads the same inputs, exactly widened.
    return model, lambda m: class_losses(m(x.to(m.head.weight.dtype)), labels)


class EncoderClassifier(nn.Module):
    """``nn.TransformerEncoder`` (one layer) in either layout, mean-pooled, a Linear head."""

    def __init__(self, batch_first: bool):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0,
                                           batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)
        self.batch_first = batch_first

    def forward(self, x):  # x: (B, T, 8) whatever the layout
        h = self.encoder(x if self.batch_first else x.transpose(0, 1))
        return self.head(h.mean(1 if self.batch_first else 0))


def encoder_data(batch: int, steps: int, seed: int = 1):
    x = torch.randn(batch, steps, 8, generator=_generator(seed), dtype=torch.float64)
    return x, torch.randint(3, (batch,), generator=_generator(seed + 1))


def encoder(batch_first: bool, batch=4, steps=5):
    torch.manual_seed(0)
    model = EncoderClassifier(batch_first).double()
    x, labels = encoder_data(batch, steps)
    return model, lambda m: class_losses(m(x), labels)


ZOO = {
    "gpt2": gpt2,
    "llama": llama,
    "bert": bert,
    "resnet": resnet,
    "mobilenet_v3": mobilenet,
    "convnext": convnext,
    "vit": vit,
    "lstm": lambda **kw: recurrent(nn.LSTM, **kw),
    "gru": lambda **kw: recurrent(nn.GRU, **kw),
    "encoder_batch_first": lambda **kw: encoder(True, **kw),
    "encoder_seq_first": lambda **kw: encoder(False, **kw),
}


class BackwardPasses:
    """Counts the backward passes autograd runs while active.

    ``vectors``: passes through the closure's graph (a batched call counts each of its vectors): a
    constant number per step when the factors come from one backward pass, ``+R`` when a module is
    recorded whole (one pass per row). ``per_row``: differentiations of a module on its own under
    ``torch.vmap`` over the rows (the fallback for layers without factors).
    """

    def __init__(self, monkeypatch):
        self.vectors = 0
        self.per_row = 0
        self._grad = torch.autograd.grad
        monkeypatch.setattr(torch.autograd, "grad", self._counting)

    def _counting(self, outputs, inputs, grad_outputs=None, **kwargs):
        first = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
        transforms = [t.key() for t in torch._C._functorch.get_interpreter_stack() or []]
        if torch._C._functorch.TransformType.Vmap in transforms:
            self.per_row += 1
        elif not transforms and not torch._C._functorch.is_functorch_wrapped_tensor(first):
            # (a torch.func.vjp of one module on its own is no pass through the graph)
            if kwargs.get("is_grads_batched"):
                batched = grad_outputs[0] if isinstance(grad_outputs, (list, tuple)) else grad_outputs
                self.vectors += batched.shape[0]
            else:
                self.vectors += 1
        return self._grad(outputs, inputs, grad_outputs, **kwargs)


# ----------------------------------------------------------------------------- one step per model


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ZOO)
def test_step_equals_dense(name, backend):
    model, loss = ZOO[name]()
    expected, _ = sven_update(model, loss, backend="dense", **SETTINGS)
    update, info = sven_update(model, loss, backend=backend, **SETTINGS)
    assert relative_difference(update, expected) <= EXACT
    if backend == "auto":
        assert info["backend"] in ("gram", "sketch")


# Layers whose rule runs the recorded call once more (one backward pass of its own per call, whatever the batch).
RERUN_LAYERS = (nn.MultiheadAttention, nn.RNNBase)


@pytest.mark.parametrize("name", ZOO)
def test_no_backward_pass_per_row(name, monkeypatch):
    """The gram step's factors come from a fixed number of backward passes, whatever the batch, and
    no parameter takes the per-sample fallback (``ModuleUse``: its module differentiated per row)."""
    model, loss = ZOO[name]()
    _, larger = ZOO[name](batch=8)
    kinds = set()
    uses = capture_module.Capture.uses

    def recording(cap, *args, **kwargs):
        found = uses(cap, *args, **kwargs)
        kinds.update(type(use).__name__ for use in found)
        return found

    monkeypatch.setattr(capture_module.Capture, "uses", recording)
    opt = sven_ext.Sven(model, backend="gram", **SETTINGS)
    # The first step learns which position tables and directly used parameters may be expanded to the
    # batch; until then they are differentiated on their own (ViT's cls_token, ConvNeXt's layer_scale).
    opt.step(lambda: loss(model))
    kinds.clear()
    passes = BackwardPasses(monkeypatch)
    counted = []
    for closure in (loss, larger):
        opt.step(lambda: closure(model))  # the check runs (a new batch, or tables expanded since the last step)
        before = passes.vectors
        opt.step(lambda: closure(model))
        counted.append(passes.vectors - before - bool(opt.last_info["checked"]))  # a re-check: one more
        assert opt.last_info["recorded_whole"] == []
        assert "unused" not in opt.last_info["paths"].values()
    reruns = sum(isinstance(m, RERUN_LAYERS) for m in model.modules())
    # Besides a check: the per-sample pass (R = 4 or 8 more if a module were recorded whole) and one per rerun layer.
    assert counted[0] == counted[1] <= 1 + reruns
    assert passes.per_row == 0
    assert "ModuleUse" not in kinds, kinds


def test_float32_gru_is_exact_to_float32():
    model, loss = recurrent(nn.GRU, torch.float32)
    for backend in BACKENDS:
        update, _ = sven_update(model, loss, backend=backend, **SETTINGS)
        expected, _ = sven_update(model, loss, backend="dense", dtype=torch.float64, **SETTINGS)
        assert relative_difference(update, expected) < 1e-4, backend  # float32 rounding, as tests/test_gram_backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_lstm_is_exact_to_float32(backend):
    model, loss = recurrent(nn.LSTM, torch.float32)
    update, _ = sven_update(model, loss, backend=backend, **SETTINGS)
    expected, _ = sven_update(model, loss, backend="dense", dtype=torch.float64, **SETTINGS)
    assert relative_difference(update, expected) < 1e-4


# ----------------------------------------------------------------------------- several steps


def run_steps(model, losses, backend):
    """Steps ``losses[i](model)`` one after the other on one optimizer.

    Each step must equal a fresh dense step from the same parameters, or raise before any parameter
    moves (then the run stops). Returns the step's outcomes: relative differences, or the error.
    """
    opt = sven_ext.Sven(model, backend=backend, **SETTINGS)
    outcomes = []
    for loss in losses:
        expected, _ = sven_update(model, loss, backend="dense", **SETTINGS)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        try:
            opt.step(lambda: loss(model))
        except (RuntimeError, ValueError) as error:
            assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
            outcomes.append(error)
            break
        update = {n: p.detach() - before[n] for n, p in model.named_parameters()}
        outcomes.append(relative_difference(update, expected))
    return outcomes


def assert_exact_or_error(outcomes):
    for step, outcome in enumerate(outcomes):
        assert isinstance(outcome, Exception) or outcome <= EXACT, (step, outcomes)


def _encoder_steps(batch_first):
    model = EncoderClassifier(batch_first).double()
    losses = []
    # A smaller batch, then longer sequences; at step 2 the sequence axis has the batch's size.
    for batch, steps, seed in ((6, 5, 1), (4, 4, 3), (4, 7, 5)):
        x, labels = encoder_data(batch, steps, seed)
        losses.append(lambda m, x=x, labels=labels: class_losses(m(x), labels))
    return model, losses


def _gpt2_steps():
    model, first = gpt2(batch=6, steps=6)
    return model, [first, gpt2(batch=4, steps=6)[1], gpt2(batch=4, steps=8)[1]]


def _positions_steps():
    """``pos(arange(T))``, broadcast over the batch, with T changing between steps."""
    torch.manual_seed(0)
    model = tiny_transformer(vocab=11, d=8, steps=8, shared_positions=True)
    losses = []
    for batch, steps, seed in ((4, 5, 1), (4, 4, 3), (5, 7, 5)):  # at step 2, T == B
        ids, targets = _tokens(batch, steps, 11, seed), _tokens(batch, steps, 11, seed + 1)
        losses.append(lambda m, ids=ids, targets=targets: lm_losses(m(ids), targets))
    return model, losses


class BatchMixer(nn.Module):
    """A Linear layer whose output is shifted by its batch mean: it couples the samples."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.inner(x)
        return self.head(torch.tanh(h + h.mean(0, keepdim=True)))


def _mixer_steps():
    torch.manual_seed(0)
    model = BatchMixer().double()
    losses = []
    for batch, seed in ((1, 1), (6, 3)):  # one sample cannot show the coupling
        x = torch.randn(batch, 3, generator=_generator(seed), dtype=torch.float64)
        losses.append(lambda m, x=x: m(x).square().sum(1))
    return model, losses


SCHEDULES = {
    "encoder_batch_first_B_T": lambda: _encoder_steps(True),
    "encoder_seq_first_B_T": lambda: _encoder_steps(False),
    "gpt2_B_T": _gpt2_steps,
    "positions_T": _positions_steps,
    "mixer_B1_then_B6": _mixer_steps,
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("schedule", SCHEDULES.values(), ids=list(SCHEDULES))
def test_changing_batches_are_exact_or_refused(schedule, backend):
    model, losses = schedule()
    assert_exact_or_error(run_steps(model, losses, backend))


def _hook_added_after_step_one(backend):
    model, loss = encoder(True)
    opt = sven_ext.Sven(model, backend=backend, **SETTINGS)
    opt.step(lambda: loss(model))
    model.encoder.layers[0].linear1.register_forward_hook(lambda module, args, out: 2.0 * out.tanh())
    return run_steps_on(opt, model, [loss])


def run_steps_on(opt, model, losses):
    """:func:`run_steps` on an optimizer that has already stepped."""
    outcomes = []
    for loss in losses:
        expected, _ = sven_update(model, loss, backend="dense", **SETTINGS)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        try:
            opt.step(lambda: loss(model))
        except (RuntimeError, ValueError) as error:
            assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
            return outcomes + [error]
        outcomes.append(relative_difference({n: p.detach() - before[n] for n, p in model.named_parameters()},
                                            expected))
    return outcomes


@pytest.mark.parametrize("backend", BACKENDS)
def test_hook_added_after_the_first_step(backend):
    assert_exact_or_error(_hook_added_after_step_one(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_mixing_samples_after_the_first_step(backend):
    model, loss = encoder(True)
    opt = sven_ext.Sven(model, backend=backend, **SETTINGS)
    opt.step(lambda: loss(model))

    def mixed(m):
        losses = loss(m)
        return (losses - 0.5 * losses.mean()).square()

    assert_exact_or_error(run_steps_on(opt, model, [mixed]))


# ----------------------------------------------------------------------------- clear errors


@pytest.mark.parametrize("backend", ["gram", "sketch"])
def test_batch_statistics_are_refused(backend):
    model, loss = resnet()
    model.train()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="batch statistics.*model.eval()"):
        opt = sven_ext.Sven(model, backend=backend, **SETTINGS)
        opt.step(lambda: loss(model))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_batch_statistics_make_auto_dense():
    model, loss = resnet()
    model.train()
    update, info = sven_update(model, loss, backend="auto", **SETTINGS)
    expected, _ = sven_update(model, loss, backend="dense", **SETTINGS)
    assert info["backend"] == "dense"
    assert relative_difference(update, expected) <= EXACT


def _mlp_case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x = torch.randn(5, 3, generator=_generator(1), dtype=torch.float64)
    return model, x


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_model_is_exact_or_refused_up_front(backend):
    model, x = _mlp_case()
    compiled = torch.compile(model, backend="eager")
    compiled(x)  # a forward pass before the first step, as an evaluation in a training loop would be
    expected, _ = sven_update(model, lambda m: m(x).square().sum(1), backend="dense", **SETTINGS)
    before = [p.detach().clone() for p in model.parameters()]
    opt = sven_ext.Sven(compiled, backend=backend, **SETTINGS)
    try:
        opt.step(lambda: compiled(x).square().sum(1))
    except (RuntimeError, ValueError) as error:
        assert "compile" in str(error)
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        return
    update = {n: p.detach() - b for (n, p), b in zip(model.named_parameters(), before)}
    assert relative_difference(update, expected) <= EXACT


class Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(3, 8), nn.Tanh())
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=True))


@pytest.mark.parametrize("backend", ["dense", *BACKENDS])
@pytest.mark.parametrize("inputs_require_grad", [False, True])
def test_reentrant_checkpointing_is_refused_by_name(backend, inputs_require_grad):
    # Without inputs that require grad the checkpointed layers run under no_grad (no graph to them);
    # with them, the graph holds a reentrant checkpoint node, which torch.autograd.grad cannot use.
    torch.manual_seed(0)
    model = Checkpointed().double()
    x = torch.randn(5, 3, generator=_generator(1), dtype=torch.float64).requires_grad_(inputs_require_grad)
    before = [p.detach().clone() for p in model.parameters()]
    opt = sven_ext.Sven(model, backend=backend, **SETTINGS)
    with pytest.raises((RuntimeError, ValueError), match="use_reentrant=False"):
        opt.step(lambda: model(x).square().sum(1))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


# Autocast's bfloat16 has 8 significant bits (2^-8 = 3.9e-3): a few of its roundings.
BF16 = 4 * 2.0 ** -8


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_bfloat16_matches_dense_to_its_precision(backend):
    model, x = _mlp_case()
    model.float()
    x = x.float()

    def loss(m):
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            return m(x).float().square().sum(1)

    expected, _ = sven_update(model, loss, backend="dense", **SETTINGS)
    update, _ = sven_update(model, loss, backend=backend, **SETTINGS)
    assert relative_difference(update, expected) <= BF16


# ----------------------------------------------------------------------------- grouped convolutions


GROUPED = {
    "plain": (2, dict(kernel_size=3, padding=1)),
    "strided_multiplier_1d": (1, dict(kernel_size=3, stride=2, padding=1, multiplier=2)),
    "strided_multiplier_3d": (3, dict(kernel_size=3, stride=2, padding=1, multiplier=2)),
    "dilated": (2, dict(kernel_size=2, stride=2, dilation=2)),
    "reflect": (2, dict(kernel_size=3, stride=3, padding=2, padding_mode="reflect")),
    "same_circular": (2, dict(kernel_size=5, dilation=2, padding="same", padding_mode="circular")),
    "two_inputs_per_group": (2, dict(kernel_size=3, padding=1, inputs_per_group=2)),
    "one_location": (2, dict(kernel_size=5, padding=2, size=1)),
}


@pytest.mark.parametrize("case", GROUPED)
@pytest.mark.parametrize("rows", [1, 2])
def test_grouped_convolutions_equal_dense(case, rows):
    """Depthwise (by one convolution) and other grouped layers (from patches) as per-row gradients."""
    torch.manual_seed(0)
    nd, layout = GROUPED[case]
    layout = dict(layout)
    multiplier, per_group = layout.pop("multiplier", 1), layout.pop("inputs_per_group", 1)
    size = layout.pop("size", 7)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
    channels = 4
    model = nn.Sequential(conv(2, channels, 1), conv(channels, channels // per_group * multiplier,
                                                     groups=channels // per_group, **layout),
                          nn.Flatten(), nn.LazyLinear(1)).double()
    x = torch.randn(3, 2, *(size,) * nd, generator=_generator(1), dtype=torch.float64)
    model(x)  # sizes the head
    locations = model[1](model[0](x)).shape[2:].numel()

    def loss(m):
        return sven_ext.Residuals(m(x).repeat(1, rows) * torch.arange(1, rows + 1))

    expected, _ = sven_update(model, loss, backend="dense", **SETTINGS)
    update, info = sven_update(model, loss, backend="gram", **SETTINGS)
    assert relative_difference(update, expected) <= EXACT
    if rows * multiplier <= locations:  # per-row gradients no larger than the patches
        assert info["paths"]["1.weight"] == info["paths"]["1.bias"] == "direct"
