"""Arrays the library reads and writes: numpy arrays (CPU backend) and torch tensors (CPU or CUDA).

Only what the bindings need: the data pointer, the epx dtype, the shape, contiguity, where the
memory lives, the current CUDA stream, and allocating a new array like another one."""
import sys

from . import _lib

try:
    import numpy as np
except ImportError:  # torch-only installs
    np = None

_NP_DTYPES = {"float32": _lib.F32, "float16": _lib.F16, "int32": _lib.I32, "int64": _lib.I64, "uint8": _lib.U8,
              "int8": _lib.U8, "bool": _lib.U8,
              "uint16": _lib.BF16,  # raw bf16 bits (numpy has no bf16; ml_dtypes' bfloat16 maps too)
              "bfloat16": _lib.BF16, "float8_e4m3fn": _lib.FP8_E4M3}
_TORCH_NAMES = {_lib.F32: "float32", _lib.F16: "float16", _lib.BF16: "bfloat16", _lib.FP8_E4M3: "float8_e4m3fn",
                _lib.I32: "int32", _lib.I64: "int64", _lib.U8: "uint8"}

_DTYPE_ALIASES = {"bf16": _lib.BF16, "bfloat16": _lib.BF16, "f16": _lib.F16, "fp16": _lib.F16, "float16": _lib.F16,
                  "half": _lib.F16, "f32": _lib.F32, "fp32": _lib.F32, "float32": _lib.F32, "float": _lib.F32,
                  "fp8": _lib.FP8_E4M3, "fp8_e4m3": _lib.FP8_E4M3, "float8_e4m3fn": _lib.FP8_E4M3,
                  "i32": _lib.I32, "int32": _lib.I32, "i64": _lib.I64, "int64": _lib.I64, "u8": _lib.U8,
                  "uint8": _lib.U8}


def _torch():
    return sys.modules.get("torch")


def is_torch(a):
    t = _torch()
    return t is not None and isinstance(a, t.Tensor)


def epx_dtype(d):
    """An epx dtype code from an int code, a name ("bf16"), a numpy dtype or a torch dtype."""
    if isinstance(d, int):
        if d not in _lib.DTYPE_SIZES:
            raise ValueError("unknown epx dtype %d" % d)
        return d
    if isinstance(d, str):
        if d.lower() not in _DTYPE_ALIASES:
            raise ValueError("unknown dtype name %r" % d)
        return _DTYPE_ALIASES[d.lower()]
    t = _torch()
    if t is not None and isinstance(d, t.dtype):
        name = str(d).replace("torch.", "")
        if name == "bool":
            return _lib.U8
        if name in _DTYPE_ALIASES:
            return _DTYPE_ALIASES[name]
        raise ValueError("torch dtype %s has no epx equivalent" % d)
    if np is not None:
        name = np.dtype(d).name
        if name in _NP_DTYPES:
            return _NP_DTYPES[name]
    raise ValueError("dtype %r has no epx equivalent" % (d,))


def dtype_of(a):
    return epx_dtype(a.dtype)


def ptr(a):
    """Address of the first element (None for None)."""
    if a is None:
        return None
    if is_torch(a):
        return a.data_ptr() or None
    return a.__array_interface__["data"][0] or None


def contiguous(a):
    return a.is_contiguous() if is_torch(a) else a.flags.c_contiguous


def writable(a):
    """False for a read-only numpy array (e.g. over a bytes object), which epx must not write. Never
    raises: what is not an array at all is reported by the other checks (a collective call's checks
    must not raise before it fails on every rank)."""
    if is_torch(a):
        return True
    return bool(getattr(getattr(a, "flags", None), "writeable", True))


def is_cuda(a):
    return is_torch(a) and a.is_cuda


def numel(a):
    return a.numel() if is_torch(a) else a.size


def itemsize(a):
    return a.element_size() if is_torch(a) else a.itemsize


def shape(a):
    return tuple(a.shape)


def _np_dtype(code):
    if code in (_lib.BF16, _lib.FP8_E4M3):
        try:
            import ml_dtypes
            return ml_dtypes.bfloat16 if code == _lib.BF16 else ml_dtypes.float8_e4m3fn
        except ImportError:
            return np.uint16 if code == _lib.BF16 else np.uint8  # raw bits
    return {_lib.F32: np.float32, _lib.F16: np.float16, _lib.I32: np.int32, _lib.I64: np.int64,
            _lib.U8: np.uint8}[code]


def empty(like, shape_, code):
    """A new contiguous array of epx dtype `code`, of the same kind and device as `like`."""
    if is_torch(like):
        t = _torch()
        return t.empty(shape_, dtype=getattr(t, _TORCH_NAMES[code]), device=like.device)
    return np.empty(shape_, dtype=_np_dtype(code))


def zeros(like, shape_, code):
    if is_torch(like):
        t = _torch()
        return t.zeros(shape_, dtype=getattr(t, _TORCH_NAMES[code]), device=like.device)
    return np.zeros(shape_, dtype=_np_dtype(code))


def current_stream(like):
    """The CUDA stream (as an address) of the current torch stream of `like`'s device, else None."""
    if is_cuda(like):
        return _torch().cuda.current_stream(like.device).cuda_stream or None
    return None


def stream_of(stream, like):
    """The stream a call on `like` is enqueued on: `stream` (stream_handle), else the current torch
    stream of like's device (None on the CPU)."""
    return stream_handle(stream) if stream is not None else current_stream(like)


def stream_handle(s):
    """A stream argument as an address: None, an int, or a torch.cuda.Stream. TypeError for anything
    else (before any collective call starts, so the caller can make every rank fail together)."""
    h = getattr(s, "cuda_stream", s)
    if h is not None and (isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < 2**64):
        raise TypeError("stream must be None, an int (a cudaStream_t) or a torch.cuda.Stream, not %r" % (s,))
    return h or None
