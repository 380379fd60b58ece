"""MoE dispatch / combine over an epx communicator (semantics: include/epx.h)."""
import weakref
from collections import namedtuple
from ctypes import byref, c_int64, c_void_p

from . import _arrays as A
from . import _lib
from ._comm import cuda_built
from ._errors import check, InvalidArgumentError, InvalidUsageError

L = _lib.lib

DispatchResult = namedtuple("DispatchResult", "recv_x recv_x_scales recv_topk_idx recv_topk_weights recv_src_rank "
                                              "recv_src_token num_recv_tokens_per_expert handle")
LLDispatchResult = namedtuple("LLDispatchResult", "recv_x recv_x_scales recv_count recv_src_rank recv_src_token "
                                                  "handle")
_MODES = {"ht": _lib.MOE_HIGH_THROUGHPUT, "high_throughput": _lib.MOE_HIGH_THROUGHPUT,
          "ll": _lib.MOE_LOW_LATENCY, "low_latency": _lib.MOE_LOW_LATENCY}
_SCALES = {"f32": _lib.SCALE_F32, "float32": _lib.SCALE_F32, "ue8m0": _lib.SCALE_UE8M0}
# Each collective and the one of the other mode that stands in for it (see Moe._fail).
_STAND_IN = {"dispatch": "ll_dispatch", "dispatch_cached": "ll_dispatch", "combine": "ll_combine",
             "ll_dispatch": "dispatch", "ll_combine": "combine"}
_MODE_NAMES = {_lib.MOE_HIGH_THROUGHPUT: "high-throughput", _lib.MOE_LOW_LATENCY: "low-latency"}
# num_sms value: on the CUDA backend of one host, the high-throughput payload moves with copy
# engines (EPX_MOE_COPY_ENGINES in epx.h; EPX_CUDA_SMS=0 does the same).
MOE_COPY_ENGINES = -1
# numpy has no bf16: what to pass instead, said when a bf16 input has another dtype.
_BF16_HINT = (" (numpy has no bf16: pass the raw bits as uint16, e.g. from ml_dtypes' bfloat16 array .view(np.uint16),"
              " or an ml_dtypes.bfloat16 array; torch: torch.bfloat16)")


class Handle:
    """The routing of one dispatch: combine and cached dispatches reuse it. Freed with close() or when
    garbage-collected."""

    def __init__(self, moe, h, mode, num_tokens, topk, num_recv_tokens):
        self._h = h
        self.moe = moe
        self.mode = mode
        self.num_tokens = num_tokens
        self.topk = topk
        self.num_recv_tokens = num_recv_tokens
        moe._handles.add(self)

    def close(self):
        """Free the handle. Raises (and keeps it) while a low-latency send on it is pending: receive it
        first."""
        if self._h:
            check(L.epx_moe_handle_destroy(self._h), self.moe.comm._h if self.moe.comm._h else None)
            self._h = c_void_p()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class Moe:
    """A MoE context (collective to create): one configuration of hidden size, experts, top-k, dtypes
    and mode. mode "ht" (high-throughput, rank-major: dispatch, dispatch_cached, combine) or "ll"
    (low-latency, expert-major, static shapes: ll_dispatch, ll_combine); a call of the other mode raises
    InvalidUsageError, on one rank only too, where it fails the peers' call (RemoteInvalidError).
    dtype / combine_dtype / index_dtype take epx names ("bf16", "f16", "f32", "fp8_e4m3", "i32", "i64"),
    numpy or torch dtypes."""

    def __init__(self, comm, hidden, num_experts, max_tokens_per_rank, max_topk, *, dtype="bf16",
                 combine_dtype=None, index_dtype="int64", mode="ht", expert_alignment=1, ll_fp8=False,
                 scale_format="f32", num_sms=None):
        self.comm = comm
        self._h = c_void_p()
        self._dead = []  # after destroy(): the C context until its deferred release (see _fail)
        self._handles = weakref.WeakSet()

        def config():
            cfg = _lib.MoeConfig.initializer()
            cfg.hidden, cfg.num_experts = int(hidden), int(num_experts)
            cfg.max_tokens_per_rank, cfg.max_topk = int(max_tokens_per_rank), int(max_topk)
            cfg.dtype = A.epx_dtype(dtype)
            if combine_dtype is not None:
                cfg.combine_dtype = A.epx_dtype(combine_dtype)
            cfg.index_dtype = A.epx_dtype(index_dtype)
            cfg.mode = _MODES[mode] if isinstance(mode, str) else int(mode)
            cfg.expert_alignment = int(expert_alignment)
            cfg.ll_fp8 = int(bool(ll_fp8))
            cfg.scale_format = _SCALES[scale_format] if isinstance(scale_format, str) else int(scale_format)
            if num_sms is not None:
                cfg.num_sms = int(num_sms)
            return None, cfg

        # an argument only Python rejects: the creation fails on every rank (this one with no output)
        cfg = comm._collective(config, Moe._create_fail(comm))
        check(comm._run(lambda: L.epx_moe_create(comm._ptr(), byref(cfg), byref(self._h))), comm._h)
        comm._children = getattr(comm, "_children", weakref.WeakSet())
        comm._children.add(self)
        self.hidden, self.num_experts = cfg.hidden, cfg.num_experts
        self.max_tokens_per_rank, self.max_topk = cfg.max_tokens_per_rank, cfg.max_topk
        self.nranks = comm.size
        self.num_local_experts = cfg.num_experts // comm.size
        self.dtype, self.index_dtype = cfg.dtype, cfg.index_dtype
        self.combine_dtype = cfg.combine_dtype if combine_dtype is not None else (
            _lib.BF16 if cfg.dtype == _lib.FP8_E4M3 else cfg.dtype)
        self.mode, self.expert_alignment = cfg.mode, cfg.expert_alignment
        self.ll_fp8, self.scale_format = bool(cfg.ll_fp8), cfg.scale_format
        self.scale_cols = (cfg.hidden + 127) // 128
        self.ll_slots = comm.size * cfg.max_tokens_per_rank

    def destroy(self):
        """Release the context and its live handles (local). The context itself is released after the
        communicator's next collective (see Comm._defer), when no peer can still be reading it. Raises,
        and keeps the context, while a low-latency send on one of its handles is pending.

        A collective call on a destroyed context (made by its peers, where it was destroyed on one rank
        only) raises InvalidArgumentError. Until that release the call still meets the peers' and fails
        there too, at once (RemoteInvalidError; the call releases the context). After it, this rank has
        nothing left to join their call with: the error is unrecoverable (with peers), since any peer
        that makes the call waits for this rank until its timeout; abort the communicator (leaving a
        `with comm` block with the error does) and they fail at once (PeerFailureError)."""
        for h in list(self._handles):
            h.close()
        if self._h:
            self._dead = [self._h]
            self.comm._defer(_release, self._dead)
            self._h = c_void_p()

    def __del__(self):
        try:
            self.destroy()
        except Exception:
            pass

    def _ptr(self):
        if not self._h:
            raise InvalidArgumentError(-1, "the MoE context was destroyed")
        return self._h

    def max_recv_tokens(self):
        rows = c_int64()
        check(L.epx_moe_max_recv_tokens(self._ptr(), byref(rows)))
        return rows.value

    # ---- argument checks that only Python can make ------------------------------------------

    def _check(self, checks):
        """First failing (condition, message) or None."""
        for ok, msg in checks:
            if not ok:
                return msg
        return None

    def _call(self, problem, op, prepare):
        """Comm._collective for the call `op` (see _fail) whose checks found `problem` (None: prepare()
        runs), on a destroyed context too (see destroy). A call of the other mode than the context's
        raises InvalidUsageError, after failing the call of this mode that stands in for it (see _fail),
        which peers that make a valid call in step with it make too."""
        if not self._h:
            if not self._dead:
                e = InvalidArgumentError(-1, "the MoE context was destroyed and, by a later collective, released: "
                                             "this rank cannot join the call, and peers that make it wait for it "
                                             "until their timeout (abort the communicator)")
                e.recoverable = self.comm.size == 1
                raise e
            problem = "the MoE context was destroyed"
        mode = _lib.MOE_LOW_LATENCY if op.startswith("ll_") else _lib.MOE_HIGH_THROUGHPUT

        def checked():
            if mode != self.mode:  # first: the other checks assume this mode
                raise InvalidUsageError(-2, "%s is a %s call, but this MoE context was created for %s mode" % (
                    op, _MODE_NAMES[mode], _MODE_NAMES.get(self.mode, self.mode)))
            return problem, None if problem else prepare()
        return self.comm._collective(checked, self._fail(op))

    def _fail(self, op):
        """Comm._collective's fail() for the collective `op` ("dispatch", "dispatch_cached", "combine",
        "ll_dispatch" or "ll_combine"; one of the other mode stands for this mode's call of the same
        kind, a dispatch or a combine): the call with arguments the library rejects, so that it fails
        on every rank and writes nothing. It runs on the live context or on a destroyed one until its
        deferred release; after that it raises (nothing to join)."""
        if op.startswith("ll_") != (self.mode == _lib.MOE_LOW_LATENCY):
            op = _STAND_IN[op]

        def call():  # a dispatch of -1 tokens; the other calls along a NULL handle
            m = self._h or (self._dead[0] if self._dead else self._ptr())
            if op == "dispatch":
                din = _lib.DispatchIn()
                din.num_tokens = -1
                return L.epx_moe_dispatch(m, byref(din), byref(_lib.DispatchOut()), byref(c_void_p()), None)
            if op == "ll_dispatch":
                din = _lib.LLDispatchIn()
                din.num_tokens = -1
                return L.epx_moe_ll_dispatch(m, byref(din), byref(_lib.LLDispatchOut()), byref(c_void_p()), None)
            if op == "dispatch_cached":
                return L.epx_moe_dispatch_cached(m, None, byref(_lib.DispatchIn()), byref(_lib.DispatchOut()), None)
            if op == "combine":
                return L.epx_moe_combine(m, None, byref(_lib.CombineIn()), byref(_lib.CombineOut()), None)
            return L.epx_moe_ll_combine(m, None, byref(_lib.LLCombineIn()), None, None)
        return call

    @staticmethod
    def _create_fail(comm):
        """Comm._collective's fail() for a creation: one with a configuration the library rejects."""
        return lambda: L.epx_moe_create(comm._ptr(), byref(_lib.MoeConfig.initializer()), None)

    def _arr(self, a, name, shape, code, like):
        """Checks for one input array: shape, dtype, contiguity, same kind and device as `like`."""
        if a is None:
            return [(False, "%s is missing" % name)]
        try:
            dt = A.dtype_of(a)
            return [(tuple(A.shape(a)) == tuple(shape), "%s has shape %s, expected %s" % (name, tuple(A.shape(a)),
                                                                                            tuple(shape))),
                    (dt == code or (code == _lib.FP8_E4M3 and dt == _lib.U8 and not A.is_torch(a)),  # raw fp8 bits
                     "%s has dtype %s, expected %s%s" % (name, a.dtype, _lib.DTYPE_NAMES[code],
                                                         _BF16_HINT if code == _lib.BF16 else "")),
                    (A.contiguous(a), "%s must be contiguous" % name),
                    (A.is_torch(a) == A.is_torch(like) and
                     getattr(a, "device", None) == getattr(like, "device", None),
                     "%s is not on the same device as the other arguments" % name),
                    (A.is_cuda(a) == (self.comm.backend == "cuda"), self._memory_problem(a, name))]
        except Exception as e:  # not an array, or a dtype epx does not know
            return [(False, "%s: %s" % (name, e))]

    def _memory_problem(self, a, name):
        """What to say when `a` lives in the wrong memory for the backend."""
        if A.is_cuda(a) and not cuda_built():
            return "%s is on %s, but this epx build has no CUDA backend (%s): pass CPU tensors" % (
                name, a.device, _lib.path)
        return "%s must be %s memory on the %s backend" % (
            name, "device" if self.comm.backend == "cuda" else "host", self.comm.backend)

    def _rows(self, x):
        try:
            s = A.shape(x)
        except Exception:
            return -1
        return s[0] if len(s) == 2 else -1

    def _rows_k(self, idx):
        try:
            s = A.shape(idx)
        except Exception:
            return -1
        return s[1] if len(s) == 2 else -1

    # ---- calls -----------------------------------------------------------------------------------

    def layout(self, topk_idx, stream=None):
        """Local: (num_tokens_per_rank[R] int32, num_tokens_per_expert[E] int32, is_token_in_rank[T, R] bool)."""
        s = A.shape(topk_idx)
        if len(s) != 2 or A.dtype_of(topk_idx) != self.index_dtype or not A.contiguous(topk_idx):
            raise InvalidArgumentError(-1, "topk_idx must be a contiguous [T, K] array of %s"
                                       % _lib.DTYPE_NAMES[self.index_dtype])
        per_rank = A.empty(topk_idx, (self.nranks,), _lib.I32)
        per_expert = A.empty(topk_idx, (self.num_experts,), _lib.I32)
        in_rank = A.empty(topk_idx, (s[0], self.nranks), _lib.U8)
        check(L.epx_moe_layout(self._ptr(), A.ptr(topk_idx), s[0], s[1], A.ptr(per_rank), A.ptr(per_expert),
                               A.ptr(in_rank), A.stream_of(stream, topk_idx)), self.comm._h)
        if A.is_torch(in_rank):
            import torch
            in_rank = in_rank.view(torch.bool)
        else:
            in_rank = in_rank.view(bool)
        return per_rank, per_expert, in_rank

    def dispatch(self, x, topk_idx, topk_weights=None, x_scales=None, *, stream=None):
        """High-throughput dispatch (collective). Returns DispatchResult: recv_x[N, H] (and recv_x_scales for
        FP8), recv_topk_idx[N, K] (local expert ids, -1 elsewhere), recv_topk_weights[N, K] (None without
        topk_weights), recv_src_rank[N], recv_src_token[N], num_recv_tokens_per_expert[L] (aligned) and the
        handle. Rows are ordered by (source rank, source token). The outputs are views of arrays of
        max_recv_tokens() rows."""
        T = self._rows(x)
        K = self._rows_k(topk_idx)
        fp8 = self.dtype == _lib.FP8_E4M3
        checks = self._arr(x, "x", (T, self.hidden), self.dtype, x) + \
            self._arr(topk_idx, "topk_idx", (T, K), self.index_dtype, x)
        if topk_weights is not None:
            checks += self._arr(topk_weights, "topk_weights", (T, K), _lib.F32, x)
        if fp8:
            checks += self._arr(x_scales, "x_scales", (T, self.scale_cols), _lib.F32, x)
        elif x_scales is not None:
            checks.append((False, "x_scales is only for FP8 tokens"))
        problem = self._check(checks)
        din = _lib.DispatchIn()
        dout = _lib.DispatchOut()
        h = c_void_p()

        def prepare():
            cap = self.max_recv_tokens()
            outs = (A.empty(x, (cap, self.hidden), self.dtype),
                    A.empty(x, (cap, self.scale_cols), _lib.F32) if fp8 else None,
                    A.empty(x, (cap, K), self.index_dtype),
                    A.empty(x, (cap, K), _lib.F32) if topk_weights is not None else None,
                    A.empty(x, (cap,), _lib.I32), A.empty(x, (cap,), _lib.I32),
                    A.empty(x, (self.num_local_experts,), _lib.I32))
            din.x, din.x_scales, din.topk_idx = A.ptr(x), A.ptr(x_scales), A.ptr(topk_idx)
            din.topk_weights, din.num_tokens, din.topk = A.ptr(topk_weights), T, K
            (dout.recv_x, dout.recv_x_scales, dout.recv_topk_idx, dout.recv_topk_weights, dout.recv_src_rank,
             dout.recv_src_token, dout.num_recv_tokens_per_expert) = (A.ptr(a) for a in outs)
            dout.capacity = cap
            return outs, A.stream_of(stream, x)

        outs, s = self._call(problem, "dispatch", prepare)
        recv_x, recv_s, recv_i, recv_w, src_r, src_t, per_e = outs
        check(self.comm._run(lambda: L.epx_moe_dispatch(self._ptr(), byref(din), byref(dout), byref(h), s)),
              self.comm._h)
        n = dout.num_recv_tokens
        handle = Handle(self, h, "ht", T, K, n)
        return DispatchResult(recv_x[:n], recv_s[:n] if fp8 else None, recv_i[:n],
                              recv_w[:n] if recv_w is not None else None, src_r[:n], src_t[:n], per_e, handle)

    def _handle_checks(self, handle, mode):
        return [(isinstance(handle, Handle) and bool(handle._h), "handle is not a live epx handle"),
                (getattr(handle, "moe", None) is self and getattr(handle, "mode", None) == mode,
                 "handle was made by another MoE context or mode")]

    def dispatch_cached(self, handle, x, x_scales=None, *, stream=None):
        """Dispatch new token data along `handle`'s routing (e.g. the backward pass of combine). Returns
        recv_x[N, H], or (recv_x, recv_x_scales) for FP8."""
        fp8 = self.dtype == _lib.FP8_E4M3
        checks = self._handle_checks(handle, "ht")
        if not checks[0][0] or not checks[1][0]:
            problem = self._check(checks)
        else:
            checks += self._arr(x, "x", (handle.num_tokens, self.hidden), self.dtype, x)
            if fp8:
                checks += self._arr(x_scales, "x_scales", (handle.num_tokens, self.scale_cols), _lib.F32, x)
            problem = self._check(checks)
        din, dout = _lib.DispatchIn(), _lib.DispatchOut()

        def prepare():
            n = handle.num_recv_tokens
            recv_x = A.empty(x, (n, self.hidden), self.dtype)
            recv_s = A.empty(x, (n, self.scale_cols), _lib.F32) if fp8 else None
            din.x, din.x_scales, din.num_tokens = A.ptr(x), A.ptr(x_scales), handle.num_tokens
            dout.recv_x, dout.recv_x_scales, dout.capacity = A.ptr(recv_x), A.ptr(recv_s), n
            return recv_x, recv_s, A.stream_of(stream, x)

        recv_x, recv_s, s = self._call(problem, "dispatch_cached", prepare)
        check(self.comm._run(lambda: L.epx_moe_dispatch_cached(self._ptr(), handle._h, byref(din), byref(dout), s)),
              self.comm._h)
        return (recv_x, recv_s) if fp8 else recv_x

    def combine(self, handle, y, topk_weights=None, *, stream=None):
        """High-throughput combine (collective): out[T, H] = sum of each token's rows over the ranks it went
        to (float32, ascending rank order). With topk_weights[N, K], also returns their sums [T, K] (else
        None). Returns (out, out_topk_weights)."""
        checks = self._handle_checks(handle, "ht")
        if checks[0][0] and checks[1][0]:
            checks += self._arr(y, "y", (handle.num_recv_tokens, self.hidden), self.combine_dtype, y)
            if topk_weights is not None:
                checks += self._arr(topk_weights, "topk_weights", (handle.num_recv_tokens, handle.topk), _lib.F32, y)
        problem = self._check(checks)
        cin, cout = _lib.CombineIn(), _lib.CombineOut()

        def prepare():
            out = A.empty(y, (handle.num_tokens, self.hidden), self.combine_dtype)
            out_w = A.empty(y, (handle.num_tokens, handle.topk), _lib.F32) if topk_weights is not None else None
            cin.y, cin.topk_weights = A.ptr(y), A.ptr(topk_weights)
            cout.out, cout.out_topk_weights = A.ptr(out), A.ptr(out_w)
            return out, out_w, A.stream_of(stream, y)

        out, out_w, s = self._call(problem, "combine", prepare)
        check(self.comm._run(lambda: L.epx_moe_combine(self._ptr(), handle._h, byref(cin), byref(cout), s)),
              self.comm._h)
        return out, out_w

    def ll_dispatch(self, x, topk_idx, *, stream=None, split=False):
        """Low-latency dispatch (collective). Returns LLDispatchResult: recv_x[L, R*max_tokens, H] (FP8 with
        ll_fp8), recv_x_scales[L, R*max_tokens, ceil(H/128)] (float32, or uint8 UE8M0; None without
        ll_fp8), recv_count[L], recv_src_rank / recv_src_token[L, R*max_tokens] (-1 past recv_count), handle.
        With split, only the send half runs: the outputs are complete after ll_recv(handle)."""
        T = self._rows(x)
        K = self._rows_k(topk_idx)
        problem = self._check(self._arr(x, "x", (T, self.hidden), self.dtype, x) +
                              self._arr(topk_idx, "topk_idx", (T, K), self.index_dtype, x))
        din, dout, h = _lib.LLDispatchIn(), _lib.LLDispatchOut(), c_void_p()
        Lx, S = self.num_local_experts, self.ll_slots

        def prepare():
            outs = (A.empty(x, (Lx, S, self.hidden), _lib.FP8_E4M3 if self.ll_fp8 else self.dtype),
                    A.empty(x, (Lx, S, self.scale_cols), _lib.U8 if self.scale_format == _lib.SCALE_UE8M0
                            else _lib.F32) if self.ll_fp8 else None,
                    A.empty(x, (Lx,), _lib.I32), A.empty(x, (Lx, S), _lib.I32), A.empty(x, (Lx, S), _lib.I32))
            din.x, din.topk_idx, din.num_tokens, din.topk = A.ptr(x), A.ptr(topk_idx), T, K
            (dout.recv_x, dout.recv_x_scales, dout.recv_count, dout.recv_src_rank,
             dout.recv_src_token) = (A.ptr(a) for a in outs)
            return outs, A.stream_of(stream, x)

        outs, s = self._call(problem, "ll_dispatch", prepare)
        recv_x, recv_s, count, src_r, src_t = outs
        fn = L.epx_moe_ll_dispatch_send if split else L.epx_moe_ll_dispatch
        check(self.comm._run(lambda: fn(self._ptr(), byref(din), byref(dout), byref(h), s)), self.comm._h)
        handle = Handle(self, h, "ll", T, K, 0)
        handle._like = x
        if split:  # written by the receive: kept alive until then, even if the caller drops them
            handle._keep = (recv_x, recv_s, count, src_r, src_t)
        return LLDispatchResult(recv_x, recv_s, count, src_r, src_t, handle)

    def ll_combine(self, handle, y, topk_weights, out=None, *, stream=None, split=False):
        """Low-latency combine (collective): out[t] = sum over k of topk_weights[t, k] * y[e_k][slot(t, k)],
        float32: a partial sum per expert rank (ascending k), then the ranks ascending (epx.h). y is [L, R*max_tokens, H] in the dispatch's slot layout. Returns out[T, H].
        With split, only the send half runs: out is complete, and y may change, after
        ll_recv(handle, combine=True)."""
        checks = self._handle_checks(handle, "ll")
        if checks[0][0] and checks[1][0]:
            checks += self._arr(y, "y", (self.num_local_experts, self.ll_slots, self.hidden), self.combine_dtype, y)
            checks += self._arr(topk_weights, "topk_weights", (handle.num_tokens, handle.topk), _lib.F32, y)
            if out is not None:
                checks += self._arr(out, "out", (handle.num_tokens, self.hidden), self.combine_dtype, y)
                checks.append((A.writable(out), "out is read-only"))
        problem = self._check(checks)
        cin = _lib.LLCombineIn()

        def prepare():
            o = A.empty(y, (handle.num_tokens, self.hidden), self.combine_dtype) if out is None else out
            cin.y, cin.topk_weights = A.ptr(y), A.ptr(topk_weights)
            return o, A.ptr(o), A.stream_of(stream, y)

        out, out_p, s = self._call(problem, "ll_combine", prepare)
        fn = L.epx_moe_ll_combine_send if split else L.epx_moe_ll_combine
        check(self.comm._run(lambda: fn(self._ptr(), handle._h, byref(cin), out_p, s)), self.comm._h)
        if split:  # read and written by the receive: kept alive until then
            handle._keep = (y, topk_weights, out)
        return out

    def ll_recv(self, handle, combine=False, *, stream=None):
        """The receive half of the split low-latency dispatch (or, with combine, combine) pending on
        handle: local, enqueued on the stream (CUDA). Receives go in the order of their sends; at most
        two sends of each kind are pending (include/epx.h)."""
        fn = L.epx_moe_ll_combine_recv if combine else L.epx_moe_ll_dispatch_recv
        like = getattr(handle, "_like", None)
        check(fn(self._ptr(), handle._h, A.stream_of(stream, like) if like is not None else None), self.comm._h)
        handle._keep = None


def _release(dead):
    """Moe.destroy's deferred release: the C context in `dead`, which it empties (Moe._fail then has
    nothing to join with)."""
    L.epx_moe_destroy(dead.pop())
