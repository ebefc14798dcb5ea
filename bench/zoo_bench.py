"""Third-party models at moderate size: the Sven step against Adam's, and the route of every parameter.

For each model (random weights from configs; transformers, torchvision and timm must be installed,
as ``.ci/setup.sh`` does), float32, batch ``B``: Sven ``gram``, ``sketch`` and ``auto`` steps and Adam
steps take turns, one call each per round, each method right after each other one equally often
(median of the rounds), after two warm-up steps each (Sven's first step checks its factors and
learns which tensors may be expanded to the batch, the second checks them expanded). Reported per
model: the step times, the ratios to Adam (of wall time, and of the process's CPU time), what
``auto`` chose and why and whether the backend it chose is within 20% of the faster of gram and
sketch, which modules were recorded whole (one backward pass per row), which parameters took the
per-sample fallback (their module differentiated on its own per row), how many parameters took each
route of the gram backend, and the extra peak memory of Sven ``gram``'s steps and of Adam's.

    python bench/zoo_bench.py                          # every model, B = 16
    python bench/zoo_bench.py --models gpt2 vit_tiny --batch 64 --repeats 5
    python bench/zoo_bench.py --runs 3 --threads 1     # three passes over the models: medians and ranges
    python bench/zoo_bench.py --models lstm gru --without-kept-rows  # and gram keeping no per-row gradients

On a shared machine the load moves ratios by tens of percent between runs; ``--runs`` repeats the
whole pass and reports, per model, the median ratio over the runs and its range. A loaded machine
preempts long steps more often than short ones, which inflates the wall-time ratios; with
``--threads 1`` the CPU-time ratios count only the work each step did (the load still slows it
through shared caches, far less).

Extra peak memory: per model and optimizer, a fresh interpreter builds the model and its batch,
runs one plain forward and backward pass (after one step of the optimizer on a tiny model: the
modules the first step imports and the code pages of the libraries' kernels count as resident
memory, so they are in first), reads its resident memory (the bare model), takes
``--memory-steps`` steps and reads its peak resident memory (``VmHWM``); the extra peak is the
difference. It runs under the allocator
settings of exact accounting (``sven_ext.harness.environment.MALLOC_ENV``: freed memory goes back
to the system at once), so the peak is that of live tensors and the BLAS library's buffers, not of
memory the allocator kept. Adam's includes its state and the gradients; Sven's the factors, their
check on the first step and the solve. ``--memory-steps 0`` skips it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import sven_ext  # noqa: E402
from sven_ext import capture  # noqa: E402
from sven_ext.backends import gram as gram_backend  # noqa: E402
from sven_ext.harness.environment import MALLOC_ENV  # noqa: E402
from sven_ext.layers import ModuleUse  # noqa: E402


def _tokens(vocab, batch, steps, generator):
    return torch.randint(0, vocab, (batch, steps), generator=generator)


def _lm_loss(logits, idx):
    return F.cross_entropy(logits.transpose(1, 2), idx, reduction="none").mean(1)


def gpt2(layers=2, d=128, steps=32, vocab=1000, frozen_positions=False, checkpointing=False):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab, n_embd=d, n_layer=layers, n_head=max(1, d // 64), n_positions=steps,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    if frozen_positions:
        model.transformer.wpe.weight.requires_grad_(False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    return model, lambda batch, g: (_tokens(vocab, batch, steps, g),), lambda m, idx: _lm_loss(m(input_ids=idx).logits,
                                                                                              idx)


def llama(layers=2, d=128, steps=32, vocab=1000):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers,
                         num_attention_heads=max(1, d // 64), num_key_value_heads=max(1, d // 64),
                         max_position_embeddings=steps)
    return LlamaForCausalLM(config), lambda batch, g: (_tokens(vocab, batch, steps, g),), \
        lambda m, idx: _lm_loss(m(input_ids=idx).logits, idx)


def bert(layers=2, d=128, steps=32, vocab=1000):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=max(1, d // 64),
                        intermediate_size=4 * d, max_position_embeddings=steps, num_labels=4,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config).eval()

    def batch_of(batch, g):
        return _tokens(vocab, batch, steps, g), torch.randint(0, 4, (batch,), generator=g)

    return model, batch_of, lambda m, idx, y: F.cross_entropy(m(input_ids=idx).logits, y, reduction="none")


def _images(classes, size=32):
    def batch_of(batch, g):
        return torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g)

    return batch_of, lambda m, x, y: F.cross_entropy(m(x), y, reduction="none")


def resnet18():
    from torchvision.models import resnet18 as build

    return (build(num_classes=10).eval(), *_images(10))


def mobilenet():
    from torchvision.models import mobilenet_v3_small

    return (mobilenet_v3_small(num_classes=10).eval(), *_images(10))


def convnext_blocks(channels=32, blocks=2):
    from torchvision.models.convnext import CNBlock, LayerNorm2d

    model = nn.Sequential(nn.Conv2d(3, channels, 4, 4), LayerNorm2d(channels),
                          *[CNBlock(channels, 1e-6, 0.0) for _ in range(blocks)],
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))
    return (model, *_images(10))


def vit_tiny():
    import timm

    return (timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10), *_images(10))


class Recurrent(nn.Module):
    def __init__(self, cell, hidden=128, features=16):
        super().__init__()
        self.rnn = cell(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 4)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def recurrent(cell, steps=32):
    def batch_of(batch, g):
        return torch.randn(batch, steps, 16, generator=g), torch.randint(0, 4, (batch,), generator=g)

    return Recurrent(cell), batch_of, lambda m, x, y: F.cross_entropy(m(x), y, reduction="none")


class Encoder(nn.Module):
    def __init__(self, d=128, steps=32, vocab=1000):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(steps, d)
        layer = nn.TransformerEncoderLayer(d, max(1, d // 64), 4 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 4)

    def forward(self, idx):
        h = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        return self.head(self.encoder(h).mean(1))


def encoder(steps=32, vocab=1000):
    def batch_of(batch, g):
        return _tokens(vocab, batch, steps, g), torch.randint(0, 4, (batch,), generator=g)

    return Encoder(steps=steps, vocab=vocab), batch_of, lambda m, idx, y: F.cross_entropy(m(idx), y, reduction="none")


MODELS = {
    "resnet18": resnet18,
    "llama": llama,
    "mobilenet": mobilenet,
    "gpt2_frozen_wpe": lambda: gpt2(frozen_positions=True),
    "vit_tiny": vit_tiny,
    "convnext_blocks": convnext_blocks,
    "bert": bert,
    "encoder": encoder,
    "gpt2_checkpointing": lambda: gpt2(checkpointing=True),
    "gru": lambda: recurrent(nn.GRU),
    "lstm": lambda: recurrent(nn.LSTM),
    "gpt2_4x256": lambda: gpt2(layers=4, d=256, steps=64),
    "gpt2": gpt2,
    "gpt2_4x256_vocab50257": lambda: gpt2(layers=4, d=256, steps=64, vocab=50257),
}


def _build(name: str, batch: int):
    """``(model, closure)`` of one model with its batch (the same weights and data every time)."""
    torch.manual_seed(0)
    model, make_batch, loss = MODELS[name]()
    data = make_batch(batch, torch.Generator().manual_seed(1))
    return model, lambda: loss(model, *data)


def _adam_step(model, closure):
    adam = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def step():
        adam.zero_grad()
        closure().mean().backward()
        adam.step()

    return step


def _step_of(optimizer: str, model, closure):
    """One step of ``"adam"`` or ``"sven_gram"`` (bare: no safeguard) on ``model``, as a callable."""
    if optimizer == "adam":
        return _adam_step(model, closure)
    sven = sven_ext.Sven(model, lr=1e-6, backend="gram", safeguard=None)
    return lambda: sven.step(closure)


def _status_mib(field: str) -> float:
    return common.status_kib(field) / 1024


def memory_child(name: str, optimizer: str, batch: int, steps: int) -> None:
    """Builds one model and its batch, takes ``steps`` steps of one optimizer, prints a JSON line."""
    # The modules an optimizer's first step imports (torch.optim's imports the compiler's, some
    # 150 MiB) and the libraries' code pages that any step touches count as resident memory:
    # both are in before the bare model's memory is read, through one step of the optimizer on a
    # tiny model and one plain forward and backward pass of this one.
    tiny = nn.Linear(2, 1)
    x = torch.randn(4, 2)
    _step_of(optimizer, tiny, lambda: tiny(x).squeeze(1).square())()
    model, closure = _build(name, batch)
    closure().mean().backward()
    model.zero_grad(set_to_none=True)
    bare = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    step = _step_of(optimizer, model, closure)
    first = None
    for index in range(steps):
        step()
        if index == 0:  # the later steps' peak on its own (Sven's first step also checks its factors)
            first = _status_mib("VmHWM")
            Path("/proc/self/clear_refs").write_text("5")
    later = _status_mib("VmHWM") if steps > 1 else None
    print(json.dumps({"bare_model_rss_mib": bare, "first_step_peak_rss_mib": first, "later_steps_peak_rss_mib": later,
                      "extra_peak_mib": max(first, later or 0) - bare,
                      "later_steps_extra_peak_mib": None if later is None else later - bare}))


def extra_memory(name: str, batch: int, steps: int, threads: int | None) -> dict:
    """``{optimizer: memory_child's result}`` for Adam and Sven gram, each in a fresh interpreter
    under exact allocator accounting (``"error"`` where the child failed)."""
    out = {}
    for optimizer in ("adam", "sven_gram"):
        command = [sys.executable, __file__, "--memory-child", name, optimizer, "--batch", str(batch),
                   "--memory-steps", str(steps)] + (["--threads", str(threads)] if threads else [])
        done = subprocess.run(command, capture_output=True, text=True, check=False, env={**os.environ, **MALLOC_ENV})
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        out[optimizer] = json.loads(lines[-1]) if done.returncode == 0 and lines else \
            {"error": done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]}
    return out


def balanced_orders(count: int) -> list[list[int]]:
    """Orders of ``count`` methods in which each method comes right after each other one equally often
    (a Williams design: ``count`` orders for an even count, twice as many for an odd one)."""
    first, low, high = [0], 1, count - 1
    while len(first) < count:
        first.append(low)
        low += 1
        if len(first) < count:
            first.append(high)
            high -= 1
    orders = [[(k + shift) % count for k in first] for shift in range(count)]
    return orders if count % 2 == 0 else orders + [order[::-1] for order in orders]


def balanced_times(fns: dict, *, repeats: int) -> dict:
    """``{name: {"median_s", "times_s"}}`` of each ``fns[name]()`` after one warm-up call each: one call
    of each per round, the rounds going through :func:`balanced_orders`. A step right after a sketch
    step (which touches more memory) ran 10-20% slower than the same step after the others: in a
    fixed order that cost falls on one method."""
    names = list(fns)
    for fn in fns.values():
        fn()
    orders = balanced_orders(len(names))
    times = {name: [] for name in names}
    for round_ in range(repeats):
        for k in orders[round_ % len(orders)]:
            start = time.perf_counter()
            fns[names[k]]()
            times[names[k]].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "times_s": t} for name, t in times.items()}


def _without_kept_rows(step):
    """``step`` run with the gram backend keeping no per-row gradients for the direction."""
    def call():
        share, gram_backend.KEPT_ROWS_SHARE = gram_backend.KEPT_ROWS_SHARE, 0.0
        try:
            step()
        finally:
            gram_backend.KEPT_ROWS_SHARE = share
    return call


# 76 lines: one model's case read top to bottom (build, warm-up, balanced timing, routes, memory),
# each part a few lines that only this function uses.
def run(name: str, batch: int, repeats: int, without_kept_rows: bool = False) -> dict:
    """One pass over one model; ``without_kept_rows``: a second gram optimizer takes turns too, whose
    steps keep no per-row gradients for the direction (the contraction of the factors instead)."""
    model, closure = _build(name, batch)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"\n== {name}: {params:,} parameters, B = {batch}", flush=True)
    load = os.getloadavg()[0]
    adam_step = _adam_step(model, closure)
    gram = sven_ext.Sven(model, lr=1e-6, backend="gram", safeguard=None)
    sketch = sven_ext.Sven(model, lr=1e-6, backend="sketch", safeguard=None)
    auto = sven_ext.Sven(model, lr=1e-6, backend="auto", safeguard=None)
    steps = {"adam": adam_step, "sven_gram": lambda: gram.step(closure), "sven_sketch": lambda: sketch.step(closure),
             "sven_auto": lambda: auto.step(closure)}
    if without_kept_rows:
        plain = sven_ext.Sven(model, lr=1e-6, backend="gram", safeguard=None)
        steps["sven_gram_without_kept_rows"] = _without_kept_rows(lambda: plain.step(closure))
    names = {id(p): n for n, p in model.named_parameters()}
    fallback = set()
    uses = capture.Capture.uses

    def recording(cap, *args, **kwargs):  # the parameters of the gram step's uses that are the fallback's
        found = uses(cap, *args, **kwargs)
        fallback.update(names[id(p)] for use in found if isinstance(use, ModuleUse)
                        for p in use.params)
        return found

    for _ in range(2):  # warm-up
        for step in steps.values():
            step()
    capture.Capture.uses = recording
    try:
        gram.step(closure)
    finally:
        capture.Capture.uses = uses
    cpu = {key: [] for key in steps}

    def on_cpu(key, step):  # also the process's CPU time of each call
        def call():
            start = time.process_time()
            step()
            cpu[key].append(time.process_time() - start)
        return call

    results = balanced_times({key: on_cpu(key, step) for key, step in steps.items()}, repeats=repeats)
    for key, result in results.items():
        result["cpu_times_s"] = cpu[key][-repeats:]  # after balanced_times' warm-up call
        result["cpu_median_s"] = statistics.median(result["cpu_times_s"])
    info = gram.last_info
    routes = collections.Counter(info["paths"].values())
    median = {name: results[name]["median_s"] for name in steps}
    on_cpu_median = {name: results[name]["cpu_median_s"] for name in steps}
    chosen = auto.last_info["backend"]
    summary = {
        "name": name, "parameters": params, "batch": batch, "load_average_1min": load, "results": results,
        "ratio_gram_to_adam": median["sven_gram"] / median["adam"],
        "cpu_ratio_gram_to_adam": on_cpu_median["sven_gram"] / on_cpu_median["adam"],
        "ratio_sketch_to_adam": median["sven_sketch"] / median["adam"],
        "ratio_auto_to_adam": median["sven_auto"] / median["adam"],
        "auto_backend": chosen, "auto_reason": auto.last_info.get("auto_reason"),
        # the backend auto chose, timed on its own, against the faster of the two
        "auto_within_20_percent": median[f"sven_{chosen}"] <= 1.2 * min(median["sven_gram"], median["sven_sketch"]),
        "recorded_whole": info["recorded_whole"], "fallback_parameters": sorted(fallback),
        "routes": dict(routes), "paths": info["paths"],
    }
    if without_kept_rows:
        summary["ratio_gram_without_kept_rows_to_adam"] = median["sven_gram_without_kept_rows"] / median["adam"]
        summary["cpu_ratio_gram_without_kept_rows_to_adam"] = \
            on_cpu_median["sven_gram_without_kept_rows"] / on_cpu_median["adam"]
        print(f"  gram without kept per-row gradients {summary['ratio_gram_without_kept_rows_to_adam']:5.2f}x "
              f"(CPU time {summary['cpu_ratio_gram_without_kept_rows_to_adam']:5.2f}x)", flush=True)
    print(f"  load {load:.1f} | adam {median['adam'] * 1e3:9.1f} ms | gram {summary['ratio_gram_to_adam']:5.2f}x "
          f"(CPU time {summary['cpu_ratio_gram_to_adam']:5.2f}x) | "
          f"sketch {summary['ratio_sketch_to_adam']:5.2f}x | auto ({chosen}) {summary['ratio_auto_to_adam']:5.2f}x, "
          f"within 20%: {summary['auto_within_20_percent']} | routes {dict(routes)} | "
          f"recorded whole {info['recorded_whole']} | fallback {sorted(fallback)}", flush=True)
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds, one call of each method per round")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--runs", type=int, default=1, help="passes over the models, one after another")
    parser.add_argument("--out", default="zoo_bench.json", help="results file (under bench/results/ unless a path)")
    parser.add_argument("--memory-steps", type=int, default=3,
                        help="steps of each fresh process that measures extra peak memory (0: not measured)")
    parser.add_argument("--without-kept-rows", action="store_true",
                        help="also time gram steps that keep no per-row gradients for the direction")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL", "OPTIMIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child, args.batch, args.memory_steps)
        return
    runs = [[run(name, args.batch, args.repeats, args.without_kept_rows) for name in args.models]
            for _ in range(args.runs)]
    summary = [summarise([cases[k] for cases in runs]) for k in range(len(args.models))]
    if args.memory_steps:
        print("\nextra peak memory over the bare model (fresh processes)")
        for row in summary:
            row["extra_memory"] = extra_memory(row["name"], args.batch, args.memory_steps, args.threads)
            print(f"  {row['name']:24s} " + " | ".join(
                f"{optimizer} " + (f"{r['extra_peak_mib']:8.1f} MiB" if "error" not in r else f"error {r['error']}")
                for optimizer, r in row["extra_memory"].items()), flush=True)
    print("\nover the runs: median (range)")
    for row in summary:
        print(f"  {row['name']:24s} gram {_spread(row['ratio_gram_to_adam'])}"
              f" (CPU time {_spread(row['cpu_ratio_gram_to_adam'])})"
              f" | sketch {_spread(row['ratio_sketch_to_adam'])} | auto {_spread(row['ratio_auto_to_adam'])}"
              f" | auto within 20% in every run: {row['auto_within_20_percent']}"
              + (f" | gram without kept per-row gradients {_spread(row['ratio_gram_without_kept_rows_to_adam'])}"
                 if "ratio_gram_without_kept_rows_to_adam" in row else ""))
    path = common.write_json(args.out, {"command": "python bench/zoo_bench.py " + " ".join(argv or sys.argv[1:]),
                                        "summary": summary, "runs": runs})
    print(f"\nwrote {path}")


RATIOS = ("ratio_gram_to_adam", "cpu_ratio_gram_to_adam", "ratio_sketch_to_adam", "ratio_auto_to_adam",
          "ratio_gram_without_kept_rows_to_adam", "cpu_ratio_gram_without_kept_rows_to_adam")


def summarise(cases: list[dict]) -> dict:
    """One model's runs: per ratio the median over the runs and its range; what every run agreed on."""
    first = cases[0]
    row = {"name": first["name"], "parameters": first["parameters"], "batch": first["batch"], "runs": len(cases),
           "adam_median_s": statistics.median(c["results"]["adam"]["median_s"] for c in cases),
           "load_averages_1min": [c["load_average_1min"] for c in cases]}
    for key in (key for key in RATIOS if key in first):
        values = [c[key] for c in cases]
        row[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    row["auto_backends"] = sorted({c["auto_backend"] for c in cases})
    row["auto_within_20_percent"] = all(c["auto_within_20_percent"] for c in cases)
    row["recorded_whole"] = sorted({m for c in cases for m in c["recorded_whole"]})
    row["fallback_parameters"] = sorted({p for c in cases for p in c["fallback_parameters"]})
    return row


def _spread(ratio: dict) -> str:
    return f"{ratio['median']:5.2f} ({ratio['min']:.2f}-{ratio['max']:.2f})"


if __name__ == "__main__":
    main()
