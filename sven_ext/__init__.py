"""sven_ext: Sven (Singular Value dEsceNt) for PyTorch, without materialising the Jacobian."""

from . import ops
from ._extension import WITH_CUDA
from .optimizer import Sven
from .residuals import Residuals

__version__ = "0.1.0"
__all__ = ["Sven", "Residuals", "ops", "WITH_CUDA", "__version__"]
