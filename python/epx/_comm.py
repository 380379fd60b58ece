"""Communicators, rendezvous ids, registered memory and the generic collectives."""
import ctypes
import functools
import os
from collections import namedtuple
from ctypes import byref, c_int, c_int64, c_void_p

from . import _arrays as A
from . import _lib
from ._errors import (_RECOVERABLE, check, EpxError, ERR_REMOTE_INVALID, ERR_UNSUPPORTED, InvalidArgumentError,
                      RemoteInvalidError, SUCCESS)

L = _lib.lib

CommInfo = namedtuple("CommInfo", "rank nranks local_rank local_size host num_hosts backend")
_BACKENDS = {"auto": _lib.BACKEND_AUTO, "cpu": _lib.BACKEND_CPU, "cuda": _lib.BACKEND_CUDA}
_BACKEND_NAMES = {v: k for k, v in _BACKENDS.items()}


def version():
    """The loaded library's version as (major, minor, patch)."""
    v = L.epx_get_version()
    return v // 10000, v // 100 % 100, v % 100


@functools.lru_cache(maxsize=None)
def cuda_built():
    """Whether the loaded libepx has a CUDA backend (local, needs no GPU): epx_moe_device_memory, which
    needs no communicator, answers EPX_ERR_UNSUPPORTED exactly in a build without one (and libepx
    logs that answer as a warning, once per process)."""
    cfg = _lib.MoeConfig.initializer()
    cfg.hidden = cfg.max_tokens_per_rank = cfg.num_experts = cfg.max_topk = 1
    st = L.epx_moe_device_memory(byref(cfg), 1, byref(c_int64()))
    if st == ERR_UNSUPPORTED:
        return False
    check(st)
    return True


def get_unique_id():
    """A new rendezvous id, as text ("epx1:ADDR:PORT:NONCE") to hand to every rank. The calling process
    serves the rendezvous (a thread) until all ranks of one communicator have met."""
    uid = _lib.UniqueId()
    check(L.epx_get_unique_id(byref(uid)))
    buf = ctypes.create_string_buffer(_lib.EPX_UNIQUE_ID_STRLEN)
    check(L.epx_unique_id_to_string(byref(uid), buf, len(buf)))
    return buf.value.decode()


def params():
    """Every tunable (EPX_* environment variable) as a dict name -> (value, default, type, description)."""
    out = {}
    for i in range(L.epx_param_count()):
        p = _lib.ParamInfo()
        check(L.epx_param_get(i, byref(p)))
        dec = [(x or b"").decode() for x in (p.name, p.value, p.default_value, p.type, p.description)]
        out[dec[0]] = tuple(dec[1:])
    return out


def _c_int(name, v):
    """v as a C int, refused (not wrapped, as ctypes would) when it does not fit."""
    v = int(v)
    if not -2**31 <= v < 2**31:
        raise InvalidArgumentError(-1, "%s = %d does not fit in a C int" % (name, v))
    return v


def _config(backend, device, timeout_ms):
    cfg = _lib.Config.initializer()
    if backend is not None:
        if isinstance(backend, str) and backend.lower() not in _BACKENDS:
            raise InvalidArgumentError(-1, "backend %r: expected auto, cpu or cuda" % backend)
        cfg.backend = _BACKENDS[backend.lower()] if isinstance(backend, str) else _c_int("backend", backend)
    if device is not None:
        index = getattr(device, "index", device)  # torch.device("cuda") has index None: the current device
        if index is not None:
            cfg.device = _c_int("device", index)
    if timeout_ms is not None:
        cfg.timeout_ms = _c_int("timeout_ms", timeout_ms)
    return cfg


class Comm:
    """An epx communicator over `nranks` processes.

    Comm()                                 under epx-run: rank, size and id from the environment
    Comm(nranks, rank, unique_id)          unique_id from get_unique_id() on one process
    Comm.from_torch(group)                 over a torch.distributed ProcessGroup

    backend: "auto" (default: CUDA when given a device, UnsupportedError in a build without CUDA;
    else CPU), "cpu" or "cuda";
    device: CUDA device ordinal (or torch.device); timeout_ms: bound on every wait for a peer.
    Every collective is called by every rank in the same order, by one thread at a time."""

    def __init__(self, nranks=None, rank=None, unique_id=None, *, backend=None, device=None, timeout_ms=None):
        self._h = c_void_p()
        try:
            cfg, bad = _config(backend, device, timeout_ms), None
        except Exception as e:  # an argument only Python rejects: this rank still meets the others
            cfg, bad = _lib.Config.initializer(), e  # at the creation, with a backend the library rejects,
            cfg.backend = 0x7FFF  # so that they fail at once (RemoteInvalid) instead of waiting for it
        if nranks is None:
            st = L.epx_comm_init_from_env(byref(self._h), byref(cfg))
        else:
            uid = _lib.UniqueId()
            check(L.epx_unique_id_from_string(str(unique_id).encode(), byref(uid)))
            st = L.epx_comm_init_rank(byref(self._h), int(nranks), int(rank), byref(uid), byref(cfg))
        if bad is not None:
            raise bad
        check(st)
        info = self.info()
        self.rank, self.size = info.rank, info.nranks
        self.backend = _BACKEND_NAMES.get(info.backend, str(info.backend))
        self._registered = {}
        self._graveyard = []

    # ---- deferred release -------------------------------------------------------------------------

    def _defer(self, fn, *args):
        """Release something peers may still read (a MoE context, a registered array) only after the next
        collective of this communicator: a rank can return from a call while a slower peer still has to
        open its buffers, and every rank's arrival in a later collective proves it has finished the
        earlier ones. (Releasing at once let the slower peer fail to open them.)"""
        self._graveyard.append((fn, args))

    def _bury(self, n):
        done, self._graveyard = self._graveyard[:n], self._graveyard[n:]
        for fn, args in done:
            fn(*args)

    def _run(self, call):
        """A collective C call; afterwards, releases what was deferred before it started."""
        n = len(self._graveyard)
        st = call()
        if n and (st == SUCCESS or st in _RECOVERABLE):
            self._bury(n)
        return st

    @classmethod
    def from_torch(cls, group=None, *, backend=None, device=None, timeout_ms=None):
        """Collective over a torch.distributed ProcessGroup (default: the world): its rank 0 makes the id
        and every rank receives it through the group. With neither backend nor device given, an NCCL
        group (and CUDA available) gives the CUDA backend on the current device, any other the CPU.
        What fails on one rank before that exchange (rank 0's get_unique_id, e.g. a bootstrap that cannot
        listen) raises there once that rank has taken part in it, and the others raise
        RemoteInvalidError naming it and its message at once, not at torch's timeout. (A rank whose
        torch.cuda.current_device() fails cannot take part in an NCCL group's exchange either: torch
        moves it through the device; it raises, and the others wait for torch's timeout.)"""
        import torch
        import torch.distributed as dist
        if group is None:
            group = dist.group.WORLD
        rank = dist.get_rank(group)
        step = "get its current CUDA device"
        try:
            if backend is None and device is None and torch.cuda.is_available() and \
                    dist.get_backend(group) in ("nccl", "cuda:nccl"):
                device = torch.cuda.current_device()
            step = "make the communicator's id"
            uid = get_unique_id() if rank == 0 else None
        except BaseException as e:
            _torch_exchange(group, failed=(step, e))
            raise
        ids = _torch_exchange(group, uid)
        if backend is None and device is not None:
            backend = "cuda"
        return cls(len(ids), rank, ids[0], backend=backend, device=device, timeout_ms=timeout_ms)

    @property
    def handle(self):
        """The epx_comm_t as an integer."""
        return self._h.value

    def _ptr(self):
        if not self._h:
            raise InvalidArgumentError(-1, "the communicator was destroyed")
        return self._h

    def info(self):
        i = _lib.CommInfo()
        check(L.epx_comm_info(self._ptr(), byref(i)), self._h)
        return CommInfo(i.rank, i.nranks, i.local_rank, i.local_size, i.host, i.num_hosts, i.backend)

    @property
    def last_error(self):
        return (L.epx_comm_get_last_error(self._ptr()) or b"").decode()

    def async_error(self):
        """None while healthy, else the exception of the error that broke the communicator."""
        st = c_int()
        check(L.epx_comm_get_async_error(self._ptr(), byref(st)), self._h)
        if st.value == SUCCESS:
            return None
        from ._errors import error
        return error(st.value, self.last_error)

    def destroy(self):
        """Release the communicator (local). Registered arrays become invalid."""
        for m in list(getattr(self, "_children", ())):
            m.destroy()
        self._bury(len(getattr(self, "_graveyard", ())))
        if self._h:
            for p in list(self._registered):
                L.epx_mem_free(self._h, p)
            self._registered.clear()
            L.epx_comm_destroy(self._h)
            self._h = c_void_p()

    def abort(self):
        """Mark the communicator aborted (waiting peers fail promptly) and release it."""
        refused = []  # contexts with a low-latency send pending on a healthy communicator
        for m in list(getattr(self, "_children", ())):
            try:
                m.destroy()
            except EpxError:
                refused.append(m)
        self._bury(len(getattr(self, "_graveyard", ())))
        if self._h:
            self._registered.clear()
            L.epx_comm_abort(self._h)
            self._h = c_void_p()
        for m in refused:  # with the communicator gone their handles and the contexts can go
            m.destroy()
            self._bury(len(self._graveyard))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is not None and not getattr(exc[1], "recoverable", True):
            self.abort()
        else:
            self.destroy()

    def __del__(self):
        try:
            self.destroy()
        except Exception:
            pass

    # ---- registered memory -------------------------------------------------------------------

    def empty(self, shape, dtype="float32"):
        """A numpy array in registered memory (peers copy from it directly, without process_vm_readv or,
        where that is unavailable, a staging copy). It lives until free() or the communicator's
        destruction."""
        import numpy as np
        dt = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        p = c_void_p()
        check(L.epx_mem_alloc(self._ptr(), max(nbytes, 1), byref(p)), self._h)
        self._registered[p.value] = nbytes
        buf = (ctypes.c_char * max(nbytes, 1)).from_address(p.value)
        buf._epx_comm = self  # the array keeps the communicator (and so its memory) alive
        return np.frombuffer(buf, dtype=dt, count=nbytes // dt.itemsize).reshape(shape)

    def free(self, array):
        p = A.ptr(array)
        if p not in self._registered:
            raise InvalidArgumentError(-1, "array was not made by this communicator's empty()")
        del self._registered[p]
        self._defer(L.epx_mem_free, self._ptr(), p)

    # ---- collectives -------------------------------------------------------------------------

    def barrier(self, stream=None):
        """Returns (CPU) or completes in stream order (CUDA) after every rank has entered it. When
        stream is not a stream, the barrier still runs (on the default stream), then this raises."""
        s = self._collective(lambda: (None, self._stream(stream)), lambda: L.epx_barrier(self._ptr(), None))
        check(self._run(lambda: L.epx_barrier(self._ptr(), s)), self._h)

    def _stream(self, stream):
        """The address of the stream a collective that takes no array runs on: `stream`'s, else torch's
        current stream on the CUDA backend, else none."""
        if stream is None and self.backend == "cuda":
            import torch
            return torch.cuda.current_stream().cuda_stream or None
        return A.stream_handle(stream) if stream is not None else None

    def _collective(self, prepare, fail=None):
        """The local steps before a collective call. prepare() -> (problem, result): this rank's checks
        and conversions (allocations, addresses, the stream). When problem (a message) is set, or
        prepare() raises (not an array, an unknown dtype, a MemoryError, a stream that is not one),
        fail() runs first: the same collective with invalid arguments (default: an alltoallv), so that
        it fails on every rank (the others with RemoteInvalidError) and none waits for this one; then
        InvalidArgumentError(problem), or the exception, is raised here. Else result."""
        fail = fail or (lambda: L.epx_alltoallv(self._ptr(), None, None, None, None, None, None, 99, None))

        def join():
            try:
                self._run(fail)
            except EpxError:  # a destroyed communicator or context: nothing to join
                pass
        try:
            problem, result = prepare()
        except BaseException:
            join()
            raise
        if problem:
            join()
            raise InvalidArgumentError(-1, problem)
        return result

    def _agree(self, prepare):
        """A collective of this rank's local steps alone (no data moves): prepare() -> (problem, result)
        as for _collective, then an empty exchange (on barrier()'s stream). Where prepare() fails on some
        rank, that rank fails the exchange and raises (see _collective), and the others raise
        RemoteInvalidError at once instead of meeting it in a later collective. Else result, once every
        rank's prepare() passed."""
        def prepare_all():
            problem, result = prepare()
            return problem, None if problem else (result, self._stream(None))

        result, s = self._collective(prepare_all)
        z = (c_int64 * self.size)()
        check(self._run(lambda: L.epx_alltoallv(self._ptr(), None, z, z, None, z, z, _lib.U8, s)), self._h)
        return result

    def alltoall(self, send, recv=None, *, dtype=None, stream=None):
        """MPI_Alltoall: send holds size equal blocks (its first axis, or its elements, splits into size
        parts); block p goes to rank p, which stores it as block `rank` of recv. recv (same shape and
        dtype as send) is made when not given. Returns recv."""
        def prepare():
            r = recv
            if r is None:
                r = send.new_empty(send.shape) if A.is_torch(send) else A.np.empty_like(send)
            code = _move_dtype(send, dtype)
            es = _lib.DTYPE_SIZES.get(code, 1)
            n = A.numel(send) * A.itemsize(send)
            problem = None
            if code is None:
                problem = "send's elements are %d bytes: give dtype" % A.itemsize(send)
            elif not A.contiguous(send) or not A.contiguous(r):
                problem = "send and recv must be contiguous"
            elif not A.writable(r):
                problem = "recv is read-only"
            elif A.numel(r) * A.itemsize(r) != n:
                problem = "recv has %d bytes, send %d" % (A.numel(r) * A.itemsize(r), n)
            elif n % (es * self.size):
                problem = "send has %d bytes: not %d blocks of %d-byte elements" % (n, self.size, es)
            if problem:
                return problem, None
            # the addresses and the stream too: nothing left to raise between here and the call
            return None, (r, n // es // self.size, code, A.ptr(send), A.ptr(r), A.stream_of(stream, send))

        recv, count, code, ps, pr, s = self._collective(prepare)
        check(self._run(lambda: L.epx_alltoall(self._ptr(), ps, pr, count, code, s)), self._h)
        return recv

    def alltoallv(self, send, sendcounts, sdispls, recv, recvcounts, rdispls, *, dtype=None, stream=None):
        """MPI_Alltoallv; counts and displacements in elements (sequences of `size` ints). Returns recv."""
        def prepare():
            code, arrs, problem = self._alltoallv_args(send, sendcounts, sdispls, recv, recvcounts, rdispls, dtype)
            if problem:
                return problem, None
            # the addresses and the stream too: nothing left to raise between here and the call
            return None, (code, arrs, A.ptr(send), A.ptr(recv), A.stream_of(stream, send))

        code, arrs, ps, pr, s = self._collective(prepare)
        check(self._run(lambda: L.epx_alltoallv(self._ptr(), ps, arrs[0], arrs[1], pr, arrs[2], arrs[3], code, s)),
              self._h)
        return recv

    def _alltoallv_args(self, send, sendcounts, sdispls, recv, recvcounts, rdispls, dtype):
        """alltoallv's checks and conversions (local): dtype code, the four int64 arrays, and what is
        wrong (None: nothing)."""
        code = _move_dtype(send, dtype)
        es = _lib.DTYPE_SIZES.get(code, 1)
        arrs, vals = [], []
        problem = None if code is not None else "send's elements are %d bytes: give dtype" % A.itemsize(send)
        for name, v in (("sendcounts", sendcounts), ("sdispls", sdispls), ("recvcounts", recvcounts),
                        ("rdispls", rdispls)):
            v = [int(e) for e in v]  # once: an iterator is consumed here
            if len(v) != self.size:
                problem = problem or "%s has %d entries, not %d" % (name, len(v), self.size)
            wide = [e for e in v if not -2**63 <= e < 2**63]  # ctypes would wrap them (past the bounds check)
            if wide:
                problem = problem or "%s holds %d, outside int64" % (name, wide[0])
            vals.append(v)
            arrs.append((c_int64 * self.size)(*v[:self.size]))
        if problem is None:
            for buf, cnt, dsp, name in ((send, vals[0], vals[1], "send"), (recv, vals[2], vals[3], "recv")):
                if not A.contiguous(buf):
                    problem = "%s must be contiguous" % name
                    break
                if buf is recv and not A.writable(buf):
                    problem = "recv is read-only"
                    break
                have = A.numel(buf) * A.itemsize(buf)
                need = max([(d + c) * es for c, d in zip(cnt, dsp) if c > 0] or [0])
                if need > have:
                    problem = "%s has %d bytes; its counts and displacements reach byte %d" % (name, have, need)
                    break
        return code, arrs, problem


# What a rank sends in from_torch's exchange when one of its steps before it raised
_TorchFailure = namedtuple("_TorchFailure", "rank step message")


def _torch_exchange(group, mine=None, failed=None):
    """from_torch's one exchange over the torch group, collective: every rank's `mine` (rank 0's: the
    id, the others': None) goes to every rank. Returns the list of them; RemoteInvalidError, naming
    the first rank that failed and why, when one did. failed: (step, exception) when this rank's
    `step` before the exchange raised: it sends a _TorchFailure instead, so that the others fail at
    once rather than wait for it until torch's timeout, and returns (its caller then raises)."""
    import torch.distributed as dist
    rank = dist.get_rank(group)
    if failed is not None:
        step, e = failed
        mine = _TorchFailure(rank, step, str(e) if isinstance(e, EpxError) else "%s: %s" % (type(e).__name__, e))
    parts = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(parts, mine, group=group)
    except BaseException:
        if failed is None:
            raise
        return None  # the exchange failed too (an NCCL group without a device): the caller's error says why
    bad = [p for p in parts if isinstance(p, _TorchFailure)]
    if bad and failed is None:
        raise RemoteInvalidError(ERR_REMOTE_INVALID, "rank %d could not %s (%s)" % bad[0])
    return parts


def _move_dtype(a, dtype):
    """The dtype an exchange moves: the given one, else one of the array's element size (the data is
    moved byte for byte, so float64 travels as i64)."""
    if dtype is not None:
        return A.epx_dtype(dtype)
    return {1: _lib.U8, 2: _lib.F16, 4: _lib.F32, 8: _lib.I64}.get(A.itemsize(a))


def rank_env():
    """(rank, nranks) set by epx-run, or None outside it."""
    if "EPX_RANK" in os.environ and "EPX_NRANKS" in os.environ:
        return int(os.environ["EPX_RANK"]), int(os.environ["EPX_NRANKS"])
    return None
