"""The settings' one definition: defaults, checks, the constructor's signature and the README's table."""

import dataclasses
import inspect
import pathlib

import pytest
import torch

import sven_ext
from sven_ext.settings import DEFAULTS, NAMES, PER_GROUP, STEP_KEYS, Settings, markdown_table


def _model():
    return torch.nn.Linear(3, 2)


def test_readme_table_is_the_generated_one():
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index("<!-- settings table -->") + len("<!-- settings table -->")
    end = readme.index("<!-- end settings table -->")
    assert readme[start:end].strip() == markdown_table()


def test_defaults_and_signature_come_from_settings():
    opt = sven_ext.Sven(_model())
    assert opt.defaults == DEFAULTS.group()
    signature = inspect.signature(sven_ext.Sven)
    for name in NAMES:
        assert signature.parameters[name].default == getattr(DEFAULTS, name), name
    assert set(STEP_KEYS) | set(PER_GROUP) == set(NAMES)


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULTS.k = 3


def test_unknown_keyword_is_named():
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['dampin'\]"):
        sven_ext.Sven(_model(), dampin=0.1)


@pytest.mark.parametrize("name, value, message", [
    ("k", 0, "k must be a positive integer or None, got 0"),
    ("rtol", 1.0, r"rtol must be in \[0, 1\), got 1.0"),
    ("chunk_rows", 0, "chunk_rows must be a positive integer, got 0"),
    ("momentum", 1.5, r"momentum must be in \[0, 1\), got 1.5"),
    ("test_matrix", "uniform", "test_matrix must be one of"),
])
def test_each_setting_is_checked_on_construction_and_in_groups(name, value, message):
    with pytest.raises(ValueError, match=message):
        Settings(**{name: value})
    with pytest.raises(ValueError, match=message):
        sven_ext.Sven(_model(), **{name: value})
    opt = sven_ext.Sven(_model())
    opt.param_groups[0][name] = value  # as a scheduler would
    with pytest.raises(ValueError, match=f"param group 0: {message}"):
        opt.step(lambda: opt.model(torch.ones(4, 3)).square().sum(1))


def test_rank_cap_of_a_row_count():
    assert Settings().truncation.cap(9) == 4
    assert Settings().truncation.cap(1) == 1
    assert Settings(k=3).truncation.cap(100) == 3
    resolved = Settings(damping=4.0, atol=2.0).truncation.for_rows(10, 2.0)
    assert (resolved.k, resolved.damping, resolved.atol) == (5, 1.0, 1.0)
