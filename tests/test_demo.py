"""``python -m sven_ext demo`` and ``info``, end to end in a small configuration."""

import io
import subprocess
import sys

import pytest
import torch

import sven_ext
from sven_ext.__main__ import main

# 2 epochs of 40 steps. Measured over seeds 0-9: Sven's validation MSE 5e-6 to 2e-3,
# Adam's 0.97 to 1.1 (its warm-up takes the first epoch): a ratio of at most 2e-3.
SMALL = ["--epochs", "2", "--n-train", "1280", "--n-val", "500", "--quiet"]


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "plots" / "demo.png"
    assert main(["demo", *SMALL, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    with out.open("rb") as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000
    assert str(out.resolve()) in printed
    rows = {line.split()[0]: line.split()[1:] for line in printed.splitlines() if line.startswith(("Sven", "Adam"))}
    assert set(rows) == {"Sven", "Adam"}
    sven_val, adam_val = float(rows["Sven"][1]), float(rows["Adam"][1])
    assert sven_val < 1e-2 and sven_val < 1e-2 * adam_val, printed


def test_demo_is_deterministic(tmp_path):
    from sven_ext.demo import DemoConfig, run_demo

    config = DemoConfig(epochs=1, n_train=320, n_val=100, quiet=True, out=tmp_path / "a.png")
    first = run_demo(config, stream=io.StringIO())
    second = run_demo(config, stream=io.StringIO())
    for a, b in zip(first, second):
        assert a.name == b.name
        assert a.val_loss == b.val_loss and a.train_loss == b.train_loss


def test_demo_leaves_thread_count_alone(tmp_path, capsys):
    before = torch.get_num_threads()
    main(["demo", "--epochs", "1", "--n-train", "64", "--n-val", "10", "--quiet", "--out", str(tmp_path / "p.png")])
    assert torch.get_num_threads() == before


def test_demo_prints_banner_unless_quiet(tmp_path, capsys):
    main(["demo", "--epochs", "1", "--n-train", "64", "--n-val", "10", "--out", str(tmp_path / "p.png")])
    captured = capsys.readouterr()
    assert f"torch {torch.__version__}" in captured.out and "device cpu" in captured.out
    assert "Sven" in captured.err and "Adam" in captured.err  # progress bars


@pytest.mark.parametrize("flags", [["--epochs", "0"], ["--backend", "nope"], ["--k", "-1"]])
def test_demo_rejects_bad_flags(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", *flags])
    assert exit_info.value.code == 2


def test_info(capsys):
    assert main(["info"]) == 0
    printed = capsys.readouterr().out
    assert sven_ext.__version__ in printed and torch.__version__ in printed
    assert ("yes" if sven_ext.WITH_CUDA else "no") in printed


def test_command_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "{demo,info" in capsys.readouterr().err


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "sven_ext", "info"], capture_output=True, text=True, check=True)
    assert sven_ext.__version__ in result.stdout
