"""Decoder-only language models under a memory limit: peak memory and step time of Sven against
SGD, Adam, AdamW, Adafactor and Muon.

Models (random weights, float32): the project's :func:`sven_ext.testing.tiny_transformer`
(tied embedding/head, MLP width 2d) and Hugging Face ``GPT2LMHeadModel`` configs (MLP width 4d),
``d = 768``, 12 heads, vocabulary 32,000, ``L`` layers, sequence length ``T``, batch ``B``. The
per-sample loss is the per-sequence mean next-token cross-entropy (random tokens).

Optimizers: ``sgd``, ``adam``, ``adamw``, ``adafactor`` (``torch.optim.Adafactor``), ``muon``
(``torch.optim.Muon`` on the 2-D weights of the blocks, AdamW on the embeddings, head, norms and
biases, as it is used), Sven ``gram``, ``auto`` and ``sketch``.

Subcommands:

    python bench/lm_bench.py memory --layers 2 6 12 --steps-len 128    # each optimizer in a fresh process
    python bench/lm_bench.py ratios --layers 6 --steps-len 128         # interleaved step times, one process
    python bench/lm_bench.py budget --budget-gib 3 --start 16          # largest L whose step fits the budget
    python bench/lm_bench.py train --seconds 60                        # byte-level LM on the stdlib's sources
    python bench/lm_bench.py plot                                      # peak memory against parameters (PNG)

``memory``: a child process per (model, L, T, optimizer) builds the model, takes ``--steps``
steps and reports its peak resident memory (``VmHWM``: build and steps, the interpreter and torch
included; also over build and the first step, and over the later steps alone), its resident
memory after import and after the build (the bare model), and the median time of the steps after
the first. Results: ``bench/results/lm_bench_memory.json`` (``--out``).
``ratios``: all optimizers on one model in one process, one step each per round (the ratio to
Adam is robust to the machine's load). ``budget``: per optimizer, the largest ``L`` (at
``d = 768``) whose build and steps stay within the budget, over fresh processes from a guess.
``train``: the loss each optimizer reaches in the same wall time on a small byte-level LM.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

import sven_ext
from sven_ext import testing
from sven_ext.harness.environment import MALLOC_ENV

VOCAB, WIDTH, HEADS, BATCH = 32000, 768, 12, 8
OPTIMIZERS = ("sgd", "adam", "adamw", "adafactor", "muon", "sven_gram", "sven_auto", "sven_sketch", "sven_default")


def status_mib(field: str) -> float:
    return common.status_kib(field) / 1024


def build(kind: str, layers: int, steps: int, *, vocab: int = VOCAB, width: int = WIDTH, heads: int = HEADS,
          seed: int = 0) -> torch.nn.Module:
    """``"tiny"``: :func:`sven_ext.testing.tiny_transformer`; ``"gpt2"``: ``GPT2LMHeadModel`` (logits only)."""
    if kind == "tiny":
        return testing.tiny_transformer(vocab, width, heads, steps, layers=layers, dtype=torch.float32, seed=seed)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers, n_head=heads, n_positions=steps,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                        bos_token_id=None, eos_token_id=None)
    return _Logits(GPT2LMHeadModel(config))


class _Logits(torch.nn.Module):
    """A Hugging Face causal LM called with token ids, returning its logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx):
        return self.model(input_ids=idx).logits


def batch_of(steps: int, vocab: int = VOCAB, batch: int = BATCH, seed: int = 1):
    """Random tokens: inputs ``(B, T)`` and their next tokens."""
    tokens = torch.randint(0, vocab, (batch, steps + 1), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def per_sequence_loss(model, idx, target) -> torch.Tensor:
    """``(B,)``: each sequence's mean token cross-entropy."""
    return F.cross_entropy(model(idx).transpose(1, 2), target, reduction="none").mean(1)


def per_token_rows(model, idx, target) -> sven_ext.Residuals:
    """``(B, T)`` rows, each token a condition: the square roots of the token cross-entropies."""
    return sven_ext.Residuals(F.cross_entropy(model(idx).transpose(1, 2), target, reduction="none").sqrt())


def make_step(name: str, model: torch.nn.Module, loss, lr: float | None = None):
    """``(optimizer, step)``: ``step()`` takes one step of ``name`` on the closure ``loss`` (per-sample losses).

    ``lr``: Sven's, or the optimizer's (Muon's for the matrices, ``lr / 20`` for AdamW on the rest);
    ``None``: each one's usual value.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sven_default":  # every setting at its default: backend auto, the backtracking safeguard
        opt = sven_ext.Sven(model, lr=1e-3 if lr is None else lr)
        return opt, lambda: opt.step(loss)
    if name.startswith("sven_"):
        # The bare step of one backend (safeguard=None: no trial forward pass).
        opt = sven_ext.Sven(model, lr=1e-3 if lr is None else lr, backend=name[len("sven_"):], safeguard=None)
        return opt, lambda: opt.step(loss)
    if name == "muon":
        # Muon for the blocks' matrices; the embedding (tied to the head), norms and biases with AdamW.
        table = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        matrices = [p for p in params if p.dim() == 2 and id(p) not in table]
        rest = [p for p in params if p.dim() != 2 or id(p) in table]
        opts = [torch.optim.Muon(matrices, lr=0.02 if lr is None else lr, adjust_lr_fn="match_rms_adamw"),
                torch.optim.AdamW(rest, lr=1e-3 if lr is None else lr / 20)]
    else:
        classes = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
                   "adafactor": torch.optim.Adafactor}
        opts = [classes[name](params, lr=(1e-2 if name == "adafactor" else 1e-3) if lr is None else lr)]

    def step():
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss().mean().backward()
        for opt in opts:
            opt.step()

    return opts, step


# --------------------------------------------------------------------------- one fresh process


def child(args) -> None:
    """Builds one model, takes ``args.steps`` steps of one optimizer, prints a JSON line."""
    torch.set_num_threads(args.threads) if args.threads else None
    imported = status_mib("VmRSS")
    model = build(args.model, args.layers[0], args.steps_len[0])
    bare = status_mib("VmRSS")
    idx, target = batch_of(args.steps_len[0])
    rows = per_token_rows if args.per_token else per_sequence_loss
    opt, step = make_step(args.optimizer, model, lambda: rows(model, idx, target))
    times, info, first_peak = [], {}, None
    for index in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        if index == 0:  # the later steps' peak on its own (Sven's first step also checks its factors)
            first_peak = status_mib("VmHWM")
            Path("/proc/self/clear_refs").write_text("5")
    if args.optimizer.startswith("sven_"):
        info = {"backend": opt.last_info["backend"], "auto_reason": opt.last_info.get("auto_reason"),
                "routes": sorted(set(opt.last_info.get("paths", {}).values()))}
    print(json.dumps({
        "model": args.model, "layers": args.layers[0], "steps_len": args.steps_len[0], "batch": BATCH,
        "optimizer": args.optimizer, "per_token": args.per_token, "parameters": sum(p.numel() for p in model.parameters()),
        "peak_rss_mib": max(first_peak, status_mib("VmHWM")), "first_step_peak_rss_mib": first_peak,
        "later_steps_peak_rss_mib": status_mib("VmHWM") if args.steps > 1 else None,
        "imported_rss_mib": imported, "bare_model_rss_mib": bare,
        "step_s": times, "median_step_s": statistics.median(times[1:] or times), **info,
    }))


def fresh(model: str, layers: int, steps_len: int, optimizer: str, steps: int, threads: int | None,
          exact: bool = False, per_token: bool = False) -> dict:
    """:func:`child` in a new interpreter; its JSON result (``"error"`` if it failed, e.g. out of memory).

    ``exact``: under the allocator settings of exact accounting (``common.MALLOC_ENV``: freed memory
    goes back to the system at once, so the peak is that of live tensors); else the default allocator,
    as users run. ``per_token``: Sven's rows are the tokens (:func:`per_token_rows`).
    """
    command = [sys.executable, __file__, "child", "--model", model, "--layers", str(layers), "--steps-len",
               str(steps_len), "--optimizer", optimizer, "--steps", str(steps)] + (["--per-token"] if per_token else [])
    if threads:
        command += ["--threads", str(threads)]
    env = {**os.environ, **(MALLOC_ENV if exact else {})}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"model": model, "layers": layers, "steps_len": steps_len, "optimizer": optimizer,
                "error": done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]}
    return json.loads(lines[-1])


def memory(args) -> None:
    out = []
    for model in args.models:
        for steps_len in args.steps_len:
            for layers in args.layers:
                for optimizer in args.optimizers:
                    r = fresh(model, layers, steps_len, optimizer, args.steps, args.threads, args.exact_accounting,
                              args.per_token)
                    out.append(r)
                    if "error" in r:
                        print(f"{model} L={layers} T={steps_len} {optimizer}: {r['error']}", flush=True)
                        continue
                    print(f"{model} L={layers:2d} T={steps_len} {optimizer:12s} {r['parameters'] / 1e6:6.1f}M  "
                          f"peak {r['peak_rss_mib']:7.0f} MiB (later steps {r['later_steps_peak_rss_mib'] or 0:6.0f}, "
                          f"bare model {r['bare_model_rss_mib']:6.0f})  "
                          f"step {r['median_step_s']:6.2f} s  {r.get('routes', '')}", flush=True)
    save(args, {"exact_accounting": args.exact_accounting, "results": out})


# --------------------------------------------------------------------------- interleaved ratios


def ratios(args) -> None:
    out = []
    for model_kind in args.models:
        for steps_len in args.steps_len:
            for layers in args.layers:
                row = interleaved(model_kind, layers, steps_len, args.optimizers, args.repeats)
                out.append(row)
                print(f"{model_kind} L={layers} T={steps_len}: adam {row['results']['adam']['median_s']:.2f} s; "
                      + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in row["ratio_to_adam"].items()), flush=True)
    save(args, {"results": out})


def interleaved(model_kind: str, layers: int, steps_len: int, optimizers: list, repeats: int) -> dict:
    """Every optimizer on one model, one step each per round; their median times and ratios to Adam's."""
    model = build(model_kind, layers, steps_len)
    idx, target = batch_of(steps_len)

    def loss():
        return per_sequence_loss(model, idx, target)

    # lr 1e-6: the model barely moves, so every method steps from (almost) the same weights.
    steps = {name: make_step(name, model, loss, lr=1e-6)[1] for name in optimizers}
    results = common.interleaved_times(steps, repeats=repeats)
    adam = results["adam"]["median_s"]
    return {"model": model_kind, "layers": layers, "steps_len": steps_len, "batch": BATCH,
            "parameters": sum(p.numel() for p in model.parameters()), "results": results,
            "ratio_to_adam": {name: r["median_s"] / adam for name, r in results.items()}}


# --------------------------------------------------------------------------- fixed budget


def budget(args) -> None:
    out = {}
    for optimizer in args.optimizers:
        out[optimizer] = largest_fitting(optimizer, args)
        print(f"{optimizer}: largest L = {out[optimizer]['largest_layers']} "
              f"({out[optimizer]['parameters'] / 1e6:.1f}M parameters)", flush=True)
    save(args, {"budget_gib": args.budget_gib, "results": out})


def largest_fitting(optimizer: str, args) -> dict:
    """The largest ``L`` whose fresh process peaks within the budget: from the guess ``args.start``
    (e.g. a linear fit of ``memory`` results), up while it fits, or down until it does."""
    limit, probes = args.budget_gib * 1024, {}

    def fits(layers: int) -> bool:
        r = fresh(args.models[0], layers, args.steps_len[0], optimizer, args.steps, args.threads)
        probes[layers] = r
        ok = "error" not in r and r["peak_rss_mib"] <= limit
        print(f"  {optimizer} L={layers}: " + (f"peak {r['peak_rss_mib']:.0f} MiB" if "error" not in r
                                               else str(r["error"])) + (" fits" if ok else ""), flush=True)
        return ok

    layers = args.start[optimizer] if isinstance(args.start, dict) else args.start
    if fits(layers):
        while fits(layers + 1):
            layers += 1
    else:
        layers -= 1
        while layers > 0 and not fits(layers):
            layers -= 1
    best = probes.get(layers)
    return {"largest_layers": layers, "parameters": best["parameters"] if best else 0,
            "peak_rss_mib": best["peak_rss_mib"] if best else None, "probes": list(probes.values())}


# --------------------------------------------------------------------------- same wall time


def stdlib_bytes() -> torch.Tensor:
    """The bytes of the Python standard library's ``.py`` files (sorted by path), as int64."""
    root = Path(os.__file__).parent
    data = b"".join(path.read_bytes() for path in sorted(root.glob("*.py")))
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def train(args) -> None:
    data = stdlib_bytes()
    split = int(0.95 * data.numel())
    held_out = data[split:]
    steps_len = args.steps_len[0]
    generator = torch.Generator().manual_seed(0)
    evaluation = torch.randint(0, held_out.numel() - steps_len - 1, (64,), generator=generator)
    ev_idx = torch.stack([held_out[i:i + steps_len] for i in evaluation.tolist()])
    ev_target = torch.stack([held_out[i + 1:i + steps_len + 1] for i in evaluation.tolist()])
    out = []
    for optimizer in args.optimizers:
        for lr in args.lrs.get(optimizer, [None]):
            out.append(train_one(optimizer, lr, data[:split], (ev_idx, ev_target), args))
            r = out[-1]
            print(f"{optimizer:10s} lr {lr}: {r['steps']:5d} steps, held-out loss {r['held_out_loss']:.3f} "
                  "nats/byte", flush=True)
    save(args, {"results": out})


def train_one(optimizer: str, lr: float | None, data: torch.Tensor, held_out: tuple, args) -> dict:
    """Trains a fresh byte-level LM for ``args.seconds`` on random windows of ``data``; its held-out loss."""
    steps_len = args.steps_len[0]
    model = build("tiny", args.layers[0], steps_len, vocab=256, width=args.width, heads=4, seed=0)
    with torch.no_grad():  # GPT-2's scale for the tied table: unit-variance rows make the logits huge
        model.tok.weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(2))
    draws = torch.Generator().manual_seed(1)
    batch = {}

    def loss():
        return per_sequence_loss(model, batch["idx"], batch["target"])

    _, step = make_step(optimizer, model, loss, lr=lr)
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < args.seconds:
        at = torch.randint(0, data.numel() - steps_len - 1, (args.batch,), generator=draws).tolist()
        batch["idx"] = torch.stack([data[i:i + steps_len] for i in at])
        batch["target"] = torch.stack([data[i + 1:i + steps_len + 1] for i in at])
        step()
        steps += 1
    with torch.no_grad():
        held = float(per_sequence_loss(model, *held_out).mean())
    return {"optimizer": optimizer, "lr": lr, "steps": steps, "seconds": time.perf_counter() - start,
            "held_out_loss": held, "parameters": sum(p.numel() for p in model.parameters())}


def plot(args) -> None:
    """Peak memory against parameters per optimizer (``--inputs``: ``memory`` results files), with the
    budget as a line: ``bench/results/lm_bench_memory.png`` (``--out``)."""
    from matplotlib.figure import Figure

    series: dict = {}
    for name in args.inputs:
        for r in json.loads((common.RESULTS / name).read_text())["results"]:
            if "error" in r or r["model"] != args.models[0] or r["steps_len"] != args.steps_len[0]:
                continue
            series.setdefault(r["optimizer"], []).append((r["parameters"] / 1e6, r["peak_rss_mib"] / 1024))
    figure = Figure(figsize=(6.4, 4.2))
    axes = figure.subplots()
    for optimizer, points in sorted(series.items()):
        points.sort()
        axes.plot(*zip(*points), marker="o", label=optimizer)
    axes.axhline(args.budget_gib, color="gray", linestyle="--", label=f"{args.budget_gib:g} GiB")
    axes.set_xlabel("parameters (millions)")
    axes.set_ylabel("peak resident memory of the process (GiB)")
    axes.set_title(f"{args.models[0]}, d = {WIDTH}, T = {args.steps_len[0]}, B = {BATCH}, float32, CPU")
    axes.legend(fontsize=8)
    path = common.RESULTS / (args.out or "lm_bench_memory.png")
    figure.savefig(path, dpi=120, bbox_inches="tight")
    print(f"wrote {path}")


def save(args, payload: dict) -> None:
    command = "python bench/lm_bench.py " + " ".join(sys.argv[1:])
    path = common.write_json(args.out or f"lm_bench_{args.command}.json", {"command": command, **payload})
    print(f"wrote {path}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("memory", "ratios", "budget", "train", "plot", "child"))
    parser.add_argument("--models", nargs="+", default=["tiny"], choices=("tiny", "gpt2"))
    parser.add_argument("--model", default="tiny", choices=("tiny", "gpt2"), help="child: the model")
    parser.add_argument("--layers", type=int, nargs="+", default=[6])
    parser.add_argument("--steps-len", type=int, nargs="+", default=[128], help="sequence length T")
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, help="child: the optimizer")
    parser.add_argument("--steps", type=int, default=3, help="steps per fresh process")
    parser.add_argument("--repeats", type=int, default=3, help="ratios: timed rounds")
    parser.add_argument("--budget-gib", type=float, default=3.0)
    parser.add_argument("--start", type=json.loads, default=8,
                        help="budget: the first L probed, or JSON {optimizer: L} (then up or down by one)")
    parser.add_argument("--seconds", type=float, default=60.0, help="train: wall time per run")
    parser.add_argument("--width", type=int, default=128, help="train: d of the byte-level LM")
    parser.add_argument("--batch", type=int, default=16, help="train: sequences per batch")
    parser.add_argument("--lrs", type=json.loads, default={"sven_gram": [0.1, 0.3], "adamw": [1e-3, 3e-3],
                                                           "adafactor": [1e-2, 3e-2], "muon": [0.02, 0.05]},
                        help="train: JSON {optimizer: [lr, ...]}")
    parser.add_argument("--exact-accounting", action="store_true",
                        help="memory: children under the allocator settings of exact accounting (live tensors)")
    parser.add_argument("--inputs", nargs="+", default=["lm_bench_memory_baselines_t128.json",
                                                        "lm_bench_memory_sven_t128.json"],
                        help="plot: memory results files under bench/results/")
    parser.add_argument("--per-token", action="store_true",
                        help="memory: Sven's rows are the tokens, Residuals (B, T), not the sequences")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", default=None, help="results file under bench/results/ (default lm_bench_COMMAND.json)")
    args = parser.parse_args(argv)
    if args.command == "child":
        child(args)
        return
    if args.command == "train" and args.optimizers == list(OPTIMIZERS):
        args.optimizers = ["sven_gram", "adamw", "adafactor", "muon"]
    {"memory": memory, "ratios": ratios, "budget": budget, "train": train, "plot": plot}[args.command](args)


if __name__ == "__main__":
    main()
