"""epx: expert-parallel all-to-all (MoE dispatch/combine, alltoall/alltoallv) over libepx.

numpy arrays on the CPU backend, torch tensors on either backend (CUDA tensors run on the current
torch stream). Every failure raises an EpxError subclass carrying the epx status and message.
`epx.deep_ep` is a drop-in front for code written against DeepEP's `deep_ep.Buffer`."""
from . import _lib
from ._lib import BF16, F16, F32, FP8_E4M3, I32, I64, U8
from ._errors import (AbortedError, CudaError, EpxError, InternalError, InvalidArgumentError, InvalidUsageError,
                      MismatchError, MpiError, NcclError, OutOfMemoryError, PeerFailureError, PeerTimeoutError,
                      RemoteInvalidError, SystemCallError, UnsupportedError, status_name, status_string)
from ._comm import Comm, CommInfo, get_unique_id, params, rank_env, version
from ._moe import MOE_COPY_ENGINES, DispatchResult, Handle, LLDispatchResult, Moe

library_path = _lib.path
__version__ = "%d.%d.%d" % version()

__all__ = ["Comm", "CommInfo", "Moe", "Handle", "DispatchResult", "LLDispatchResult", "get_unique_id", "params",
           "rank_env", "version", "library_path", "EpxError", "InvalidArgumentError", "InvalidUsageError",
           "MismatchError", "RemoteInvalidError", "UnsupportedError", "OutOfMemoryError", "SystemCallError",
           "PeerTimeoutError", "PeerFailureError", "AbortedError", "CudaError", "NcclError", "MpiError",
           "InternalError", "status_name", "status_string", "U8", "I32", "I64", "F16", "BF16", "F32", "FP8_E4M3",
           "MOE_COPY_ENGINES"]
