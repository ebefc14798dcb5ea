"""The settings of a Sven optimizer, defined once (DESIGN.md section 1).

:class:`Settings` is the one definition of every setting: its name, default, meaning and valid
range. The optimizer's ``defaults``, the param-group checks (constructor, ``add_param_group``,
``load_state_dict``, a scheduler's changes), the settings every group must share, and the
README's table (:func:`markdown_table`, checked by a test) all derive from it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from .backends import check_backend_name
from .backends.sketch import DEFAULT_POWER_ITERATIONS, TEST_MATRICES
from .linalg import DEFAULT_ATOL, Truncation
from .safeguard import check_safeguard

FUNCTIONAL_MODES = ("exact", "randomized")
RMSPROP_MODES = (None, "before", "after")


def _setting(default, doc: str):
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class Settings:
    """Every setting of a Sven step; built from a param group, validated on construction.

    Each field's meaning is in its ``metadata["doc"]`` (and in the README's table). Only ``lr``
    and ``weight_decay`` may differ between param groups (:data:`PER_GROUP`): one step solves
    for every group at once.

    Raises:
        ValueError: on construction, naming the setting, the accepted range and the value.
    """

    lr: float = _setting(0.1, "step size, read from `param_groups[i][\"lr\"]` at every step (schedulers work)")
    k: int | None = _setting(None, "rank cap: at most `k` singular values are kept; `None`: half the rows of "
                                   "each step (at least 1), as the paper suggests")
    rtol: float = _setting(1e-3, "keep singular values `s_j > rtol * s_0`")
    kappa: float = _setting(2.0, "residuals are `loss ** (kappa / 2)` (2: the loss itself; 1: its square "
                                 "root); ignored for `sven_ext.Residuals`")
    backend: str = _setting("auto", "`\"auto\"`, `\"dense\"`, `\"gram\"`, `\"sketch\"` or `\"functional\"`")
    atol: float = _setting(DEFAULT_ATOL, "absolute singular-value floor")
    solve_dtype: torch.dtype = _setting(torch.float64, "dtype of the linear algebra (`cond(K) = cond(J)^2`)")
    chunk_rows: int = _setting(64, "rows handled at once where a backend chunks over rows")
    oversampling: int = _setting(10, "sketch: columns beyond `k` (`s = min(k + oversampling, R)`)")
    power_iterations: int = _setting(DEFAULT_POWER_ITERATIONS, "sketch: products with `J J^T` before the "
                                                               "core (two passes over the factors each)")
    test_matrix: str = _setting("gaussian", "sketch: `\"gaussian\"`, `\"rademacher\"` or `\"khatri_rao\"`")
    warm_start: bool = _setting(False, "sketch: join the previous step's `U_k` to the sketch (same row count)")
    seed: int = _setting(0, "key of the sketch's and `param_fraction`'s draws, with the step counter")
    max_memory: int | None = _setting(None, "bytes a step may use beyond the model; `None`: the free memory")
    functional_mode: str = _setting("exact", "functional backend: `\"exact\"` (chunked Gram) or "
                                             "`\"randomized\"` (a sketch)")
    damping: float = _setting(0.0, "Tikhonov `lambda`: each kept `1/s^2` becomes `1/(s^2 + lambda)`")
    weight_decay: float = _setting(0.0, "decoupled: `p -= lr * weight_decay * p` (per param group)")
    microbatch_size: int | None = _setting(None, "rows are the mean losses of groups of `m` samples "
                                                 "(`m` divides `B`)")
    param_fraction: float = _setting(1.0, "each step moves a random subset of about this fraction of the "
                                          "elements")
    mask_by_block: bool = _setting(True, "`param_fraction`'s subset: whole tensors (`True`) or elements of "
                                         "every tensor")
    rmsprop: str | None = _setting(None, "`None`, `\"before\"` (solve for `J S`, `S = (sqrt(v) + eps)^(-1/2)`) "
                                         "or `\"after\"` (divide the direction by `sqrt(v) + eps`)")
    rmsprop_beta: float = _setting(0.99, "decay of the running mean `v` of squared directions")
    rmsprop_eps: float = _setting(1e-8, "added to `sqrt(v)`")
    momentum: float = _setting(0.0, "heavy-ball momentum on the final direction")
    variable_k: bool = _setting(False, "apply the kept components in descending order while the batch loss "
                                       "keeps falling")
    safeguard: str | None = _setting("backtracking", "`\"backtracking\"`: each step is checked on the batch loss "
                                                    "before it is applied and halved while the loss falls by less than "
                                                    "1% of what the linearised model predicts (one extra forward pass "
                                                    "per step, one per halving; with `momentum` or `rmsprop` the loss "
                                                    "must only fall; not with `variable_k`, which applies components "
                                                    "only while the loss falls); `None`: the bare step")

    def __post_init__(self) -> None:
        _check_non_negative("lr", self.lr)
        k = self.k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"k must be a positive integer or None, got {k!r}")
        rtol = self.rtol
        if isinstance(rtol, bool) or not (isinstance(rtol, (int, float)) and 0 <= rtol < 1):
            raise ValueError(f"rtol must be in [0, 1), got {rtol!r}")
        check_positive("kappa", self.kappa)
        atol = self.atol
        if isinstance(atol, bool) or not (isinstance(atol, (int, float)) and atol >= 0):
            raise ValueError(f"atol must be >= 0, got {atol!r}")
        if self.solve_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"solve_dtype must be torch.float32 or torch.float64, got {self.solve_dtype}")
        _check_count("chunk_rows", self.chunk_rows, minimum=1, article="a positive integer")
        _check_count("oversampling", self.oversampling, minimum=0)
        _check_count("power_iterations", self.power_iterations, minimum=0)
        _check_choice("test_matrix", self.test_matrix, TEST_MATRICES)
        for name in ("warm_start", "mask_by_block", "variable_k"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.max_memory is not None:
            _check_count("max_memory", self.max_memory, minimum=1)
        _check_choice("functional_mode", self.functional_mode, FUNCTIONAL_MODES)
        _check_non_negative("damping", self.damping)
        _check_non_negative("weight_decay", self.weight_decay)
        if self.microbatch_size is not None:
            _check_count("microbatch_size", self.microbatch_size, minimum=1)
        fraction = self.param_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"param_fraction must be in (0, 1], got {fraction!r}")
        _check_choice("rmsprop", self.rmsprop, RMSPROP_MODES)
        for name in ("rmsprop_beta", "momentum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        check_positive("rmsprop_eps", self.rmsprop_eps)
        if self.variable_k and (self.rmsprop is not None or self.momentum):
            raise ValueError("variable_k chooses how many components of the Sven step to apply; it does not "
                             "combine with rmsprop or momentum")
        check_safeguard(self.safeguard)
        check_backend_name(self.backend)

    @classmethod
    def from_group(cls, group: dict, index: int) -> Settings:
        """The settings of param group ``index``, checked.

        Raises:
            ValueError: ``param group i: `` and the setting's message, or the settings the group lacks.
        """
        missing = [name for name in NAMES if name not in group]
        if missing:
            raise ValueError(f"param group {index} lacks the setting(s) {missing}: was it saved by another "
                             "optimizer?")
        try:
            return cls(**{name: group[name] for name in NAMES})
        except ValueError as error:
            raise ValueError(f"param group {index}: {error}") from None

    def group(self) -> dict:
        """The settings as a param group's entries (torch.optim's ``defaults``)."""
        return {name: getattr(self, name) for name in NAMES}

    @property
    def truncation(self) -> Truncation:
        return Truncation(self.k, self.rtol, self.atol, self.damping)

    @property
    def plain(self) -> bool:
        """Whether the update is the bare Sven step (no RMSProp, momentum, weight decay or variable rank)."""
        return self.rmsprop is None and not self.momentum and not self.weight_decay and not self.variable_k




def markdown_table() -> str:
    """The README's table of settings: name, default, meaning."""
    lines = ["| setting | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(Settings):
        lines.append(f"| `{f.name}` | `{f.default!r}` | {f.metadata['doc']} |")
    return "\n".join(lines)


def _check_count(name: str, value, minimum: int, article: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be {article or f'an integer >= {minimum}'}, got {value!r}")


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_non_negative(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_positive(name: str, value) -> None:
    """Raises ``ValueError`` unless ``value`` is a positive finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


NAMES = tuple(f.name for f in dataclasses.fields(Settings))
PER_GROUP = ("lr", "weight_decay")
# One step solves for every group at once: every other setting must be the same in all groups.
STEP_KEYS = tuple(name for name in NAMES if name not in PER_GROUP)
DEFAULTS = Settings()
