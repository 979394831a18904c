"""xbn: Batch Normalization for array programmers, written once against the Python Array API.

Runs unchanged on NumPy, CuPy, PyTorch tensors and any standard namespace; the backend is chosen
when a layer is constructed and arrays stay on its device.
"""

from . import functional, optim
from .backends import BackendUnavailableError
from .layers import (
    BackwardBeforeForwardError,
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    Parameter,
)

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "Parameter",
    "BackendUnavailableError",
    "BackwardBeforeForwardError",
    "functional",
    "optim",
    "__version__",
]
