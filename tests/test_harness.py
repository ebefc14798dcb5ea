"""The benchmark harness (sven_ext.harness) on toy configurations: runs, resuming, selection, report, plots."""

import dataclasses
import json
import math

import pytest
import torch

from sven_ext import Residuals
from sven_ext.__main__ import main
from sven_ext.demo import warmup_then_decay
from sven_ext.harness import optimizers, plots, report, runner, scaling, tasks


def _tiny(name="regression_1d", **settings):
    task = tasks.get_tasks([name], quick=True)[0]
    return dataclasses.replace(task, epochs=2, seeds=(0, 1), settings={**task.settings, **settings})


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "runs.jsonl"
    task = _tiny(n_train=96, n_val=64)
    specs = optimizers.get_optimizers(["sven-dense", "sven-gram", "adam", "lbfgs"])
    runs = runner.run([task], specs, path, command="test", progress=False)
    return task, path, runs


def test_every_run_is_one_json_line_with_its_protocol(tiny_results):
    task, path, runs = tiny_results
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["kind"] == "environment" and lines[0]["command"] == "test" and "torch" in lines[0]
    # 3 tuned optimizers x 4 values x 2 seeds, then the dense backend at gram's value on 2 seeds.
    assert len(runs) == 3 * optimizers.GRID_SIZE * 2 + 2
    assert {r["status"] for r in runs} <= {"ok", "diverged"}
    assert all(r["reason"] for r in runs if r["status"] == "diverged")
    finished = [r for r in runs if r["status"] == "ok"]
    # The largest step sizes may blow up on 6 steps of a toy problem; every optimizer has some that do not.
    assert {r["optimizer"] for r in finished} == {"sven-gram", "sven-dense", "adam", "lbfgs"}
    for run in finished:
        assert run["task_config"] == json.loads(json.dumps(task.config()))
        assert run["steps"] == 2 * 3  # 96 samples in batches of 32, 2 epochs
        assert len(run["epochs"]["train_loss"]) == 2
        assert run["curve"]["step"][0] == 0 and run["curve"]["step"][-1] == 6
        assert run["curve"]["seconds"] == sorted(run["curve"]["seconds"])
        assert math.isfinite(run["final"]["val_loss"])
    gram_value, _ = runner.select(runner.runs_for(runs, task, "sven-gram"), "loss")
    assert {r["value"] for r in runner.runs_for(runs, task, "sven-dense")} == {gram_value}
    spectra = [r for r in runs if "spectra" in r]
    assert spectra and all(r["seed"] == 0 for r in spectra)
    assert len(spectra[0]["spectra"]["singular_values"]) == 3  # initial + 2 epochs
    assert all(len(r["ranks"]) == 2 for r in finished if r["optimizer"].startswith("sven"))


def test_epoch_train_loss_is_example_weighted():
    # 100 samples in batches of 32: the last batch has 4, and must weigh 4/100.
    task = _tiny(n_train=100, n_val=16)
    task = dataclasses.replace(task, epochs=1, seeds=(0,), schedule=False)
    spec = optimizers.OPTIMIZERS["sgd"]
    problem = task.build(0)
    stepper = spec.build(problem, 0.0 + 1e-12, task)
    weighted, count = 0.0, 0
    for batch, size in problem.batches(torch.Generator().manual_seed(0)):
        weighted += stepper.step(batch) * size
        count += size
    record = runner.train(task, spec, 1e-12, 0, progress=False)
    assert count == 100
    assert record["epochs"]["train_loss"][0] == pytest.approx(weighted / count, rel=1e-5)


def test_running_again_resumes_without_repeating(tiny_results):
    task, path, runs = tiny_results
    specs = optimizers.get_optimizers(["sven-dense", "sven-gram", "adam", "lbfgs"])
    again = runner.run([task], specs, path, command="again", progress=False)
    assert len(again) == len(runs)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["command"] for line in lines if line["kind"] == "environment"] == ["test", "again"]


def test_diverged_runs_are_recorded_and_never_selected(tmp_path):
    task = dataclasses.replace(_tiny(n_train=64, n_val=32), seeds=(0,), grids={"sgd": (1e-3, 1e4, 1e5, 1e6)})
    runs = runner.run([task], [optimizers.OPTIMIZERS["sgd"]], tmp_path / "r.jsonl", command="t", progress=False)
    statuses = {r["value"]: r["status"] for r in runs}
    assert statuses[1e-3] == "ok" and statuses[1e6] == "diverged"
    assert next(r for r in runs if r["value"] == 1e6)["reason"]
    assert runner.select(runs, "loss")[0] == 1e-3


def test_selection_takes_the_lowest_median_over_seeds():
    def run(value, seed, loss, status="ok"):
        return {"value": value, "seed": seed, "status": status, "final": {"val_loss": loss}}

    runs = [run(1, 0, 1.0), run(1, 1, 1.0), run(1, 2, 1.0),
            run(2, 0, 0.1), run(2, 1, 0.1), run(2, 2, 9.0, "diverged"),  # median 0.1 despite one diverged
            run(3, 0, 0.01), run(3, 1, math.nan, "diverged"), run(3, 2, 5.0, "diverged")]
    assert runner.select(runs, "loss") == (2, 0.1)


def test_report_and_plots(tiny_results, tmp_path):
    task, _, runs = tiny_results
    text = report.format_report(runs, [task])
    assert "| Sven (gram) | lr |" in text and "| Adam | lr |" in text and "| L-BFGS (1 iteration per batch) |" in text
    assert "Sven vs best-tuned Adam" in text and "Grid:" in text
    written = plots.convergence_plots(runs, [task], tmp_path)
    assert {p.name for p in written} == {"convergence_regression_1d.png", "spectra.png"}
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_digits_splits_are_disjoint_and_labelled():
    pytest.importorskip("sklearn")
    for name in ("digits_regression", "digits_ce"):
        problem = tasks.get_tasks([name])[0].build(0)
        sizes = {split: problem.data[split][0].shape[0] for split in ("train", "val", "test")}
        assert sum(sizes.values()) == 1797 and sizes["val"] == sizes["test"] == 359
        rows = {split: {tuple(r.tolist()) for r in problem.data[split][0]} for split in ("val", "test")}
        assert problem.splits == ("val", "test")
        assert len(rows["val"] & rows["test"]) < 5  # the digits set has a few duplicate images
        metrics = problem.evaluate("test")
        assert set(metrics) == {"loss", "accuracy"} and 0 <= metrics["accuracy"] <= 1


def test_polynomial_has_every_monomial_up_to_degree_4():
    x, y, monomials = tasks.polynomial_data(512, 6, 4, seed=0)
    assert monomials == math.comb(6 + 4, 4) == 210  # interaction terms included, not an additive sum
    assert x.shape == (512, 6) and y.shape == (512, 1)
    assert x.abs().max() <= 1
    problem = tasks.get_tasks(["polynomial"], quick=True)[0].build(0)
    assert problem.data["train"][1].std() == pytest.approx(1.0, rel=1e-3)


def test_same_seed_same_start_and_batches_for_every_optimizer():
    task = _tiny(n_train=64, n_val=16)
    first, second = task.build(3), task.build(3)
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)
    batches = [[b[0][0] for b, _ in p.batches(torch.Generator().manual_seed(3))] for p in (first, second)]
    assert all(torch.equal(a, b) for a, b in zip(*batches))


def test_cli_quick_convergence_report_and_plots(tmp_path, capsys):
    out = tmp_path / "quick.jsonl"
    assert main(["bench", "convergence", "--quick", "--tasks", "regression_1d", "--optimizers", "adam",
                 "--out", str(out), "--no-progress"]) == 0
    assert "| Adam | lr |" in capsys.readouterr().out
    assert main(["bench", "report", str(out), "--quick", "--out", str(tmp_path / "report.md")]) == 0
    assert (tmp_path / "report.md").read_text().startswith("**1-D regression")
    assert main(["bench", "plots", str(out), "--quick", "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "convergence_regression_1d.png").exists()


def test_scaling_point_and_plot(tmp_path):
    point = scaling.measure_point("sven-gram", width=8, batch=6, repeats=1)
    assert point["parameters"] == 64 * 8 + 8 + 8 * 8 + 8 + 8 * 10 + 10 and point["median_s"] > 0
    path = tmp_path / "s.jsonl"
    records = [{"kind": "point", "sweep": sweep, "method": method, "status": "ok", "fixed": "", "batch": b,
                "parameters": p, "median_s": t, "peak_extra_bytes": m}
               for sweep in ("parameters", "batch") for method in ("adam", "sven-gram")
               for b, p, t, m in ((32, 1e4, 0.01, 1e6), (64, 1e5, 0.02, 0))]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert plots.scaling_plots(path, tmp_path) == [tmp_path / "scaling.png"]
    assert len(scaling.plan(quick=True)) < len(scaling.plan(quick=False))


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="unknown task"):
        tasks.get_tasks(["nope"])
    with pytest.raises(ValueError, match="unknown optimizer"):
        optimizers.get_optimizers(["nope"])


def test_poisson_task_builds_and_evaluates():
    problem = tasks.get_tasks(["poisson"], quick=True)[0].build(0)
    metrics = problem.evaluate("val")
    assert set(metrics) == {"loss", "rel_l2"} and metrics["rel_l2"] > 0
    assert problem.steps_per_epoch() == 5


def test_poisson_sven_steps_lower_the_loss_with_the_safeguard():
    task = tasks.get_tasks(["poisson"], quick=True)[0]
    problem = task.build(0)
    stepper = optimizers.OPTIMIZERS["sven-functional"].build(problem, 1.0, task)
    assert stepper.optimizer.param_groups[0]["safeguard"] == "backtracking"
    batch, _ = next(problem.batches(torch.Generator()))
    losses = [stepper.step(batch) for _ in range(4)]
    assert all(b < a for a, b in zip(losses, losses[1:]))  # each step lowered the loss


def test_full_batch_lbfgs_trains_on_the_whole_set_until_its_budget():
    task = dataclasses.replace(_tiny(n_train=64, n_val=32), full_batch_seconds=0.2)
    spec = optimizers.OPTIMIZERS["lbfgs-full"]
    record = runner.train(task, spec, 10, 0, progress=False)
    assert record["status"] == "ok" and record["seconds"] >= 0.2
    losses = record["curve"]["val_loss"]
    assert losses[1] < losses[0]  # after the first call (how many calls fit the budget is the machine's)
    # One call of step per point of the curve, each on every training example.
    assert record["epochs"]["epoch"] == list(range(1, record["steps"] + 1))
    assert record["task_config"]["full_batch_seconds"] == 0.2
    assert "full_batch_seconds" in runner.protocol(record["task_config"], "lbfgs-full")
    assert "full_batch_seconds" not in runner.protocol(record["task_config"], "adam")


def test_sven_takes_no_warm_up_and_adam_one():
    assert not any(spec.warmup for name, spec in optimizers.OPTIMIZERS.items() if name.startswith("sven"))
    assert optimizers.OPTIMIZERS["adam"].warmup
    assert warmup_then_decay(0, 10)(0) == 1.0 and warmup_then_decay(0, 10)(5) == 0.5
    assert warmup_then_decay(5, 10)(0) == 0.2


def test_residual_rows_are_per_output_and_scaled_to_the_per_sample_loss():
    pytest.importorskip("sklearn")
    task = _tiny("digits_regression", n_train=64)
    problem = task.build(0)
    batch, _ = next(problem.batches(torch.Generator().manual_seed(0)))
    rows = problem.rows(batch, "residuals")
    assert isinstance(rows, Residuals) and rows.values.shape == (32, 10)  # ten signed rows per image
    torch.testing.assert_close(rows.values.square().sum(dim=1), problem.rows(batch, "losses"))
    with pytest.raises(ValueError, match="rows"):
        tasks.get_tasks(["digits_ce"], quick=True)[0].build(0).rows(batch, "residuals")
    # A Sven step on residual rows reports the mean per-sample loss, like the other optimizers.
    stepper = optimizers.OPTIMIZERS["sven-gram"].build(problem, 0.1, task)
    before = float(problem.loss(batch).detach())
    assert stepper.step(batch) == pytest.approx(before, rel=1e-5)
    assert float(problem.loss(batch).detach()) < before


def test_changing_sven_settings_sets_aside_only_svens_runs(tmp_path):
    task = dataclasses.replace(_tiny(n_train=64, n_val=32), seeds=(0,), sven={"k": 4, "rtol": 1e-3})
    specs = optimizers.get_optimizers(["sven-gram", "adam"])
    path = tmp_path / "r.jsonl"
    first = runner.run([task], specs, path, command="t", progress=False)
    changed = dataclasses.replace(task, sven={"k": 8, "rtol": 1e-3, "rows": "residuals"})
    assert runner.runs_for(first, changed, "sven-gram") == []
    assert runner.runs_for(first, changed, "adam") == runner.runs_for(first, task, "adam") != []
    again = runner.run([changed], specs, path, command="t", progress=False)
    assert len(again) == len(first) + optimizers.GRID_SIZE  # Sven again, Adam not
    new = runner.runs_for(again, changed, "sven-gram")
    assert len(new) == optimizers.GRID_SIZE and all(r["task_config"]["sven"]["rows"] == "residuals" for r in new)


@pytest.mark.slow  # two fresh interpreters importing torch: ~20 s
def test_scaling_point_times_and_peaks_in_separate_processes():
    point = scaling.measure_point_apart("sven-gram", width=8, batch=6, repeats=2, threads=1)
    assert point["parameters"] == 8 * 64 + 8 + 8 * 8 + 8 + 8 * 10 + 10
    assert len(point["times_s"]) == 2 and point["median_s"] > 0 and point["warmup_s"] > 0
    assert point["peak_extra_bytes"] is None or point["peak_extra_bytes"] >= 0


def test_a_follower_counts_only_at_its_leaders_selected_value():
    task = _tiny(n_train=64, n_val=32)
    config = json.loads(json.dumps(task.config()))

    def run(optimizer, value, loss):
        return {"kind": "run", "task": task.name, "task_config": config, "optimizer": optimizer, "value": value,
                "seed": 0, "status": "ok", "final": {"val_loss": loss}}

    grid = optimizers.OPTIMIZERS["sven-gram"].grid(task)
    runs = [run("sven-gram", v, 1.0) for v in grid[:3]] + [run("sven-gram", grid[3], 0.1)]
    # Dense ran at an earlier selection (grid[0]) and at the current one (grid[3]).
    runs += [run("sven-dense", grid[0], 0.01), run("sven-dense", grid[3], 0.2)]
    assert [r["value"] for r in runner.runs_for(runs, task, "sven-dense")] == [grid[3]]


@pytest.mark.parametrize("name", ["digits_regression", "regression_1d"])
def test_formulation_sweep_covers_the_tasks_own_settings_on_one_seed(name):
    from sven_ext.harness import formulations

    base = tasks.get_tasks([name])[0]
    variants = formulations.variants(base)
    assert len({json.dumps(v.config(), sort_keys=True) for v in variants}) == len(formulations.FORMULATIONS[name])
    assert all(v.seeds == base.seeds[:1] for v in variants)
    assert sum(v.sven == base.sven for v in variants) == 1  # the protocol's formulation is among them


def test_speedup_median_counts_a_seed_that_never_reached_adam_as_the_worst():
    task = dataclasses.replace(_tiny(n_train=64, n_val=32), seeds=(0, 1, 2))
    config = json.loads(json.dumps(task.config()))

    def run(optimizer, value, seed, seconds, losses, status="ok"):
        return {"kind": "run", "task": task.name, "task_config": config, "optimizer": optimizer, "value": value,
                "seed": seed, "status": status, "final": {"val_loss": losses[-1]},
                "curve": {"seconds": seconds, "val_loss": losses}}

    sven, adam = optimizers.OPTIMIZERS["sven-gram"].grid(task)[0], optimizers.OPTIMIZERS["adam"].grid(task)[0]
    runs = [run("adam", adam, seed, [0, 5, 10], [1.0, 0.5, 0.1]) for seed in range(3)]
    runs += [run("sven-gram", sven, 0, [0, 1, 2], [1.0, 0.1, 0.01]),  # reaches 0.1 at 1 s: 10x
             run("sven-gram", sven, 1, [0, 2, 4], [1.0, 0.05, 0.01]),  # at 2 s: 5x
             run("sven-gram", sven, 2, [0, 1], [1.0, float("nan")], status="diverged")]  # never
    comparison = report.versus(runs, task, "adam")
    assert comparison["speedups"] == [10.0, 5.0, None]
    assert comparison["speedup"] == 5.0  # median of 10, 5 and the worst (0)


def test_fisher_rows_sum_to_the_cross_entropy_and_pull_back_its_weighted_gradient():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 5).double()
    x, labels = torch.randn(6, 4, dtype=torch.float64) * 2, torch.tensor([0, 1, 2, 3, 4, 0])
    rows = tasks.fisher_rows(model(x), labels).values
    ce = torch.nn.functional.cross_entropy(model(x), labels, reduction="none")
    torch.testing.assert_close(rows.detach().square().sum(1), ce.detach(), rtol=1e-12, atol=0)
    # J^T rho is each sample's cross-entropy gradient times its row scale w = sqrt(CE / (1 / p_label - 1)).
    pulled = torch.autograd.grad((rows.detach() * rows).sum(), list(model.parameters()))
    p_label = torch.softmax(model(x), 1).gather(1, labels[:, None]).squeeze(1).detach()
    weights = (ce.detach() / (1 / p_label - 1)).sqrt()
    expected = torch.autograd.grad((weights * ce).sum(), list(model.parameters()))
    for a, b in zip(pulled, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
