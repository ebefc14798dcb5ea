"""Loads the compiled op library, after checking it matches the installed torch."""

import torch

try:
    from . import _build_info
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "sven_ext: the compiled extension is missing. Build it from the source tree with\n"
        "    pip install --no-build-isolation -e .\n"
        "(see README.md, 'Building')."
    ) from exc

if _build_info.TORCH_VERSION != torch.__version__:
    raise ImportError(
        f"sven_ext was compiled against torch {_build_info.TORCH_VERSION} but torch {torch.__version__} "
        "is installed; torch extensions only load into the torch they were built with. Rebuild with\n"
        "    pip install --no-build-isolation --force-reinstall --no-deps sven_ext  (or -e . from source)"
    )

from . import _C  # noqa: E402,F401  (registers the torch.ops.sven_ext ops)

WITH_CUDA = _build_info.WITH_CUDA
