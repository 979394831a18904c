"""xbn: Batch Normalization for array programmers, written once against the Python Array API.

Runs unchanged on NumPy, CuPy, PyTorch tensors and any standard namespace; the backend is chosen
when a layer is constructed and arrays stay on its device.
"""

from . import distributed, functional, nn, optim
from .backends import BackendUnavailableError
from .fold import fold_batchnorm, fold_into_conv, fold_into_linear, freeze_batchnorm
from .layers import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .lazy import LazyBatchNorm, LazyBatchNorm1d, LazyBatchNorm2d, LazyBatchNorm3d
from .module import BackwardBeforeForwardError, IncompatibleKeys, Module, Parameter
from .renorm import BatchRenorm, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .sync import PeerInputError, SyncBatchNorm, convert_sync_batchnorm

__version__ = "0.1.0"

__all__ = [
    "Module",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "LazyBatchNorm",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "fold_into_linear",
    "fold_into_conv",
    "fold_batchnorm",
    "freeze_batchnorm",
    "Parameter",
    "IncompatibleKeys",
    "BackendUnavailableError",
    "BackwardBeforeForwardError",
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "PeerInputError",
    "distributed",
    "functional",
    "nn",
    "optim",
    "__version__",
]
