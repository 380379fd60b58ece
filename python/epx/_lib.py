"""Loading libepx and declaring its C API (ctypes mirror of include/epx.h)."""
import ctypes
import os
from ctypes import POINTER, Structure, c_char, c_char_p, c_float, c_int, c_int64, c_size_t, c_uint8, c_void_p

# The header these declarations mirror (EPX_VERSION_CODE of include/epx.h).
HEADER_VERSION_CODE = 100

EPX_UNSET = -0x7FFFFFFF
EPX_UNIQUE_ID_BYTES = 128
EPX_UNIQUE_ID_STRLEN = 96
EPX_MOE_MAX_TOPK = 16

# epx_dtype_t
U8, I32, I64, F16, BF16, F32, FP8_E4M3 = range(7)
DTYPE_NAMES = {U8: "u8", I32: "i32", I64: "i64", F16: "f16", BF16: "bf16", F32: "f32", FP8_E4M3: "fp8_e4m3"}
DTYPE_SIZES = {U8: 1, I32: 4, I64: 8, F16: 2, BF16: 2, F32: 4, FP8_E4M3: 1}

# epx_backend_t
BACKEND_AUTO, BACKEND_CPU, BACKEND_CUDA = 0, 1, 2
# epx_moe_mode_t, epx_scale_format_t
MOE_HIGH_THROUGHPUT, MOE_LOW_LATENCY = 0, 1
SCALE_F32, SCALE_UE8M0 = 0, 1


class Config(Structure):
    _fields_ = [("size", c_size_t), ("version", c_int), ("backend", c_int), ("timeout_ms", c_int), ("device", c_int)]

    @classmethod
    def initializer(cls):
        return cls(ctypes.sizeof(cls), HEADER_VERSION_CODE, EPX_UNSET, EPX_UNSET, EPX_UNSET)


class UniqueId(Structure):
    _fields_ = [("internal", c_char * EPX_UNIQUE_ID_BYTES)]


class CommInfo(Structure):
    _fields_ = [(n, c_int) for n in ("rank", "nranks", "local_rank", "local_size", "host", "num_hosts", "backend")]


class ParamInfo(Structure):
    _fields_ = [(n, c_char_p) for n in ("name", "type", "default_value", "value", "description")]


class MoeConfig(Structure):
    _fields_ = [("size", c_size_t), ("version", c_int)] + [
        (n, c_int) for n in ("hidden", "max_tokens_per_rank", "num_experts", "max_topk", "dtype", "combine_dtype",
                             "index_dtype", "mode", "expert_alignment", "ll_fp8", "scale_format", "num_sms")]

    @classmethod
    def initializer(cls):
        return cls(ctypes.sizeof(cls), HEADER_VERSION_CODE, 0, 0, 0, 0, BF16, EPX_UNSET, I64, MOE_HIGH_THROUGHPUT, 1,
                   0, SCALE_F32, EPX_UNSET)


class DispatchIn(Structure):
    _fields_ = [("x", c_void_p), ("x_scales", c_void_p), ("topk_idx", c_void_p), ("topk_weights", c_void_p),
                ("num_tokens", c_int), ("topk", c_int)]


class DispatchOut(Structure):
    _fields_ = [("recv_x", c_void_p), ("recv_x_scales", c_void_p), ("recv_topk_idx", c_void_p),
                ("recv_topk_weights", c_void_p), ("recv_src_rank", c_void_p), ("recv_src_token", c_void_p),
                ("num_recv_tokens_per_expert", c_void_p), ("capacity", c_int64), ("num_recv_tokens", c_int64),
                ("num_recv_tokens_device", c_void_p)]


class CombineIn(Structure):
    _fields_ = [("y", c_void_p), ("topk_weights", c_void_p)]


class CombineOut(Structure):
    _fields_ = [("out", c_void_p), ("out_topk_weights", c_void_p)]


class LLDispatchIn(Structure):
    _fields_ = [("x", c_void_p), ("topk_idx", c_void_p), ("num_tokens", c_int), ("topk", c_int)]


class LLDispatchOut(Structure):
    _fields_ = [("recv_x", c_void_p), ("recv_x_scales", c_void_p), ("recv_count", c_void_p),
                ("recv_src_rank", c_void_p), ("recv_src_token", c_void_p)]


class LLCombineIn(Structure):
    _fields_ = [("y", c_void_p), ("topk_weights", c_void_p)]


_S = c_int  # epx_status_t
_PROTOTYPES = {
    "epx_get_version": (c_int, []),
    "epx_status_string": (c_char_p, [c_int]),
    "epx_status_name": (c_char_p, [c_int]),
    "epx_get_last_error": (c_char_p, []),
    "epx_dtype_size": (c_size_t, [c_int]),
    "epx_param_count": (c_int, []),
    "epx_param_get": (_S, [c_int, POINTER(ParamInfo)]),
    "epx_get_unique_id": (_S, [POINTER(UniqueId)]),
    "epx_unique_id_to_string": (_S, [POINTER(UniqueId), c_char_p, c_size_t]),
    "epx_unique_id_from_string": (_S, [c_char_p, POINTER(UniqueId)]),
    "epx_comm_init_rank": (_S, [POINTER(c_void_p), c_int, c_int, POINTER(UniqueId), POINTER(Config)]),
    "epx_comm_init_from_env": (_S, [POINTER(c_void_p), POINTER(Config)]),
    "epx_comm_destroy": (_S, [c_void_p]),
    "epx_comm_abort": (_S, [c_void_p]),
    "epx_comm_rank": (_S, [c_void_p, POINTER(c_int)]),
    "epx_comm_size": (_S, [c_void_p, POINTER(c_int)]),
    "epx_comm_info": (_S, [c_void_p, POINTER(CommInfo)]),
    "epx_comm_get_last_error": (c_char_p, [c_void_p]),
    "epx_comm_get_async_error": (_S, [c_void_p, POINTER(c_int)]),
    "epx_mem_alloc": (_S, [c_void_p, c_size_t, POINTER(c_void_p)]),
    "epx_mem_free": (_S, [c_void_p, c_void_p]),
    "epx_barrier": (_S, [c_void_p, c_void_p]),
    "epx_alltoall": (_S, [c_void_p, c_void_p, c_void_p, c_size_t, c_int, c_void_p]),
    "epx_alltoallv": (_S, [c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_int, c_void_p]),
    "epx_moe_create": (_S, [c_void_p, POINTER(MoeConfig), POINTER(c_void_p)]),
    "epx_moe_destroy": (_S, [c_void_p]),
    "epx_moe_device_memory": (_S, [POINTER(MoeConfig), c_int, POINTER(c_int64)]),
    "epx_moe_max_recv_tokens": (_S, [c_void_p, POINTER(c_int64)]),
    "epx_moe_layout": (_S, [c_void_p, c_void_p, c_int, c_int, c_void_p, c_void_p, c_void_p, c_void_p]),
    "epx_moe_dispatch": (_S, [c_void_p, POINTER(DispatchIn), POINTER(DispatchOut), POINTER(c_void_p), c_void_p]),
    "epx_moe_dispatch_cached": (_S, [c_void_p, c_void_p, POINTER(DispatchIn), POINTER(DispatchOut), c_void_p]),
    "epx_moe_combine": (_S, [c_void_p, c_void_p, POINTER(CombineIn), POINTER(CombineOut), c_void_p]),
    "epx_moe_ll_dispatch": (_S, [c_void_p, POINTER(LLDispatchIn), POINTER(LLDispatchOut), POINTER(c_void_p),
                                 c_void_p]),
    "epx_moe_ll_combine": (_S, [c_void_p, c_void_p, POINTER(LLCombineIn), c_void_p, c_void_p]),
    "epx_moe_ll_dispatch_send": (_S, [c_void_p, POINTER(LLDispatchIn), POINTER(LLDispatchOut), POINTER(c_void_p),
                                      c_void_p]),
    "epx_moe_ll_dispatch_recv": (_S, [c_void_p, c_void_p, c_void_p]),
    "epx_moe_ll_combine_send": (_S, [c_void_p, c_void_p, POINTER(LLCombineIn), c_void_p, c_void_p]),
    "epx_moe_ll_combine_recv": (_S, [c_void_p, c_void_p, c_void_p]),
    "epx_moe_handle_destroy": (_S, [c_void_p]),
    "epx_moe_handle_num_recv_tokens": (_S, [c_void_p, POINTER(c_int64)]),
    "epx_bf16_to_float": (c_float, [ctypes.c_uint16]),
    "epx_float_to_bf16": (ctypes.c_uint16, [c_float]),
    "epx_fp8_e4m3_to_float": (c_float, [c_uint8]),
    "epx_float_to_fp8_e4m3": (c_uint8, [c_float]),
}

_LIB_NAMES = ("libepx.so", "libepx.so.0")


def candidate_paths():
    """Where libepx is looked for, in order: $EPX_LIBRARY (a file, or a folder holding it; when set, _load
    looks nowhere else), next to this package (a wheel or `pip install` that bundled it),
    $EPX_BUILD_DIR/lib, the build tree of a source checkout (build/lib beside python/), then the
    system's loader path."""
    paths = []
    env = os.environ.get("EPX_LIBRARY")
    if env:
        if os.path.isdir(env):
            paths += [os.path.join(env, n) for n in _LIB_NAMES]
        else:
            paths.append(env)
    here = os.path.dirname(os.path.abspath(__file__))
    paths += [os.path.join(here, n) for n in _LIB_NAMES]
    repo = os.path.dirname(os.path.dirname(here))
    for build in (os.environ.get("EPX_BUILD_DIR"), os.path.join(repo, "build")):
        if build:
            paths += [os.path.join(build, "lib", n) for n in _LIB_NAMES]
    return paths


def _load():
    paths = candidate_paths()
    if os.environ.get("EPX_LIBRARY"):
        paths = paths[:2 if os.path.isdir(os.environ["EPX_LIBRARY"]) else 1]
    for p in paths:
        if os.path.exists(p):
            return ctypes.CDLL(p), p
    if os.environ.get("EPX_LIBRARY"):
        raise OSError("EPX_LIBRARY=%s: no libepx there" % os.environ["EPX_LIBRARY"])
    try:
        return ctypes.CDLL("libepx.so.0"), "libepx.so.0"
    except OSError:
        pass
    raise OSError("libepx not found: build it (cmake -S . -B build && cmake --build build), pip install the "
                  "package, or set EPX_LIBRARY. Looked in: " + ", ".join(paths))


lib, path = _load()
for _name, (_res, _args) in _PROTOTYPES.items():
    _f = getattr(lib, _name)
    _f.restype = _res
    _f.argtypes = _args
