"""Shared fixtures (the device axis of the kernel tests) and the hypothesis profiles.

With ``CI`` set in the environment the property tests run derandomized (profile
``ci``): every run draws the same examples, so CI passes or fails the same way each
time. Elsewhere each run explores new examples from a fresh seed, printed in the
pytest header; ``--hypothesis-seed=N`` reruns the draws of seed N.
"""

import os
import random

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True, deadline=None)
settings.register_profile("dev", print_blob=True, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Runs before hypothesis's own hook, which applies --hypothesis-seed to every test.
    if not settings.default.derandomize and config.getoption("hypothesis_seed") is None:
        config.option.hypothesis_seed = str(random.SystemRandom().randrange(2**32))


def _hypothesis_line(config):
    profile = settings.get_current_profile_name()
    if settings.default.derandomize:
        return f"hypothesis: profile {profile!r}, derandomized (the same examples every run)"
    seed = config.getoption("hypothesis_seed")
    return f"hypothesis: profile {profile!r}, seed {seed} (rerun these draws with --hypothesis-seed={seed})"


def pytest_report_header(config):
    """The hypothesis profile, and the seed that reproduces this run's draws."""
    return _hypothesis_line(config)


def pytest_terminal_summary(terminalreporter, config):
    # -q hides the header; the seed must still be on record.
    if config.option.verbose < 0:
        terminalreporter.write_line(_hypothesis_line(config))


@pytest.fixture(
    params=[
        "cpu",
        pytest.param("cuda", marks=pytest.mark.cuda),
    ]
)
def device(request):
    """``"cpu"``, and ``"cuda"`` when a GPU is visible (skipped otherwise)."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")
    return request.param
