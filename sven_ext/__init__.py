"""sven_ext: Sven (Singular Value dEsceNt) for PyTorch, without materialising the Jacobian."""

from . import ops
from ._extension import WITH_CUDA

__version__ = "0.1.0"
__all__ = ["ops", "WITH_CUDA", "__version__"]
