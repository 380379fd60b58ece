"""Every epx status as a Python exception carrying the status and the library's message."""
from . import _lib

SUCCESS, IN_PROGRESS = 0, 1
ERR_INVALID_ARGUMENT, ERR_INVALID_USAGE, ERR_MISMATCH, ERR_REMOTE_INVALID = -1, -2, -3, -4
ERR_UNSUPPORTED, ERR_NO_MEMORY, ERR_SYSTEM, ERR_TIMEOUT, ERR_PEER_FAILURE, ERR_ABORTED = -5, -6, -7, -8, -9, -10
ERR_CUDA, ERR_NCCL, ERR_MPI, ERR_INTERNAL = -11, -12, -13, -14

# Statuses after which nothing happened on any rank and the communicator is still usable.
_RECOVERABLE = (ERR_INVALID_ARGUMENT, ERR_INVALID_USAGE, ERR_MISMATCH, ERR_REMOTE_INVALID, ERR_UNSUPPORTED)


class EpxError(RuntimeError):
    """A failed epx call. Attributes: `status` (the epx_status_t value), `name` ("EPX_ERR_TIMEOUT"),
    `message` (the library's detailed message) and `recoverable` (True when nothing happened and the
    communicator can still be used; False when it is broken and must be aborted and recreated)."""

    status = None

    def __init__(self, status, message=""):
        self.status = int(status)
        self.name = status_name(self.status)
        message = message or status_string(self.status)
        if message.startswith(self.name + ": "):
            message = message[len(self.name) + 2:]
        self.message = message
        self.recoverable = self.status in _RECOVERABLE
        super().__init__("%s: %s" % (self.name, self.message))

    def __reduce__(self):  # pickling (multiprocessing, concurrent.futures): rebuild from status and message
        return self.__class__, (self.status, self.message)


class InvalidArgumentError(EpxError, ValueError):
    status = ERR_INVALID_ARGUMENT


class InvalidUsageError(EpxError):
    status = ERR_INVALID_USAGE


class MismatchError(EpxError, ValueError):
    status = ERR_MISMATCH


class RemoteInvalidError(EpxError):
    status = ERR_REMOTE_INVALID


class UnsupportedError(EpxError, NotImplementedError):
    status = ERR_UNSUPPORTED


class OutOfMemoryError(EpxError, MemoryError):
    status = ERR_NO_MEMORY


class SystemCallError(EpxError, OSError):
    status = ERR_SYSTEM


class PeerTimeoutError(EpxError, TimeoutError):
    status = ERR_TIMEOUT


class PeerFailureError(EpxError):
    status = ERR_PEER_FAILURE


class AbortedError(EpxError):
    status = ERR_ABORTED


class CudaError(EpxError):
    status = ERR_CUDA


class NcclError(EpxError):
    status = ERR_NCCL


class MpiError(EpxError):
    status = ERR_MPI


class InternalError(EpxError):
    status = ERR_INTERNAL


_BY_STATUS = {cls.status: cls for cls in (
    InvalidArgumentError, InvalidUsageError, MismatchError, RemoteInvalidError, UnsupportedError, OutOfMemoryError,
    SystemCallError, PeerTimeoutError, PeerFailureError, AbortedError, CudaError, NcclError, MpiError,
    InternalError)}


def status_name(status):
    return _lib.lib.epx_status_name(int(status)).decode()


def status_string(status):
    return _lib.lib.epx_status_string(int(status)).decode()


def error(status, message=""):
    """The exception for `status` (an EpxError subclass)."""
    return _BY_STATUS.get(int(status), EpxError)(status, message)


def check(status, comm=None):
    """Raise the exception of a failed status, with the communicator's (or this thread's) last message."""
    if status == SUCCESS:
        return
    if comm:
        msg = _lib.lib.epx_comm_get_last_error(comm)
    else:
        msg = _lib.lib.epx_get_last_error()
    raise error(status, msg.decode(errors="replace") if msg else "")
