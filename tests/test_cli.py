"""The command lines that README.md and BENCHMARKS.md give, and the quick ones run for real.

Every ``python -m ...``, ``python bench/...`` and ``torchrun ...`` command in the two
documents runs with ``--help`` appended (modules as ``python -m`` runs them, scripts in a
subprocess): its subcommands, flags and choices must exist as written. The quick entry
points run for real in a temporary directory, where they must leave their results,
without touching the recorded ``bench/results/``.
"""

import os
import re
import runpy
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "BENCHMARKS.md")
# Documented commands that are not entry points of this project's code.
NOT_ENTRY_POINTS = ("-m pytest", "-c ", "setup.py")


def _documented_commands():
    """(document, command) for every command line in the documents' code."""
    found = []
    for name in DOCS:
        text = (ROOT / name).read_text()
        fenced = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
        prose = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
        lines = [line for block in fenced for line in block.splitlines()]
        lines += [line for line in prose.splitlines() if line.startswith("    ")]
        spans = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]
        for candidate in lines + spans:
            for part in candidate.split("#")[0].split("→")[0].split("&&"):
                match = re.match(r"(?:\w+=\S+ )*(?:\.venv/bin/)?(?:python|torchrun)\s.*", part.strip())
                if match and not any(skip in match.group(0) for skip in NOT_ENTRY_POINTS):
                    found.append((name, match.group(0).strip()))
    return sorted(set(found))


def _argv(command):
    """(module or script, arguments): env settings, ``.venv/bin/`` and torchrun's own flags dropped,
    ``[--flag]`` optional parts included, ``<placeholder>`` parts left out."""
    words = [w for w in shlex.split(command.replace("[", "").replace("]", "")) if not re.fullmatch(r"\w+=\S+", w)]
    words = [w for w in words if not (w.startswith("<") and w.endswith(">"))]
    program = words.pop(0).removeprefix(".venv/bin/")
    if program == "torchrun":
        words = words[words.index("-m"):]
    assert program in ("python", "torchrun"), command
    if words[0] == "-m":
        return ("module", words[1]), words[2:]
    return ("script", words[0]), words[1:]


COMMANDS = _documented_commands()


def test_the_documents_have_commands():
    modules = {_argv(command)[0] for _, command in COMMANDS}
    for expected in [("module", "sven_ext"), ("module", "sven_ext.examples.poisson"),
                     ("module", "sven_ext.examples.distributed_regression")]:
        assert expected in modules


@pytest.mark.parametrize("doc, command", COMMANDS, ids=[f"{doc}:{cmd}" for doc, cmd in COMMANDS])
def test_documented_command_parses(doc, command, monkeypatch, capsys):
    (kind, target), args = _argv(command)
    if kind == "script":
        # Scripts in bench/ are run as the documents say, from the repository root.
        done = subprocess.run([sys.executable, target, *args, "--help"], cwd=ROOT, env=_env(),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{command} --help:\n{done.stderr[-2000:]}"
        assert "usage:" in done.stdout
        return
    monkeypatch.setattr(sys, "argv", [target, *args, "--help"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is already imported
        with pytest.raises(SystemExit) as exit_:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    assert exit_.value.code in (0, None), f"{command} --help exited with {exit_.value.code}"
    assert "usage:" in capsys.readouterr().out


def _env():
    # The same sven_ext as the tests import (this tree), whether or not it is installed.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _recorded_results():
    """Name -> (size, mtime) of every file under bench/results."""
    return {p.relative_to(ROOT).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted((ROOT / "bench" / "results").rglob("*")) if p.is_file()}


def _run(tmp_path, *args, timeout=120):
    before = _recorded_results()
    done = subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    assert _recorded_results() == before, "bench/results/ changed"
    return done.stdout


def test_info(tmp_path):
    out = _run(tmp_path, "sven_ext", "info")
    assert "CUDA kernels built" in out and "GPU available" in out


def test_demo_writes_its_plot_in_the_current_directory(tmp_path):
    out = _run(tmp_path, "sven_ext", "demo", "--epochs", "1", "--quiet")
    assert "Sven" in out and "Adam" in out
    assert (tmp_path / "sven_demo.png").stat().st_size > 0


def test_bench_convergence_report_plots_write_here(tmp_path):
    out = _run(tmp_path, "sven_ext", "bench", "convergence", "--quick", "--tasks", "regression_1d",
               "--optimizers", "sven-gram", "adam", "--no-progress")
    assert "results: convergence_quick.jsonl" in out
    results = tmp_path / "convergence_quick.jsonl"
    assert len(results.read_text().splitlines()) > 0
    assert "Adam" in _run(tmp_path, "sven_ext", "bench", "report", "convergence_quick.jsonl", "--quick")
    out = _run(tmp_path, "sven_ext", "bench", "plots", "convergence_quick.jsonl", "--quick")
    written = sorted(p.name for p in tmp_path.glob("*.png"))
    assert written and all(f"wrote {name}" in out for name in written)


def test_poisson_quick_writes_here(tmp_path):
    out = _run(tmp_path, "sven_ext.examples.poisson", "--quick", "--no-progress")
    assert "wrote poisson.json and poisson.png" in out
    assert (tmp_path / "poisson.json").stat().st_size > 0 and (tmp_path / "poisson.png").stat().st_size > 0


@pytest.mark.slow
def test_bench_scaling_quick_writes_here(tmp_path):
    out = _run(tmp_path, "sven_ext", "bench", "scaling", "--quick", "--no-progress", "--repeats", "1", timeout=900)
    assert "results: scaling_quick.jsonl" in out and (tmp_path / "scaling_quick.jsonl").stat().st_size > 0
