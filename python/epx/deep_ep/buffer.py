"""`deep_ep.buffer` of the DeepEP front: Buffer and Config (the package docstring says what maps
onto what)."""
import os

from .. import _arrays as A
from .. import _lib
from .._comm import _torch_exchange, Comm, cuda_built
from .._errors import InvalidArgumentError, UnsupportedError
from .._moe import Moe
from .utils import EventHandle, EventOverlap

_INITIAL_MAX_TOKENS = 128


def _torch():
    import torch
    return torch


class Config:
    """DeepEP's performance config. epx reads num_sms (the SM budget of the GPU kernels); the chunk
    sizes are kept for compatibility."""

    def __init__(self, num_sms=20, num_max_nvl_chunked_send_tokens=6, num_max_nvl_chunked_recv_tokens=256,
                 num_max_rdma_chunked_send_tokens=6, num_max_rdma_chunked_recv_tokens=256):
        self.num_sms = num_sms
        self.num_max_nvl_chunked_send_tokens = num_max_nvl_chunked_send_tokens
        self.num_max_nvl_chunked_recv_tokens = num_max_nvl_chunked_recv_tokens
        self.num_max_rdma_chunked_send_tokens = num_max_rdma_chunked_send_tokens
        self.num_max_rdma_chunked_recv_tokens = num_max_rdma_chunked_recv_tokens

    def get_nvl_buffer_size_hint(self, hidden_bytes, num_ranks):
        # epx owns no staging buffer of this kind: a nominal size for code that sizes Buffer with it.
        return int(hidden_bytes) * int(num_ranks) * self.num_max_nvl_chunked_recv_tokens

    def get_rdma_buffer_size_hint(self, hidden_bytes, num_ranks):
        return 0

    def __repr__(self):
        return "Config(num_sms=%d)" % self.num_sms


class _HTHandle:
    """The routing of a high-throughput dispatch (DeepEP's `handle`)."""

    def __init__(self, moe, h, is_token_in_rank, recv_src_rank, recv_src_token):
        self.moe, self.epx_handle = moe, h
        self.is_token_in_rank = is_token_in_rank
        self.recv_src_rank, self.recv_src_token = recv_src_rank, recv_src_token
        self.num_tokens, self.num_recv_tokens = h.num_tokens, h.num_recv_tokens


class _LLHandle:
    """The slots of a low-latency dispatch (DeepEP's low-latency `handle`)."""

    def __init__(self, moe, h, recv_src_rank, recv_src_token, num_max_dispatch_tokens_per_rank, hidden, num_experts):
        self.moe, self.epx_handle = moe, h
        self.recv_src_rank, self.recv_src_token = recv_src_rank, recv_src_token
        self.num_max_dispatch_tokens_per_rank, self.hidden, self.num_experts = (
            num_max_dispatch_tokens_per_rank, hidden, num_experts)

    def _items(self):
        return (self.recv_src_rank, self.recv_src_token, self.num_max_dispatch_tokens_per_rank, self.hidden,
                self.num_experts)

    # DeepEP's handle is the tuple (src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden,
    # num_experts): items 2-4 mean the same here; 0 and 1 are epx's slot sources instead.
    def __iter__(self):
        return iter(self._items())

    def __len__(self):
        return 5

    def __getitem__(self, i):
        return self._items()[i]


def _same_mode(handle, cls, op):
    """Refuses (InvalidArgumentError) the handle of the other mode's dispatch than `cls`, which `op`
    takes; then the call's failure is that of the context of its mode (see Buffer._prepared)."""
    names = ("dispatch", "low_latency_dispatch") if cls is _HTHandle else ("low_latency_dispatch", "dispatch")
    if isinstance(handle, _LLHandle if cls is _HTHandle else _HTHandle):
        raise InvalidArgumentError(-1, "%s takes the handle of a %s, not of a %s" % ((op,) + names))


def _wait(previous_event):
    if previous_event is not None:
        previous_event.current_stream_wait()


def _finish(async_finish, like, extra=None):
    if async_finish and A.is_cuda(like):
        return EventOverlap(EventHandle(like.device), extra)
    return EventOverlap(None, extra if async_finish else None)


class Buffer:
    """DeepEP's communication buffer, over an epx communicator. Collective calls (dispatch, combine,
    the low-latency pair) are made by every rank in the same order, as with DeepEP. An argument that
    raises on one rank while the call reads it (a dtype epx lacks, an object that is not an array, a
    handle or an event, the handle of the other mode's dispatch) fails the call on every rank, the
    others with RemoteInvalidError. The constructor is collective too (see __init__)."""

    num_sms = 20

    def __init__(self, group=None, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=24,
                 allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False, use_fabric=False, explicitly_destroy=False,
                 enable_shrink=False, comm=None, *, timeout_ms=None):
        """Collective, as DeepEP's: every rank of the group (or communicator) makes it. What it refuses
        on one rank (enable_shrink=True: UnsupportedError; an EPX_DEEP_EP_MAX_TOKENS that is not a
        positive integer) raises there once it has met the others, who raise RemoteInvalidError at
        once instead of waiting for it in their first call."""
        def prepare():
            if enable_shrink:
                raise UnsupportedError(-5, "enable_shrink (DeepEP's rank masking) is not supported by epx: a failed "
                                           "peer breaks the communicator (abort and recreate it)")
            n = int(os.environ.get("EPX_DEEP_EP_MAX_TOKENS", _INITIAL_MAX_TOKENS))
            if n < 1:
                raise InvalidArgumentError(-1, "EPX_DEEP_EP_MAX_TOKENS = %d: expected at least 1" % n)
            return None, n

        self._owns_comm = False  # destroy() releases only a communicator made here
        if comm is None:
            if isinstance(group, Comm):
                comm = group
            elif group is None:
                comm = Comm(timeout_ms=timeout_ms)
                self._owns_comm = True
            else:
                comm = _comm_of_group(group, timeout_ms)
                self._owns_comm = True
        try:
            self._ht_max_tokens = comm._agree(prepare)
        except BaseException:
            if self._owns_comm:
                comm.destroy()
            raise
        self.comm = comm
        self.group = group
        self.rank, self.group_size = comm.rank, comm.size
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.num_qps_per_rank = num_qps_per_rank
        self.explicitly_destroy = explicitly_destroy
        self._moes = {}
        self._latest = {}  # "ht" / "ll": the context of the latest call of that mode (see _prepared)
        self._ll_combine_buffers = {}

    def destroy(self):
        """Release every context and the communicator (when this Buffer made it)."""
        for m in self._moes.values():
            m.destroy()
        self._moes.clear()
        self._latest.clear()
        self._ll_combine_buffers.clear()
        if self._owns_comm:
            self.comm.destroy()

    def is_available(self):
        return bool(self.comm._h)

    # ---- static helpers ------------------------------------------------------------------------

    @staticmethod
    def set_num_sms(new_num_sms):
        """SM budget of the GPU kernels (epx_moe_config_t.num_sms) for contexts created afterwards."""
        assert new_num_sms % 2 == 0, "The SM count must be even"
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture():
        """An event on the current stream, as an EventOverlap."""
        return EventOverlap(EventHandle())

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts):
        # Nominal: the bytes of one bf16 receive tensor and one combine buffer (epx allocates its own).
        slots = int(num_experts) * int(num_max_dispatch_tokens_per_rank)
        return 2 * slots * int(hidden) * 2

    @staticmethod
    def get_dispatch_config(num_ranks):
        return Config(Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks):
        return Config(Buffer.num_sms)

    def get_comm_stream(self):
        """epx works on the current torch stream."""
        return _torch().cuda.current_stream()

    def get_local_buffer_tensor(self, dtype, size=None, offset=0, use_rdma_buffer=False):
        raise UnsupportedError(-5, "epx owns no raw communication buffer to expose")

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank, hidden, num_experts):
        """Nothing to clean: epx's low-latency buffers need no zeroing."""

    def low_latency_update_mask_buffer(self, rank_to_mask, mask=False):
        raise UnsupportedError(-5, "rank masking (DeepEP's enable_shrink) is not supported by epx")

    def low_latency_query_mask_buffer(self, mask_status):
        raise UnsupportedError(-5, "rank masking (DeepEP's enable_shrink) is not supported by epx")

    def low_latency_clean_mask_buffer(self):
        raise UnsupportedError(-5, "rank masking (DeepEP's enable_shrink) is not supported by epx")

    # ---- contexts ------------------------------------------------------------------------------

    def _num_sms(self, config):
        n = config.num_sms if config is not None else Buffer.num_sms
        return int(n) if self.comm.backend == "cuda" else None

    def _ht_moe(self, key):
        """The context of key ("ht", hidden, dtype, index dtype, experts, top-k, alignment, num_sms), made
        (collectively) when missing or smaller than the agreed capacity."""
        m = self._moes.get(key)
        if m is None or m.max_tokens_per_rank < self._ht_max_tokens:
            _, hidden, dtype, index_dtype, num_experts, topk, alignment, num_sms = key
            m = Moe(self.comm, hidden, num_experts, self._ht_max_tokens, topk, dtype=dtype, index_dtype=index_dtype,
                    mode="ht", expert_alignment=alignment, num_sms=num_sms)
            self._moes[key] = m
        self._latest["ht"] = m
        return m

    def _prepared(self, mode, op, prepare, at):
        """prepare() -> its result: this rank's reading of a call's arguments, which may raise. Where it
        raises, this rank makes, failing, the collective its peers make first, so that they fail at once
        (RemoteInvalidError) instead of waiting for it (Comm._collective), and then raises. That
        collective is `op` (a Moe method) on the call's context: at["moe"] (a handle's) or that of
        at["key"] where prepare() read that far, else that of the latest `mode` call (the same on every
        rank while they call in step); or, where that context is missing or outgrown, its creation (the
        peers make it first). Where the peers need another context than the one guessed, the calls
        differ: on the CPU backend every rank then fails with MismatchError, also at once."""
        return self.comm._collective(lambda: (None, prepare()), lambda: self._fail(mode, op, at)())

    def _fail(self, mode, op, at):
        """The failing collective of _prepared, as a fail() for Comm._collective."""
        moe = at.get("moe")
        if not (isinstance(moe, Moe) and moe.mode == (_lib.MOE_HIGH_THROUGHPUT if mode == "ht"
                                                      else _lib.MOE_LOW_LATENCY)):
            moe = self._moes.get(at["key"]) if "key" in at else self._latest.get(mode)
            if moe is not None and mode == "ht" and moe.max_tokens_per_rank < self._ht_max_tokens:
                moe = None
        return moe._fail(op) if moe is not None else Moe._create_fail(self.comm)

    def _max_over_ranks(self, value, like):
        """Collective: the largest `value` over the ranks (after a failure every rank saw)."""
        R = self.comm.size
        if A.is_torch(like):
            t = _torch()
            dev = like.device if self.comm.backend == "cuda" else "cpu"
            send = t.full((R,), int(value), dtype=t.int64, device=dev)
            return int(self.comm.alltoall(send).max().item())
        np = A.np
        return int(self.comm.alltoall(np.full(R, int(value), dtype=np.int64)).max())

    def _with_capacity(self, at, call):
        """Run call() on a context large enough for this rank's at["T"] tokens, set by call() (0 where it
        raised before reading them; at["like"]: the tokens); when some rank had more tokens than the
        context holds, every rank fails, they agree on the largest T and retry once. Every rank whose
        call raised, for whatever reason (out of memory or a bad argument on one rank and
        RemoteInvalidError on the others, too), joins that agreement, so none waits in it for a rank that
        gave up; a rank whose communicator is broken raises its call's error."""
        try:
            return call()
        except Exception as e:
            try:
                need = self._max_over_ranks(at.get("T", 0), at.get("like"))
            except Exception:
                raise e
            if need <= self._ht_max_tokens:
                raise e
            cap = self._ht_max_tokens
            while cap < need:
                cap *= 2
            self._ht_max_tokens = cap
            return call()

    # ---- high-throughput ---------------------------------------------------------------------------

    def get_dispatch_layout(self, topk_idx, num_experts, previous_event=None, async_finish=False,
                            allocate_on_comm_stream=False):
        """Local. Returns (num_tokens_per_rank[R] int32, None, num_tokens_per_expert[E] int32,
        is_token_in_rank[T, R] bool, event). A token counts once per rank and once per expert; ids
        outside [0, E) are ignored here (dispatch rejects them)."""
        _wait(previous_event)
        R, E = self.group_size, int(num_experts)
        T = A.shape(topk_idx)[0]
        if A.is_torch(topk_idx):
            t = _torch()
            valid = (topk_idx >= 0) & (topk_idx < E)
            idx = t.where(valid, topk_idx, t.full_like(topk_idx, E)).long()
            hits = t.zeros((T, E + 1), dtype=t.int32, device=topk_idx.device)
            hits.scatter_add_(1, idx, t.ones_like(idx, dtype=t.int32))
            tok_exp = hits[:, :E] > 0
            per_expert = tok_exp.sum(0, dtype=t.int32)
            in_rank = tok_exp.view(T, R, E // R).any(2) if T else t.zeros((0, R), dtype=t.bool,
                                                                              device=topk_idx.device)
            per_rank = in_rank.sum(0, dtype=t.int32)
        else:
            np = A.np
            idx = np.where((topk_idx >= 0) & (topk_idx < E), topk_idx, E)
            tok_exp = np.zeros((T, E + 1), dtype=bool)
            tok_exp[np.arange(T)[:, None], idx] = True
            tok_exp = tok_exp[:, :E]
            per_expert = tok_exp.sum(0).astype(np.int32)
            in_rank = tok_exp.reshape(T, R, E // R).any(2)
            per_rank = in_rank.sum(0).astype(np.int32)
        return per_rank, None, per_expert, in_rank, _finish(async_finish, topk_idx)

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment=1, num_worst_tokens=0, config=None, previous_event=None, async_finish=False,
                 allocate_on_comm_stream=False):
        """Send each token to the ranks of its experts. x: [T, H] tensor, or (fp8 [T, H], scales): scales
        [T, C] or [T] (C <= ceil(H/128); float32, or int32 UE8M0 words; any layout), received as [N, C] or
        [N] of their dtype, row-major, as DeepEP does. Returns (recv_x or (recv_x, recv_x_scales),
        recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event); with `handle`
        given (cached: same routing, new data) (recv_x, None, None, None, None, event). Received rows are
        ordered by (source rank, source token)."""
        at = {}  # what the preparation learnt before it raised (see _prepared, _with_capacity)
        if handle is not None:
            def prepare_cached():
                _same_mode(handle, _HTHandle, "dispatch(handle=...)")
                at["moe"] = handle.moe
                _wait(previous_event)
                return (handle.moe, handle.epx_handle) + _tokens(x)

            moe, h, xx, xs, scales_out = self._prepared("ht", "dispatch_cached", prepare_cached, at)
            recv_x = moe.dispatch_cached(h, xx, xs)  # (recv_x, scales) for FP8
            if xs is not None:
                recv_x = (recv_x[0], scales_out(recv_x[1]))
            return recv_x, None, None, None, None, _finish(async_finish, xx)

        def prepare():
            xx, xs, scales_out = _tokens(x)
            at["like"] = xx
            if topk_idx is None or num_tokens_per_expert is None:
                raise ValueError("dispatch needs topk_idx and num_tokens_per_expert (from get_dispatch_layout) "
                                 "or a handle")
            at["T"] = int(A.shape(xx)[0])
            K = A.shape(topk_idx)[1] if len(A.shape(topk_idx)) == 2 else 1
            dtype = _lib.FP8_E4M3 if xs is not None else A.dtype_of(xx)
            key = ("ht", A.shape(xx)[-1], dtype, A.dtype_of(topk_idx), A.shape(num_tokens_per_expert)[0], K,
                   int(expert_alignment), self._num_sms(config))
            at["key"] = key
            if num_worst_tokens:
                raise UnsupportedError(-5, "num_worst_tokens is not supported by epx")
            _wait(previous_event)
            return key, xx, xs, scales_out

        def call():  # the preparation too: a rank whose preparation raised joins the agreement
            key, xx, xs, scales_out = self._prepared("ht", "dispatch", prepare, at)
            moe = self._ht_moe(key)
            return moe, moe.dispatch(xx, topk_idx, topk_weights, xs), xx, xs, scales_out

        moe, r, xx, xs, scales_out = self._with_capacity(at, call)
        h = _HTHandle(moe, r.handle, is_token_in_rank, r.recv_src_rank, r.recv_src_token)
        recv_x = (r.recv_x, scales_out(r.recv_x_scales)) if xs is not None else r.recv_x
        counts = r.num_recv_tokens_per_expert.tolist()
        return recv_x, r.recv_topk_idx, r.recv_topk_weights, counts, h, _finish(async_finish, xx)

    def combine(self, x, handle, topk_weights=None, bias=None, config=None, previous_event=None,
                async_finish=False, allocate_on_comm_stream=False):
        """Sum each token's rows back on its home rank (no weights applied; float32 in ascending rank
        order). Returns (combined_x[T, H], combined_topk_weights[T, K] or None, event)."""
        at = {}

        def prepare():
            _same_mode(handle, _HTHandle, "combine")
            at["moe"] = handle.moe
            _wait(previous_event)
            return handle.moe, handle.epx_handle

        moe, h = self._prepared("ht", "combine", prepare, at)
        out, out_w = moe.combine(h, x, topk_weights)
        biases = [b for b in (bias if isinstance(bias, tuple) else (bias,)) if b is not None]
        if biases:  # in float32, the biases summed first (as DeepEP does), then one rounding
            f32 = (lambda a: a.float()) if A.is_torch(out) else _np_float32
            s = f32(biases[0])
            for b in biases[1:]:
                s = s + f32(b)
            out = (out.float() + s).to(out.dtype) if A.is_torch(out) else _np_cast(_np_float32(out) + s, out.dtype)
        return out, out_w, _finish(async_finish, x)

    internode_dispatch = dispatch
    internode_combine = combine
    intranode_dispatch = dispatch
    intranode_combine = combine

    # ---- low-latency -----------------------------------------------------------------------------

    def _ll_moe(self, key):
        """The context of key ("ll", hidden, dtype, index dtype, experts, top-k, max tokens, use_fp8,
        ue8m0), made (collectively) when missing."""
        m = self._moes.get(key)
        if m is None:
            _, hidden, dtype, index_dtype, num_experts, topk, max_tokens, use_fp8, ue8m0 = key
            m = Moe(self.comm, hidden, num_experts, max_tokens, topk, dtype=dtype, index_dtype=index_dtype, mode="ll",
                    ll_fp8=use_fp8, scale_format="ue8m0" if ue8m0 else "f32",
                    combine_dtype=_lib.BF16 if use_fp8 else None)
            self._moes[key] = m
        self._latest["ll"] = m
        return m

    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                             cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None,
                             use_fp8=True, round_scale=False, use_ue8m0=False, async_finish=False,
                             return_recv_hook=False):
        """Expert-major dispatch with static shapes. Returns (recv_x, recv_count[L] int32, handle, event,
        hook): recv_x is [L, R*M, H] (bf16), or with use_fp8 (fp8 [L, R*M, H], scales [L, R*M, H/128]) —
        float32 scales (powers of two with round_scale), or UE8M0 exponent bytes packed four to an int32
        with use_ue8m0. Rows of expert l are recv_x[l, :recv_count[l]]."""
        at = {}

        def prepare():
            K = A.shape(topk_idx)[1] if len(A.shape(topk_idx)) == 2 else 1
            key = ("ll", A.shape(x)[-1], A.dtype_of(x), A.dtype_of(topk_idx), int(num_experts), K,
                   int(num_max_dispatch_tokens_per_rank), bool(use_fp8), bool(use_fp8 and (round_scale or use_ue8m0)))
            at["key"] = key
            return key, bool(return_recv_hook)

        key, split = self._prepared("ll", "ll_dispatch", prepare, at)
        _, H, _, _, E, _, M, _, ue8m0 = key
        moe = self._ll_moe(key)
        r = moe.ll_dispatch(x, topk_idx, split=split)
        h = _LLHandle(moe, r.handle, r.recv_src_rank, r.recv_src_token, M, H, E)

        def scales_of(raw):
            if ue8m0 and not use_ue8m0:  # float32 powers of two
                raw = _ue8m0_to_float(raw)
            elif use_ue8m0:
                raw = _pack_ue8m0(raw)
            if A.is_torch(raw):  # DeepEP's layout: the last two dimensions column-major
                raw = raw.transpose(1, 2).contiguous().transpose(1, 2)
            return raw

        def received():  # what needs the received data
            nonlocal cumulative_local_expert_recv_stats  # updated in place, as DeepEP does
            if cumulative_local_expert_recv_stats is not None:
                cumulative_local_expert_recv_stats += r.recv_count

        recv_x, hook = r.recv_x, (lambda: None)
        scales = scales_of(r.recv_x_scales) if use_fp8 else None
        if split:
            def hook():
                moe.ll_recv(r.handle)
                if use_fp8:  # the returned scales, rewritten in place from what arrived
                    _assign(scales, scales_of(r.recv_x_scales))
                received()
        else:
            received()
        if use_fp8:
            recv_x = (recv_x, scales)
        return recv_x, r.recv_count, h, _finish(async_finish, x), hook

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, use_logfmt=False, zero_copy=False,
                            async_finish=False, return_recv_hook=False, out=None, combine_wait_recv_cost_stats=None):
        """Weighted combine of the expert outputs x[L, R*M, H] (the dispatch's slot layout): out[t] =
        sum over k of topk_weights[t, k] * x[expert][slot]. With zero_copy, the data is taken from
        get_next_low_latency_combine_buffer(handle). Returns (combined_x[T, H], event, hook)."""
        at = {}

        def prepare():
            _same_mode(handle, _LLHandle, "low_latency_combine")
            at["moe"] = moe = handle.moe
            y = self._ll_combine_buffers.get(id(moe)) if zero_copy else x
            return moe, handle.epx_handle, x if y is None else y, bool(return_recv_hook)

        moe, h, y, split = self._prepared("ll", "ll_combine", prepare, at)
        res = moe.ll_combine(h, y, topk_weights, out, split=split)
        hook = (lambda: moe.ll_recv(h, combine=True)) if split else (lambda: None)
        return res, _finish(async_finish, y), hook

    def get_next_low_latency_combine_buffer(self, handle):
        """A [L, R*M, H] tensor that low_latency_combine(..., zero_copy=True) reads; fill it yourself."""
        moe = handle.moe
        buf = self._ll_combine_buffers.get(id(moe))
        if buf is None:
            like = handle.recv_src_rank
            buf = A.zeros(like, (moe.num_local_experts, moe.ll_slots, moe.hidden), moe.combine_dtype)
            self._ll_combine_buffers[id(moe)] = buf
        return buf


def _comm_of_group(group, timeout_ms):
    """A communicator over a torch ProcessGroup, on the current CUDA device whenever torch has CUDA and
    libepx a CUDA backend (as DeepEP: the group only bootstraps, so a gloo group, e.g. vLLM's CPU
    group, gives the CUDA backend too), else on the CPU backend (in an epx built without CUDA, CUDA
    tensors are then refused, saying so). For torch CPU tensors on a machine with a GPU, pass
    comm=Comm.from_torch(group, backend="cpu") instead. Collective, failing on every rank as
    from_torch does; so does the current device's query over a CPU (gloo) group (over an NCCL group
    the rank whose query fails cannot take part in the group's exchange)."""
    t = _torch()
    try:
        device = t.cuda.current_device() if t.cuda.is_available() and cuda_built() else None
    except BaseException as e:  # as in from_torch: this rank fails its exchange, so the others fail at once
        _torch_exchange(group, failed=("get its current CUDA device", e))
        raise
    if device is not None:
        return Comm.from_torch(group, backend="cuda", device=device, timeout_ms=timeout_ms)
    return Comm.from_torch(group, backend="cpu", timeout_ms=timeout_ms)


def _same(r):
    return r


def _tokens(x):
    """dispatch's x, or DeepEP's (x, x_scales), as (x, epx's scales or None, the function that gives the
    received scales DeepEP's form)."""
    if not isinstance(x, tuple):
        return x, None, _same
    x, s = x
    return (x,) + _scales_in(s, x)


def _scales_in(s, x):
    """DeepEP's x_scales, [T] or [T, C] float32 or int32 (UE8M0 packed) in any layout, as epx's
    contiguous float32 [T, cols] (the scales travel as raw 4-byte words, zero-padded to cols), and the
    function that turns the received [N, cols] back into DeepEP's form ([N] or [N, C], row-major,
    the input's dtype). What cannot be adapted (C > cols, another dtype) is passed on for epx to
    reject on every rank."""
    try:
        shape, code, cols = A.shape(s), A.dtype_of(s), (A.shape(x)[-1] + 127) // 128
    except Exception:  # not arrays: epx rejects them on every rank
        return s, _same
    if len(shape) not in (1, 2) or code not in (_lib.F32, _lib.I32) or (len(shape) == 2 and shape[1] > cols):
        return s, _same
    C = shape[1] if len(shape) == 2 else 1
    if len(shape) == 2 and C == cols and code == _lib.F32 and A.contiguous(s):
        return s, _same
    if A.is_torch(s):
        t = _torch()
        w = s.reshape(shape[0], C).contiguous()
        w = w.view(t.float32) if code == _lib.I32 else w
        if C < cols:
            w = t.cat([w, w.new_zeros((shape[0], cols - C))], 1)

        def out(r):
            r = r[:, :C].contiguous()
            r = r.view(t.int32) if code == _lib.I32 else r
            return r.reshape(-1) if len(shape) == 1 else r
        return w, out
    np = A.np
    w = np.ascontiguousarray(np.asarray(s).reshape(shape[0], C))
    w = w.view(np.float32) if code == _lib.I32 else w
    if C < cols:
        w = np.concatenate([w, np.zeros((shape[0], cols - C), np.float32)], 1)

    def out(r):
        r = np.ascontiguousarray(r[:, :C])
        r = r.view(np.int32) if code == _lib.I32 else r
        return r.reshape(-1) if len(shape) == 1 else r
    return w, out


def _np_float32(a):
    """numpy values as float32; uint16 arrays are raw bf16 bits (numpy has no bf16)."""
    np = A.np
    if a.dtype == np.uint16:
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def _np_cast(f, dtype):
    """float32 values to `dtype`; uint16: bf16 bits, rounded to nearest even (NaN stays NaN)."""
    np = A.np
    if np.dtype(dtype) == np.uint16:
        u = np.ascontiguousarray(f, dtype=np.float32).view(np.uint32).astype(np.uint64)
        b = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        return np.where(np.isnan(f), np.uint16(0x7FC0), b)
    return f.astype(dtype)


def _assign(dst, src):
    """dst[...] = src, keeping dst's storage and strides (torch or numpy)."""
    if A.is_torch(dst):
        dst.copy_(src)
    else:
        dst[...] = src


def _ue8m0_to_float(s):
    """UE8M0 exponent bytes -> the float32 powers of two they encode (0xFF: inf, as torch's ldexp
    gives; without numpy's overflow warning, which the bytes of receive slots no token filled
    would raise)."""
    if A.is_torch(s):
        t = _torch()
        return t.ldexp(t.ones_like(s, dtype=t.float32), s.to(t.int32) - 127)
    np = A.np
    with np.errstate(over="ignore"):
        return np.ldexp(np.float32(1), s.astype(np.int32) - 127).astype(np.float32)


def _pack_ue8m0(s):
    """UE8M0 bytes [.., n] -> int32 [.., ceil(n/4)], four exponents a word, the first in the low byte."""
    n = A.shape(s)[-1]
    pad = (-n) % 4
    if A.is_torch(s):
        t = _torch()
        if pad:
            s = t.cat([s, t.zeros(*A.shape(s)[:-1], pad, dtype=s.dtype, device=s.device)], -1)
        return s.contiguous().view(t.int32)
    np = A.np
    if pad:
        s = np.concatenate([s, np.zeros(A.shape(s)[:-1] + (pad,), dtype=s.dtype)], -1)
    return np.ascontiguousarray(s).view(np.int32)


__all__ = ["Buffer", "Config"]
