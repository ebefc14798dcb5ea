"""sven_ext: Sven (Singular Value dEsceNt) for PyTorch, without materialising the Jacobian."""

from . import ops
from ._extension import WITH_CUDA
from .backends.gram import gram_matrix
from .optimizer import Sven
from .polyak import PolyakSGD
from .residuals import Residuals

__version__ = "0.1.0"
__all__ = ["Sven", "PolyakSGD", "Residuals", "gram_matrix", "ops", "WITH_CUDA", "__version__"]
