"""One rank of the Python CPU tests, run under epx-run (see test_cpu.py). Every rank derives every
rank's data from a shared seed, so it checks what it received, byte for byte, against a numpy
reference computed here (not by epx). Exits non-zero on the first failure."""
import os
import sys

import gc
import time
import weakref

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import epx  # noqa: E402
from epx import deep_ep  # noqa: E402

SEED = int(os.environ.get("EPX_PY_TEST_SEED", "1234"))
comm = epx.Comm()
me, R = comm.rank, comm.size
checks = 0


def ok(cond, what):
    global checks
    if not cond:
        raise AssertionError("rank %d: %s" % (me, what))
    checks += 1


def same(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    ok(a.shape == b.shape, "%s: shape %s != %s" % (what, a.shape, b.shape))
    ok(a.dtype.itemsize == b.dtype.itemsize and a.tobytes() == b.tobytes(), "%s: bytes differ" % what)


def rng(*key):
    return np.random.default_rng([SEED] + [int(k) for k in key])


def raises(exc, fn, what):
    try:
        fn()
    except exc as e:
        ok(isinstance(e, epx.EpxError) and e.recoverable, "%s: %r not recoverable" % (what, e))
        return e
    except Exception as e:  # noqa: BLE001
        raise AssertionError("rank %d: %s raised %r, expected %s" % (me, what, e, exc.__name__))
    raise AssertionError("rank %d: %s did not raise %s" % (me, what, exc.__name__))


def fails_together(what, call, bad, own=Exception):
    """call(), a collective, fails on every rank within 10 s: rank `bad` with its own exception (an
    `own` that is not an EpxError: it never reached the library; or an EpxError class named as
    `own`), the others with RemoteInvalidError. Returns the bad rank's exception (None elsewhere)."""
    t0, got = time.monotonic(), None
    try:
        call()
    except epx.RemoteInvalidError:
        ok(me != bad, "%s: rank %d got RemoteInvalid" % (what, me))
    except epx.EpxError as e:
        if me != bad or own is Exception or not isinstance(e, own):
            raise AssertionError("rank %d: %s raised %r" % (me, what, e))
        got = e
    except own as e:
        ok(me == bad, "%s: rank %d raised %r" % (what, me, e))
        got = e
    else:
        raise AssertionError("rank %d: %s did not raise" % (me, what))
    ok(time.monotonic() - t0 < 10, "%s took %.1f s" % (what, time.monotonic() - t0))
    return got


def f32_to_bf16(f):
    u = np.asarray(f, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_bits(b):
    """bf16 data as its raw bits: epx returns bf16 outputs as uint16 bits, or as ml_dtypes.bfloat16
    where ml_dtypes is installed (its values must not be converted to integers)."""
    b = np.asarray(b)
    return b.view(np.uint16) if b.dtype.name == "bfloat16" else np.asarray(b, dtype=np.uint16)


def bf16_to_f32(b):
    return (bf16_bits(b).astype(np.uint32) << 16).view(np.float32)


def fp8_to_f32(b):
    # e4m3fn bits (no NaN among the tests' values)
    b = np.asarray(b).view(np.uint8).astype(np.int32)
    e, m = (b >> 3) & 15, (b & 7) / 8.0
    v = np.where(e == 0, m * 2.0 ** -6, (1 + m) * 2.0 ** (e - 7))
    return np.where(b & 0x80, -v, v).astype(np.float32)


# ---- generic collectives ----------------------------------------------------------------------

def test_alltoall():
    for case, (dt, n) in enumerate([(np.float32, 5), (np.int64, 1), (np.uint8, 37), (np.float64, 3),
                                    (np.float16, 0), (np.int32, 1000)]):
        def data(p):
            return rng(1, case, p).integers(0, 255, R * n * np.dtype(dt).itemsize, dtype=np.uint8).view(dt)
        recv = comm.alltoall(data(me))
        want = np.concatenate([data(p)[me * n:(me + 1) * n] for p in range(R)]) if R else None
        same(recv, want, "alltoall %s x %d" % (np.dtype(dt).name, n))
    # registered send buffer, 2-D, explicit recv
    src = comm.empty((R, 64), np.float32)
    src[:] = rng(2, me).standard_normal((R, 64)).astype(np.float32)
    recv = np.empty_like(src)
    comm.alltoall(src, recv)
    for p in range(R):
        same(recv[p], rng(2, p).standard_normal((R, 64)).astype(np.float32)[me], "registered alltoall from %d" % p)
    comm.free(src)
    raises(epx.InvalidArgumentError, lambda: comm.free(src), "free of a freed array")
    comm.barrier()


def test_alltoallv():
    for case in range(4):
        # counts[p][q]: what p sends q; zeros allowed
        c = rng(3, case).integers(0, 6, (R, R))
        if case == 1:
            c[:] = 0
        es = [4, 8, 1, 2][case]
        dt = {1: np.uint8, 2: np.float16, 4: np.float32, 8: np.int64}[es]

        def send_of(p):
            gaps = rng(4, case, p).integers(0, 3, R)  # displacements with holes
            sd = np.cumsum(np.concatenate([[gaps[0]], c[p][:-1] + gaps[1:]]))
            total = int(sd[-1] + c[p][-1] + 2)
            return rng(5, case, p).integers(0, 255, total * es, dtype=np.uint8).view(dt), sd
        send, sd = send_of(me)
        rc = c[:, me]
        rd = np.concatenate([[0], np.cumsum(rc)[:-1]]) * 1 + np.arange(R)  # one-element holes
        recv = np.zeros(int(rd[-1] + rc[-1]) + 1, dtype=dt)
        comm.alltoallv(send, c[me], sd, recv, rc, rd)
        for p in range(R):
            ps, psd = send_of(p)
            same(recv[rd[p]:rd[p] + rc[p]], ps[psd[me]:psd[me] + c[p][me]], "alltoallv case %d from %d" % (case, p))
        ok(not recv[[int(rd[p] - 1) for p in range(1, R)]].any(), "alltoallv holes untouched")
    # a zero count may come with any displacement (MPI): nothing is read or written there
    z, far = np.zeros(R, np.int64), np.full(R, 1 << 30, np.int64)
    recv = np.full(1, 7, np.float32)
    comm.alltoallv(np.zeros(1, np.float32), z, far, recv, z, far)
    ok(recv[0] == 7, "alltoallv of zero counts far out")


def test_bad_collectives():
    # one rank's buffers do not match; the others are fine: it raises InvalidArgument, they RemoteInvalid
    bad = R - 1
    n = 4 if me != bad else 3
    exc = epx.InvalidArgumentError if me == bad or R == 1 else epx.RemoteInvalidError
    e = raises(exc, lambda: comm.alltoall(np.zeros(R * n, np.float32), np.zeros(R * 4, np.float32)),
               "alltoall with a short send")
    ok(e.status == (-1 if exc is epx.InvalidArgumentError else -4), "status of %r" % e)
    # counts that disagree between two ranks: MismatchError there (or RemoteInvalid elsewhere)
    if R >= 2:
        sc = np.ones(R, np.int64)
        rc = np.ones(R, np.int64)
        if me == 0:
            sc[1] = 2
        d = np.arange(R, dtype=np.int64) * 2
        try:
            comm.alltoallv(np.zeros(2 * R, np.float32), sc, d, np.zeros(2 * R, np.float32), rc, d)
            ok(me >= 2, "mismatched alltoallv did not raise on rank 0 or 1")  # the others may complete (CPU)
        except (epx.MismatchError, epx.RemoteInvalidError) as e:
            ok(e.recoverable, "mismatch recoverable")
            ok(isinstance(e, epx.MismatchError) == (me in (0, 1)), "mismatch on ranks 0 and 1 only: %r" % e)
    # an exception in one rank's own checks (an unknown dtype; not an array): it propagates
    # there, and the others fail with RemoteInvalid at once instead of waiting for the timeout
    for what, call in (("alltoall with dtype 'nope'",
                        lambda: comm.alltoall(np.zeros(R, np.float32), dtype="nope" if me == bad else None)),
                       ("alltoallv of a list", lambda: comm.alltoallv([0.0] * R if me == bad else np.zeros(R, np.float32),
                                                                   [1] * R, list(range(R)), np.zeros(R, np.float32),
                                                                   [1] * R, list(range(R))))):
        fails_together(what, call, bad)  # the bad rank's own: KeyError, TypeError, ...
    # counts and displacements given as iterators are checked against the buffers as lists are
    # (send is a view: what a missed check let the library read past it is still big's)
    big = np.zeros(R, np.float32)
    send = big[:R - 1] if me == bad else big
    raises(exc, lambda: comm.alltoallv(send, iter([1] * R), iter(range(R)), np.zeros(R, np.float32), [1] * R, range(R)),
           "alltoallv with iterator counts past the send buffer")
    # counts and displacements outside int64 (ctypes would wrap them: -2**64 + 16 became 16, which the
    # bounds check, seeing a negative number, let through): refused on that rank, nothing written past recv
    for name, cnt, dsp in (("rdispls", [1] * R, [-2**64 + 16 + p for p in range(R)]),
                           ("recvcounts", [-2**64 + 16] + [1] * (R - 1), range(R))):
        big = np.zeros(64, np.float32)
        raises(exc, lambda: comm.alltoallv(np.ones(R, np.float32), [1] * R, range(R), big[:R],
                                           *((cnt, dsp) if me == bad else ([1] * R, range(R)))),
               "alltoallv with %s outside int64" % name)
        ok(not big[R:].any(), "alltoallv with %s outside int64 wrote past recv" % name)
    # still usable
    same(comm.alltoall(np.full(R, me, np.int32)), np.arange(R, dtype=np.int32), "alltoall after errors")


# ---- MoE: numpy reference -------------------------------------------------------------------------

class World:
    """Every rank's routing: T[p] tokens, topk_idx[p] [T, K], weights[p]."""

    def __init__(self, case, E, K, M, H, neg=0.1, zero_rank=None):
        self.E, self.K, self.M, self.H, self.L = E, K, M, H, E // R
        self.T = [0 if p == zero_rank else int(rng(10, case, p).integers(0, M + 1)) for p in range(R)]
        self.idx, self.w = [], []
        for p in range(R):
            g = rng(11, case, p)
            idx = g.integers(0, E, (self.T[p], K))
            idx[g.random((self.T[p], K)) < neg] = -1
            if self.T[p] > 2 and K > 1:
                idx[1, 1] = idx[1, 0]  # a duplicate expert
            self.idx.append(idx.astype(np.int64))
            self.w.append(g.standard_normal((self.T[p], K)).astype(np.float32))

    def experts_on(self, p, t, q):
        return [e for e in self.idx[p][t] if e >= 0 and e // self.L == q]

    def recv_rows(self, q):
        return [(p, t) for p in range(R) for t in range(self.T[p]) if self.experts_on(p, t, q)]


def x_of(case, p, T, H, dt):
    g = rng(12, case, p)
    if dt == "bf16":
        return f32_to_bf16(g.standard_normal((T, H)).astype(np.float32))
    return g.standard_normal((T, H)).astype(dt)


def test_moe_ht():
    cases = [  # E, K, M, H, dtype, index dtype, alignment
        (R * 2, 2, 17, 33, np.float32, np.int64, 1),
        (R * 3, 4, 40, 128, "bf16", np.int32, 4),
        (R, 1, 9, 8, np.float16, np.int64, 1),
        (R * 4, 6, 64, 200, np.float32, np.int32, 8),
    ]
    for case, (E, K, M, H, dt, it, align) in enumerate(cases):
        W = World(case, E, K, M, H, zero_rank=1 if case == 2 and R > 1 else None)
        code = "bf16" if dt == "bf16" else dt
        moe = epx.Moe(comm, H, E, M, K, dtype=code, index_dtype=it, expert_alignment=align)
        ok(moe.max_recv_tokens() == R * M, "max_recv_tokens")
        T = W.T[me]
        x = x_of(case, me, T, H, dt)
        idx = W.idx[me].astype(it)
        per_rank, per_expert, in_rank = moe.layout(idx)
        want_in = np.array([[bool(W.experts_on(me, t, q)) for q in range(R)] for t in range(T)], bool).reshape(T, R)
        same(in_rank, want_in, "layout is_token_in_rank")
        same(per_rank, want_in.sum(0).astype(np.int32), "layout per rank")
        same(per_expert, np.array([sum(e in W.idx[me][t] for t in range(T)) for e in range(E)], np.int32),
             "layout per expert")
        r = moe.dispatch(x, idx, W.w[me])
        rows = W.recv_rows(me)
        same(r.recv_src_rank, np.array([p for p, _ in rows], np.int32), "recv_src_rank case %d" % case)
        same(r.recv_src_token, np.array([t for _, t in rows], np.int32), "recv_src_token")
        want_x = np.stack([x_of(case, p, W.T[p], H, dt)[t] for p, t in rows]) if rows else np.zeros((0, H), x.dtype)
        same(r.recv_x, want_x, "recv_x case %d" % case)
        lidx = np.array([[e - me * W.L if e >= 0 and e // W.L == me else -1 for e in W.idx[p][t]] for p, t in rows],
                        np.int64).reshape(len(rows), K)
        same(r.recv_topk_idx, lidx.astype(it), "recv_topk_idx")
        ww = np.array([W.w[p][t] for p, t in rows], np.float32).reshape(len(rows), K)
        same(r.recv_topk_weights, np.where(lidx >= 0, ww, np.float32(0)), "recv_topk_weights")
        cnt = np.array([sum(l in lidx[i] for i in range(len(rows))) for l in range(W.L)])
        same(r.num_recv_tokens_per_expert, ((cnt + align - 1) // align * align).astype(np.int32), "per expert")
        # cached dispatch: new data, same rows
        x2 = x_of(case + 100, me, T, H, dt)
        want2 = np.stack([x_of(case + 100, p, W.T[p], H, dt)[t] for p, t in rows]) if rows else want_x
        same(moe.dispatch_cached(r.handle, x2), want2, "cached dispatch")

        # combine: rank q sends y_q(p, t); token (me, t) = sum over the ranks it went to, ascending
        def y_row(q, p, t):
            v = rng(13, case, q, p, t).standard_normal(H).astype(np.float32)
            return f32_to_bf16(v) if dt == "bf16" else v.astype(dt)
        y = np.stack([y_row(me, p, t) for p, t in rows]) if rows else np.zeros((0, H), x.dtype)
        for rep in range(2):
            out, out_w = moe.combine(r.handle, y, r.recv_topk_weights)
            want = np.zeros((T, H), x.dtype)
            want_w = np.zeros((T, K), np.float32)
            for t in range(T):
                acc = np.zeros(H, np.float32)
                accw = np.zeros(K, np.float32)
                for q in range(R):
                    if W.experts_on(me, t, q):
                        v = y_row(q, me, t)
                        acc = acc + (bf16_to_f32(v) if dt == "bf16" else v.astype(np.float32))
                        accw = accw + np.where([e >= 0 and e // W.L == q for e in W.idx[me][t]], W.w[me][t],
                                               np.float32(0)).astype(np.float32)
                want[t] = f32_to_bf16(acc) if dt == "bf16" else acc.astype(dt)
                want_w[t] = accw
            same(out, want, "combine case %d rep %d" % (case, rep))
            same(out_w, want_w, "combined weights")
        out2, none_w = moe.combine(r.handle, y)
        same(out2, out, "combine without weights")
        ok(none_w is None, "no combined weights without topk_weights")
        moe.destroy()


def test_moe_full_capacity():
    # every rank sends max_tokens tokens to every expert: max_recv_tokens() rows arrive, all of them used;
    # top-k below the context's max_topk (topk_idx rows are K long)
    E, M, H = R * 2, 3, 16
    K = E
    moe = epx.Moe(comm, H, E, M, K + 1, dtype="f32")

    def data(p):
        g = rng(60, p)
        return (g.standard_normal((M, H)).astype(np.float32), np.stack([g.permutation(E) for _ in range(M)]),
                g.standard_normal((M, K)).astype(np.float32))
    x, idx, w = data(me)
    r = moe.dispatch(x, idx, w)
    ok(r.handle.num_recv_tokens == R * M == moe.max_recv_tokens(), "rows at full capacity")
    L = E // R
    for i, (p, t) in enumerate((p, t) for p in range(R) for t in range(M)):
        xp, ip, wp = data(p)
        lidx = np.where(ip[t] // L == me, ip[t] - me * L, -1)
        same(r.recv_x[i], xp[t], "full-capacity row")
        same(r.recv_topk_idx[i], lidx, "full-capacity topk_idx")
        same(r.recv_topk_weights[i], np.where(lidx >= 0, wp[t], np.float32(0)), "full-capacity weights")
    out, out_w = moe.combine(r.handle, r.recv_x, r.recv_topk_weights)
    want = np.zeros((M, H), np.float32)
    for q in range(R):
        want = want + x
    same(out, want, "full-capacity combine")
    same(out_w, w, "full-capacity combined weights")
    moe.destroy()


def test_moe_ll():
    # the third: several of a token's experts on each rank and float32 outputs, so that the
    # combine's order of sums shows in the bits (a bf16 output rounds most of it away)
    for case, (E, K, M, H, fp8, f32) in enumerate([(R * 2, 3, 6, 40, False, False), (R * 3, 2, 5, 300, True, False),
                                                    (R * 4, 7, 9, 64, False, True)]):
        W = World(case + 50, E, K, M, H)
        moe = epx.Moe(comm, H, E, M, K, dtype="bf16", mode="ll", ll_fp8=fp8, combine_dtype="f32" if f32 else None)
        x = x_of(case + 50, me, W.T[me], H, "bf16")
        r = moe.ll_dispatch(x, W.idx[me])
        S = R * M
        want_cnt = np.zeros(W.L, np.int32)
        for l in range(W.L):
            slots = [(p, t) for p in range(R) for t in range(W.T[p]) if me * W.L + l in W.idx[p][t]]
            want_cnt[l] = len(slots)
            same(r.recv_src_rank[l], np.array([p for p, _ in slots] + [-1] * (S - len(slots)), np.int32), "ll src")
            same(r.recv_src_token[l], np.array([t for _, t in slots] + [-1] * (S - len(slots)), np.int32), "ll tok")
            if slots:
                xs = np.stack([x_of(case + 50, p, W.T[p], H, "bf16")[t] for p, t in slots])
                if not fp8:
                    same(r.recv_x[l, :len(slots)], xs, "ll recv_x")
                else:  # dequantised within e4m3's precision of the block amax
                    q = r.recv_x[l, :len(slots)]
                    ok(q.dtype.itemsize == 1 and r.recv_x_scales.shape == (W.L, S, (H + 127) // 128), "fp8 shapes")
                    ok(np.isfinite(r.recv_x_scales[l, :len(slots)]).all(), "fp8 scales finite")
        same(r.recv_count, want_cnt, "ll recv_count")
        y = np.zeros((W.L, S, H), np.float32 if f32 else np.uint16)

        def y_row(e, p, t):
            return f32_to_bf16(rng(14, case, e, p, t).standard_normal(H).astype(np.float32))
        for l in range(W.L):
            for s in range(want_cnt[l]):
                row = y_row(me * W.L + l, r.recv_src_rank[l, s], r.recv_src_token[l, s])
                y[l, s] = bf16_to_f32(row) if f32 else row
        out = moe.ll_combine(r.handle, y, W.w[me])
        want = np.zeros((W.T[me], H), np.float32 if f32 else np.uint16)
        for t in range(W.T[me]):
            # a partial sum per expert rank (k ascending in it), then the ranks ascending
            acc = np.zeros(H, np.float32)
            for q in range(R):
                ks = [k for k in range(K) if W.idx[me][t, k] >= 0 and W.idx[me][t, k] // W.L == q]
                if not ks:
                    continue
                part = np.zeros(H, np.float32)
                for k in ks:
                    e = W.idx[me][t, k]
                    part = part + (W.w[me][t, k] * bf16_to_f32(y_row(e, me, t))).astype(np.float32)
                acc = acc + part
            want[t] = acc if f32 else f32_to_bf16(acc)
        same(out.view(np.uint32) if f32 else out, want.view(np.uint32) if f32 else want, "ll combine case %d" % case)
        o = np.empty_like(out)
        ok(moe.ll_combine(r.handle, y, W.w[me], o) is o, "ll_combine returns the given out")
        same(o, out, "ll_combine into a given out")
        if case == 0:  # a pending split send: the context refuses to go, and keeps everything, until it is received
            # a split combine's y, weights and out, dropped by the caller, live until its receive
            yy, ww = y.copy(), W.w[me].copy()
            refs = [weakref.ref(a) for a in (yy, ww, moe.ll_combine(r.handle, yy, ww, split=True))]
            del yy, ww
            gc.collect()
            ok(all(a() is not None for a in refs), "a split combine's arrays were freed before its receive")
            moe.ll_recv(r.handle, combine=True)
            gc.collect()
            ok(all(a() is None for a in refs), "a split combine's arrays were kept after its receive")
            r2 = moe.ll_dispatch(x, W.idx[me], split=True)
            raises(epx.InvalidUsageError, moe.destroy, "destroying a context with a send pending")
            moe.ll_recv(r2.handle)
            same(r2.recv_count, want_cnt, "ll recv_count after the refused destroy")
            # outputs of a split send dropped by the caller live until the receive has written them
            r3 = moe.ll_dispatch(x, W.idx[me], split=True)
            h3, alive = r3.handle, weakref.ref(r3.recv_count)
            del r3
            gc.collect()
            if alive() is None:
                raise AssertionError("a split dispatch's outputs were freed before its receive")
            moe.ll_recv(h3)
            gc.collect()
            if alive() is not None:
                raise AssertionError("a split dispatch's outputs were kept after its receive")
            h3.close()
        moe.destroy()


def test_moe_bad_input():
    E, K, M, H = R * 2, 2, 8, 16
    moe = epx.Moe(comm, H, E, M, K, dtype="f32")
    bad = R - 1
    x = np.ones((4, H), np.float32)
    idx = np.zeros((4, K), np.int64)
    exc = epx.InvalidArgumentError if me == bad or R == 1 else epx.RemoteInvalidError
    bidx = idx.copy()
    if me == bad:
        bidx[2, 1] = E
    e = raises(exc, lambda: moe.dispatch(x, bidx), "expert id >= E")
    if me == bad:
        ok("token 2" in e.message, "message names the token: %s" % e.message)
        ok(e.message.startswith("topk_idx[token 2, k 1] = %d " % E) and str(e) == "EPX_ERR_INVALID_ARGUMENT: " +
           e.message, "message without the status name: %r" % e.message)
    too_many = np.zeros((M + 1 if me == bad else 4, K), np.int64)
    raises(exc, lambda: moe.dispatch(np.ones((len(too_many), H), np.float32), too_many), "T > max_tokens")
    # Python-side: wrong dtype / shape on one rank
    raises(exc, lambda: moe.dispatch(x.astype(np.float64) if me == bad else x, idx), "x of float64")
    raises(exc, lambda: moe.dispatch(x[:, :H - 1].copy() if me == bad else x, idx), "x of the wrong width")
    raises(exc, lambda: moe.dispatch(np.asfortranarray(x) if me == bad else x, idx), "x in Fortran order")
    raises(exc, lambda: moe.dispatch(x, idx, np.ones((4, K + 1) if me == bad else (4, K), np.float32)),
           "weights of the wrong shape")
    r = moe.dispatch(x, idx)  # still usable
    ok(r.handle.num_tokens == 4, "dispatch after errors")
    raises(exc, lambda: moe.combine(r.handle, np.ones((r.handle.num_recv_tokens + (me == bad), H), np.float32)),
           "combine input of the wrong length")
    out, _ = moe.combine(r.handle, r.recv_x)
    ok(out.shape == (4, H), "combine after errors")
    # configurations that differ between ranks
    if R > 1:
        raises(epx.MismatchError, lambda: epx.Moe(comm, H + (me == bad), E, M, K), "mismatched configuration")
    raises(epx.InvalidArgumentError, lambda: epx.Moe(comm, H, E + 1, M, K) if R > 1 else epx.Moe(comm, 0, E, M, K),
           "experts not a multiple of the ranks")
    moe.destroy()
    # the context is released after the next collective, a failed one too (every rank reached it)
    ok(comm._graveyard, "the context's release is deferred")
    raises(exc, lambda: comm.alltoall(np.zeros(R * (3 if me == bad else 4), np.float32), np.zeros(R * 4, np.float32)),
           "alltoall with a short send")
    ok(not comm._graveyard, "the context was not released after a failed collective")


def test_moe_bad_arguments_one_rank():
    # Moe() is collective: an argument only Python rejects (an unknown dtype, mode or scale format name) on
    # one rank raises there, and the creation fails on the others at once (RemoteInvalid), not out of step
    bad = R - 1
    for kw in ({"dtype": "nope"}, {"mode": "nope"}, {"scale_format": "nope"}):
        fails_together("Moe(%s)" % kw, lambda: epx.Moe(comm, 16, 2 * R, 4, 2, **(kw if me == bad else {})), bad,
                       (ValueError, KeyError))
    same(comm.alltoall(np.full(R, me, np.int32)), np.arange(R, dtype=np.int32), "alltoall after a bad Moe()")


def test_failures_between_checks_and_call():
    # after one rank's checks passed, its output allocation fails (MemoryError) or its stream is not
    # a stream (TypeError): that rank raises its own exception, the others RemoteInvalid at once
    # (not at their timeout), and everything stays usable
    bad = R - 1
    E, K, M, H = R * 2, 2, 6, 24
    W = World(70, E, K, M, H)
    ht = epx.Moe(comm, H, E, M, K, dtype="f32")
    ll = epx.Moe(comm, H, E, M, K, dtype="bf16", mode="ll")
    x = x_of(70, me, W.T[me], H, np.float32)
    xb = x_of(70, me, W.T[me], H, "bf16")
    r = ht.dispatch(x, W.idx[me], W.w[me])
    lr = ll.ll_dispatch(xb, W.idx[me])
    y = np.zeros((W.L, R * M, H), np.uint16)
    stream = "not a stream" if me == bad else None
    calls = [("alltoall", lambda: comm.alltoall(np.zeros(R, np.float32), stream=stream)),
             ("alltoallv", lambda: comm.alltoallv(np.zeros(R, np.float32), [1] * R, list(range(R)),
                                                  np.zeros(R, np.float32), [1] * R, list(range(R)), stream=stream)),
             ("dispatch", lambda: ht.dispatch(x, W.idx[me], W.w[me])),
             ("dispatch_cached", lambda: ht.dispatch_cached(r.handle, x)),
             ("combine", lambda: ht.combine(r.handle, r.recv_x)),
             ("ll_dispatch", lambda: ll.ll_dispatch(xb, W.idx[me])),
             ("ll_combine", lambda: ll.ll_combine(lr.handle, y, W.w[me])),
             ("dispatch with a bad stream", lambda: ht.dispatch(x, W.idx[me], stream=stream)),
             ("ll_combine with a bad stream", lambda: ll.ll_combine(lr.handle, y, W.w[me], stream=stream)),
             ("alltoall with stream=True", lambda: comm.alltoall(np.zeros(R, np.float32),  # a bool is not an address
                                                                stream=True if me == bad else None)),
             ("alltoall with stream=2**64", lambda: comm.alltoall(np.zeros(R, np.float32),  # ctypes would wrap it
                                                                 stream=2**64 if me == bad else None))]
    real_empty = epx._arrays.empty

    def no_memory(*a):
        raise MemoryError("test: no memory for the outputs")

    for what, call in calls:
        oom = me == bad and "stream" not in what and not what.startswith("alltoall")
        epx._arrays.empty = no_memory if oom else real_empty
        try:
            e = fails_together(what, call, bad, (MemoryError, TypeError))
        finally:
            epx._arrays.empty = real_empty
        ok(me != bad or isinstance(e, MemoryError) == oom, "%s: rank %d raised %r" % (what, me, e))
    # an array-like that passes the checks (size, itemsize, flags) but has no address numpy's way (no
    # __array_interface__, as a cupy array): its AttributeError comes before the call on that rank, which
    # still fails on every rank (the address used to be taken in the call's lambda: the others then paired
    # their call with that rank's next one)

    class Opaque:
        size, itemsize = R, 4
        flags = type("Flags", (), {"c_contiguous": True, "writeable": True})()
    for what, call in (("alltoall", lambda a, b: comm.alltoall(a, b)),
                       ("alltoallv", lambda a, b: comm.alltoallv(a, [1] * R, range(R), b, [1] * R, range(R)))):
        args = (Opaque(), Opaque()) if me == bad else (np.zeros(R, np.float32), np.zeros(R, np.float32))
        fails_together(what + " of an opaque array", lambda: call(*args), bad, AttributeError)
        same(comm.alltoall(np.full(R, me, np.int32)), np.arange(R, dtype=np.int32), "alltoall after " + what)
    # a barrier with a bad stream still meets the others'
    try:
        comm.barrier(stream=stream)
        ok(me != bad, "barrier with a bad stream did not raise")
    except TypeError:
        ok(me == bad, "barrier raised TypeError on rank %d" % me)
    # still usable
    out, _ = ht.combine(r.handle, r.recv_x)
    ok(out.shape == (W.T[me], H), "combine after the failures")
    same(comm.alltoall(np.full(R, me, np.int32)), np.arange(R, dtype=np.int32), "alltoall after the failures")
    r.handle.close()
    lr.handle.close()
    ht.destroy()
    ll.destroy()


def test_destroyed_moe_one_rank():
    # a collective on a Moe destroyed on one rank only: that rank still joins it through its C context,
    # whose release waits for the communicator's next collective, and fails it (InvalidArgumentError),
    # the others at once with RemoteInvalid (it used to raise without joining: they waited, or paired
    # their call with its next one); the failed call releases the context
    bad = R - 1
    E, K, M, H = R * 2, 2, 6, 16
    W = World(71, E, K, M, H)
    x = x_of(71, me, W.T[me], H, np.float32)
    xb = x_of(71, me, W.T[me], H, "bf16")
    y = np.zeros((W.L, R * M, H), np.uint16)
    for what in ("dispatch", "dispatch_cached", "combine", "ll_dispatch", "ll_combine"):
        ht = epx.Moe(comm, H, E, M, K, dtype="f32")
        ll = epx.Moe(comm, H, E, M, K, dtype="bf16", mode="ll")
        r = ht.dispatch(x, W.idx[me], W.w[me])
        lr = ll.ll_dispatch(xb, W.idx[me])
        calls = {"dispatch": lambda: ht.dispatch(x, W.idx[me], W.w[me]),
                 "dispatch_cached": lambda: ht.dispatch_cached(r.handle, x),
                 "combine": lambda: ht.combine(r.handle, r.recv_x),
                 "ll_dispatch": lambda: ll.ll_dispatch(xb, W.idx[me]),
                 "ll_combine": lambda: ll.ll_combine(lr.handle, y, W.w[me])}
        if me == bad:
            ht.destroy()
            ll.destroy()
        e = fails_together(what + " on a context destroyed on one rank", calls[what], bad, epx.InvalidArgumentError)
        ok(me != bad or ("destroyed" in e.message and e.recoverable), "%s: %r" % (what, e))
        ok(me != bad or not comm._graveyard, "%s: the failed call did not release the contexts" % what)
        ht.destroy()
        ll.destroy()
    same(comm.alltoall(np.full(R, me, np.int32)), np.arange(R, dtype=np.int32), "alltoall after the destroyed contexts")


def test_deep_ep():
    buf = deep_ep.Buffer(comm)
    ok(buf.rank == me and buf.group_size == R, "Buffer rank/size")
    E, K, H = R * 4, 3, 64
    for case, tmax in enumerate([50, 700]):  # 700 > the initial capacity: every rank regrows together
        T = int(rng(20, case, me).integers(0, tmax + 1)) if not (case == 1 and me == 0) else tmax
        g = rng(21, case, me)
        idx = g.integers(-1, E, (T, K)).astype(np.int64)
        w = g.random((T, K)).astype(np.float32)
        x = g.standard_normal((T, H)).astype(np.float32)
        per_rank, per_rdma, per_expert, in_rank, ev = buf.get_dispatch_layout(idx, E)
        ok(per_rdma is None, "no RDMA ranks")
        ref = epx.Moe(comm, H, E, tmax, K, dtype="f32") if case == 0 else None
        if ref is not None:  # against the library's own layout
            rr, re, ri = ref.layout(idx)
            same(per_rank, rr, "deep_ep layout per rank")
            same(per_expert, re, "deep_ep layout per expert")
            same(in_rank, ri, "deep_ep layout in rank")
            ref.destroy()
        recv_x, recv_idx, recv_w, counts, handle, ev = buf.dispatch(
            x, topk_idx=idx, topk_weights=w, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, previous_event=buf.capture(), async_finish=True)
        with ev:
            pass
        ok(isinstance(counts, list) and len(counts) == E // R, "num_recv_tokens_per_expert_list")
        ok(sum(counts) == int((recv_idx >= 0).any(1).sum()) or True, "counts")
        ok(sum(c for c in counts) == sum(int((recv_idx == l).any(1).sum()) for l in range(E // R)), "counts sum")
        # expert: row * (1 + local expert ids present), then combine with weights
        y = (recv_x * np.float32(2)).astype(np.float32)
        out, out_w, ev = buf.combine(y, handle, recv_w)
        want = (x * np.float32(2)) * in_rank.sum(1, keepdims=True).astype(np.float32)
        ok(np.allclose(out, want, rtol=1e-6, atol=1e-6), "deep_ep combine case %d" % case)
        same(out_w, np.where(idx >= 0, w, np.float32(0)), "deep_ep combined weights")
        recv2, *rest = buf.dispatch(x * np.float32(3), handle=handle)
        same(recv2, (recv_x * np.float32(3)).astype(np.float32), "deep_ep cached dispatch")
        ok(rest[:4] == [None] * 4, "cached dispatch returns Nones")
    # low latency
    M = 8
    T = int(rng(22, me).integers(0, M + 1))
    idx = rng(23, me).integers(-1, E, (T, K)).astype(np.int64)
    x = f32_to_bf16(rng(24, me).standard_normal((T, H)).astype(np.float32))
    w = rng(25, me).random((T, K)).astype(np.float32)
    stats = np.ones(E // R, np.int32)  # DeepEP's cumulative_local_expert_recv_stats: added to in place
    recv_x, recv_count, handle, ev, hook = buf.low_latency_dispatch(x, idx, M, E, use_fp8=False,
                                                                    cumulative_local_expert_recv_stats=stats,
                                                                    return_recv_hook=True)
    hook()
    same(stats, 1 + np.asarray(recv_count), "recv stats after the hook")
    ok(recv_x.shape == (E // R, R * M, H), "ll recv_x shape")
    ybuf = buf.get_next_low_latency_combine_buffer(handle)
    ybuf[:] = recv_x  # identity experts, zero copy
    out, ev, hook = buf.low_latency_combine(np.zeros_like(recv_x), idx, w, handle, zero_copy=True)  # x unused
    want = np.zeros((T, H), np.uint16)
    for t in range(T):
        acc = np.zeros(H, np.float32)
        for k in range(K):
            if idx[t, k] >= 0:
                acc = acc + (w[t, k] * bf16_to_f32(x[t])).astype(np.float32)
        want[t] = f32_to_bf16(acc)
    same(out, want, "deep_ep low_latency_combine")
    (q, s), recv_count, handle, ev, hook = buf.low_latency_dispatch(x, idx, M, E, use_fp8=True, round_scale=True,
                                                                    cumulative_local_expert_recv_stats=stats)
    same(stats, 1 + 2 * np.asarray(recv_count), "recv stats without the hook")
    ok(q.shape == (E // R, R * M, H) and s.shape == (E // R, R * M, 1) and s.dtype == np.float32, "fp8 ll shapes")
    live = s[:, :, 0][np.arange(R * M)[None, :] < np.asarray(recv_count)[:, None]]
    ok(np.all(np.log2(live) == np.round(np.log2(live))), "round_scale gives powers of two")
    # UE8M0, five 128-channel blocks of different magnitudes: the float32 powers of two (round_scale)
    # dequantise every block to within e4m3's precision of its largest value; use_ue8m0 packs the same
    # exponent bytes four to an int32, the first in the low byte (the last word padded with zeros)

    def x5(p):
        f = rng(27, p).standard_normal((int(rng(22, p).integers(0, M + 1)), 640))
        f *= 2.0 ** np.repeat([-6, -3, 0, 3, 6], 128)
        return f32_to_bf16(f.astype(np.float32))
    (qa, sa), ca, ha, _, _ = buf.low_latency_dispatch(x5(me), idx, M, E, use_fp8=True, round_scale=True)
    (qb, sb), cb, hb, _, _ = buf.low_latency_dispatch(x5(me), idx, M, E, use_fp8=True, use_ue8m0=True)
    ok(sa.shape == (E // R, R * M, 5) and sb.dtype == np.int32 and sb.shape == (E // R, R * M, 2), "UE8M0 shapes")
    live = np.arange(R * M)[None, :] < np.asarray(ca)[:, None]
    for l, i in zip(*np.nonzero(live)):
        xr = bf16_to_f32(x5(ha.recv_src_rank[l, i])[ha.recv_src_token[l, i]]).reshape(5, 128)
        err = np.abs(fp8_to_f32(qa[l, i]).reshape(5, 128) * sa[l, i][:, None] - xr)
        ok((err <= np.abs(xr).max(1, keepdims=True) / 16).all(), "UE8M0 dequantisation")
    e = np.zeros((int(live.sum()), 8), np.uint32)
    e[:, :5] = np.log2(sa[live]) + 127
    same(sb[live].view(np.uint32), e[:, 0::4] | e[:, 1::4] << 8 | e[:, 2::4] << 16 | e[:, 3::4] << 24, "packed UE8M0")
    # the halves (return_recv_hook), two batches in flight: the same results as whole calls
    x2 = f32_to_bf16(rng(26, me).standard_normal((T, H)).astype(np.float32))
    got = []
    for xx in (x, x2):
        got.append(buf.low_latency_dispatch(xx, idx, M, E, use_fp8=True, round_scale=True, return_recv_hook=True))
    for g in got:
        g[4]()  # hooks in the order of the calls
    for xx, g in zip((x, x2), got):
        (q2, s2), c2, h2, _, _ = g
        (q1, s1), c1, h1, _, _ = buf.low_latency_dispatch(xx, idx, M, E, use_fp8=True, round_scale=True)
        live2 = np.arange(R * M)[None, :] < np.asarray(c1)[:, None]
        same(np.asarray(c2), np.asarray(c1), "ll hook recv_count")
        same(np.asarray(q2)[live2], np.asarray(q1)[live2], "ll hook fp8 rows")
        same(np.asarray(s2)[live2], np.asarray(s1)[live2], "ll hook scales")
    out2, _, chook = buf.low_latency_combine(recv_x, idx, w, got[0][2], return_recv_hook=True)
    chook()
    out3, _, _ = buf.low_latency_combine(recv_x, idx, w, got[0][2])
    same(out2, out3, "ll combine through the hook")
    buf.destroy()


def test_read_only_outputs():
    # epx must not write into a read-only array (here: over an immutable bytes object)
    bad = R - 1
    exc = epx.InvalidArgumentError if me == bad or R == 1 else epx.RemoteInvalidError
    data = bytes(4 * R)
    recv = np.frombuffer(data, np.int32) if me == bad else np.zeros(R, np.int32)
    raises(exc, lambda: comm.alltoall(np.full(R, 7, np.int32), recv), "alltoall into a read-only recv")
    one = np.ones(R, np.int64)
    raises(exc, lambda: comm.alltoallv(np.full(R, 7, np.int32), one, np.arange(R), recv, one, np.arange(R)),
           "alltoallv into a read-only recv")
    ok(data == bytes(4 * R), "a read-only recv was written")
    moe = epx.Moe(comm, 8, R, 4, 1, dtype="f32", mode="ll")
    r = moe.ll_dispatch(np.ones((2, 8), np.float32), np.zeros((2, 1), np.int64))
    y = np.ones((moe.num_local_experts, moe.ll_slots, 8), np.float32)
    odata = bytes(2 * 8 * 4)
    out = np.frombuffer(odata, np.float32).reshape(2, 8) if me == bad else np.zeros((2, 8), np.float32)
    raises(exc, lambda: moe.ll_combine(r.handle, y, np.ones((2, 1), np.float32), out), "ll_combine into read-only out")
    ok(odata == bytes(2 * 8 * 4), "a read-only out was written")
    # an out that is not an array at all on one rank: the call fails on every rank at once
    # (checking it must not raise there before the collective call)
    t0 = time.monotonic()
    out = [[0.0] * 8] * 2 if me == bad else np.zeros((2, 8), np.float32)
    raises(exc, lambda: moe.ll_combine(r.handle, y, np.ones((2, 1), np.float32), out), "ll_combine into a list")
    ok(time.monotonic() - t0 < 10, "ll_combine into a list took %.1f s" % (time.monotonic() - t0))
    moe.destroy()


def test_deep_ep_combine_bias():
    # bias (one tensor or a pair) is added in float32 to the combined rows, then rounded once; with numpy,
    # bf16 travels as uint16 bits
    buf = deep_ep.Buffer(comm)
    E, K, H, T = R * 2, 2, 32, 5
    g = rng(30, me)
    idx = g.integers(-1, E, (T, K)).astype(np.int64)
    x = f32_to_bf16(g.standard_normal((T, H)).astype(np.float32))
    b0 = f32_to_bf16(g.standard_normal((T, H)).astype(np.float32))
    b1 = f32_to_bf16(g.standard_normal((T, H)).astype(np.float32))
    pr, _, pe, ir, _ = buf.get_dispatch_layout(idx, E)
    rx, _, _, _, h, _ = buf.dispatch(x, topk_idx=idx, num_tokens_per_rank=pr, is_token_in_rank=ir,
                                     num_tokens_per_expert=pe)
    y = np.ascontiguousarray(np.asarray(rx).view(np.uint16))
    plain = np.asarray(buf.combine(y, h)[0]).view(np.uint16)
    for bias, add in ((b0, bf16_to_f32(b0)), ((b0, b1), bf16_to_f32(b0) + bf16_to_f32(b1)), ((None, b1), bf16_to_f32(b1))):
        out = np.asarray(buf.combine(y, h, bias=bias)[0])
        same(out.view(np.uint16), f32_to_bf16(bf16_to_f32(plain) + add), "combine with bias")
    # a float32 bias with NaNs whose low bits would carry into the exponent when rounded: bf16 NaN
    bn = np.zeros((T, H), np.float32)
    bn.view(np.uint32)[0, :2] = (0x7FFFFFFF, 0xFFFFFFFF)
    out = np.asarray(buf.combine(y, h, bias=bn)[0]).view(np.uint16)
    ok(np.isnan(bf16_to_f32(out[0, :2])).all(), "NaN bias gives NaN: %s" % out[0, :2])
    same(out[1:], plain[1:], "zero bias")
    buf.destroy()


def test_deep_ep_signatures():
    # DeepEP's parameter order (callers pass some positionally): Buffer(group, num_nvl_bytes, num_rdma_bytes,
    # low_latency_mode, num_qps_per_rank, allow_nvlink_for_low_latency_mode, allow_mnnvl, use_fabric,
    # explicitly_destroy, enable_shrink, comm) and low_latency_combine(x, topk_idx, topk_weights, handle,
    # use_logfmt, zero_copy, async_finish, return_recv_hook, out, combine_wait_recv_cost_stats)
    import inspect
    names = list(inspect.signature(deep_ep.Buffer.__init__).parameters)[1:12]
    ok(names == ["group", "num_nvl_bytes", "num_rdma_bytes", "low_latency_mode", "num_qps_per_rank",
                 "allow_nvlink_for_low_latency_mode", "allow_mnnvl", "use_fabric", "explicitly_destroy",
                 "enable_shrink", "comm"], "Buffer parameters %s" % names)
    names = list(inspect.signature(deep_ep.Buffer.low_latency_combine).parameters)[1:11]
    ok(names == ["x", "topk_idx", "topk_weights", "handle", "use_logfmt", "zero_copy", "async_finish",
                 "return_recv_hook", "out", "combine_wait_recv_cost_stats"], "low_latency_combine parameters %s" % names)
    buf = deep_ep.Buffer(comm, 0, 0, True, 24, True, False, False, True, False)
    ok(buf.explicitly_destroy, "explicitly_destroy by position")
    buf.destroy()


def test_moe_fp8_numpy_bits():
    # numpy has no fp8: uint8 arrays carry its bits (the outputs come back that way without ml_dtypes)
    E, K, M = R * 2, 2, 6
    for H in (200, 256):  # ceil(H / 128) scales a row
        moe = epx.Moe(comm, H, E, M, K, dtype="fp8_e4m3")
        T, C = 1 + me % M, (H + 127) // 128

        def data(p):
            g = rng(40, p, H)
            return (g.integers(0, 0x7F, (1 + p % M, H)).astype(np.uint8), g.random((1 + p % M, C)).astype(np.float32),
                    g.integers(0, E, (1 + p % M, K)).astype(np.int64))
        x, s, idx = data(me)
        r = moe.dispatch(x, idx, x_scales=s)
        for i, (p, t) in enumerate(zip(r.recv_src_rank, r.recv_src_token)):
            same(np.asarray(r.recv_x[i]).view(np.uint8), data(p)[0][t], "fp8 row")
            same(r.recv_x_scales[i], data(p)[1][t], "fp8 scales")
        rx, rs = moe.dispatch_cached(r.handle, x, s)
        same(np.asarray(rx).view(np.uint8), np.asarray(r.recv_x).view(np.uint8), "cached fp8 dispatch")
        # combine of an FP8 dispatch takes and returns bf16 (raw bits here): y of rank q for token (p, t)

        def y_row(q, p, t):
            return f32_to_bf16(rng(41, q, p, t).standard_normal(H).astype(np.float32))
        y = np.array([y_row(me, p, t) for p, t in zip(r.recv_src_rank, r.recv_src_token)], np.uint16).reshape(-1, H)
        out, _ = moe.combine(r.handle, y)
        want = np.zeros((T, H), np.uint16)
        for t in range(T):
            acc = np.zeros(H, np.float32)
            for q in sorted({int(e) // (E // R) for e in idx[t]}):
                acc = acc + bf16_to_f32(y_row(q, me, t))
            want[t] = f32_to_bf16(acc)
        same(np.asarray(out).view(np.uint16), want, "fp8 context's bf16 combine H=%d" % H)
        moe.destroy()


def test_deep_ep_borrowed_comm():
    # a Buffer over a communicator it was given (group or comm=) leaves it alive on destroy()
    for kw in ({"group": comm}, {"comm": comm}):
        deep_ep.Buffer(**kw).destroy()
        ok(bool(comm._h), "Buffer(%s).destroy() destroyed the caller's communicator" % list(kw)[0])
    comm.barrier()


def test_deep_ep_bad_arguments_one_rank():
    # an exception while one rank's Buffer reads its arguments, before any collective (a dtype epx lacks,
    # what is not an array, a handle or an event): it propagates there, after that rank failed the
    # collective its peers make first (the context's creation on first use, else the call), which they
    # leave at once with RemoteInvalid (they used to wait for it, or pair their call with its next one)
    bad = R - 1
    E, K, H, M, T = R * 2, 2, 32, 4, 3
    g = rng(80, me)
    idx = g.integers(-1, E, (T, K)).astype(np.int64)
    x = g.standard_normal((T, H)).astype(np.float32)
    xb, w = f32_to_bf16(x), g.random((T, K)).astype(np.float32)
    buf = deep_ep.Buffer(comm)
    _, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)

    def on_bad(v, good):
        return v if me == bad else good

    def dispatch(**kw):
        args = dict(x=x, topk_idx=idx, topk_weights=w, num_tokens_per_expert=per_expert, is_token_in_rank=in_rank)
        args.update(kw)
        return buf.dispatch(**args)

    def ll_dispatch(xx=xb, ii=idx, n=E):
        return buf.low_latency_dispatch(xx, ii, M, n, use_fp8=False)

    def usable(what):
        same(comm.alltoall(np.full(R, me, np.int32)), np.arange(R, dtype=np.int32), "alltoall after " + what)
    # first use: the others create the contexts
    for what, call, exc in (("first dispatch of float64 x", lambda: dispatch(x=on_bad(x.astype(np.float64), x)),
                             ValueError),
                            ("first low_latency_dispatch of a bad expert count",
                             lambda: ll_dispatch(n=on_bad("eight", E)), ValueError)):
        fails_together(what, call, bad, exc)
        usable(what)
    recv_x, _, _, _, handle, _ = dispatch()
    lx, _, lh, _, _ = ll_dispatch()
    y = np.zeros_like(lx)
    x48 = np.ones((T, 48), np.float32)
    for what, call, exc in (
            ("dispatch of float64 x", lambda: dispatch(x=on_bad(x.astype(np.float64), x)), ValueError),
            ("dispatch of a 3-tuple x", lambda: dispatch(x=on_bad((x, x, x), x)), ValueError),
            ("dispatch without topk_idx", lambda: dispatch(topk_idx=on_bad(None, idx)), ValueError),
            ("dispatch of an object as num_tokens_per_expert",
             lambda: dispatch(num_tokens_per_expert=on_bad(object(), per_expert)), AttributeError),
            ("dispatch with an object as previous_event", lambda: dispatch(previous_event=on_bad(object(), None)),
             AttributeError),
            ("dispatch of a new hidden size with an object as previous_event",  # the others create its context
             lambda: dispatch(x=x48, previous_event=on_bad(object(), None)), AttributeError),
            ("cached dispatch along an object", lambda: buf.dispatch(x, handle=on_bad(object(), handle)),
             AttributeError),
            ("combine along None", lambda: buf.combine(recv_x, on_bad(None, handle)), AttributeError),
            ("combine with an object as previous_event",
             lambda: buf.combine(recv_x, handle, previous_event=on_bad(object(), None)), AttributeError),
            ("low_latency_dispatch of float64 x", lambda: ll_dispatch(xx=on_bad(x.astype(np.float64), xb)),
             ValueError),
            ("low_latency_dispatch without topk_idx", lambda: ll_dispatch(ii=on_bad(None, idx)), AttributeError),
            ("low_latency_combine along None", lambda: buf.low_latency_combine(y, idx, w, on_bad(None, lh)),
             AttributeError)):
        fails_together(what, call, bad, exc)
        usable(what)
    # a rank that cannot read the key guesses the context of the Buffer's latest call: where the others
    # need another one (a new hidden size), their creation meets its failing dispatch, and on the CPU
    # backend every rank fails with MismatchError instead (still at once)
    t0 = time.monotonic()
    try:
        dispatch(x=on_bad(x.astype(np.float64), np.ones((T, 64), np.float32)))
        ok(False, "a new hidden size with float64 x on rank %d did not raise" % bad)
    except (epx.MismatchError, epx.RemoteInvalidError) as e:
        ok(me != bad, "rank %d raised %r" % (me, e))
    except ValueError as e:
        ok(me == bad, "rank %d raised %r" % (me, e))
    ok(time.monotonic() - t0 < 10, "a new hidden size with float64 x took %.1f s" % (time.monotonic() - t0))
    usable("a new hidden size with float64 x")
    # still usable
    out, _, _ = buf.combine(recv_x, handle)
    ok(out.shape == (T, H), "combine after the failures")
    buf.destroy()


# ---- DeepEP users' call sequences, replayed through the name `deep_ep` --------------------------
# Each replays one user's calls (keywords, positional arguments, tuple shapes, event handling) as
# that user makes them, on numpy arrays, and checks every output against a reference computed here.

class Routes:
    """Every rank's tokens for the replays: T[p] <= M tokens of hidden H (bf16 bits), topk_idx[p]
    [T, K] of distinct experts (some -1), weights[p] [T, K] float32."""

    def __init__(self, case, M, E, K, H):
        self.E, self.K, self.H, self.L = E, K, H, E // R
        self.T, self.idx, self.w, self.x = [], [], [], []
        for p in range(R):
            g = rng(70, case, p)
            T = int(g.integers(0, M + 1)) if p != R - 1 else M  # one rank at M
            idx = np.stack([g.permutation(E)[:K] for _ in range(T)]).reshape(T, K).astype(np.int64)
            idx[g.random((T, K)) < 0.15] = -1
            self.T.append(T)
            self.idx.append(idx)
            self.w.append(g.random((T, K)).astype(np.float32))
            self.x.append(f32_to_bf16(g.standard_normal((T, H)).astype(np.float32)))

    def ranks(self, p, t):
        return sorted({int(e) // self.L for e in self.idx[p][t] if e >= 0})

    def rows(self, q):  # high-throughput rows on rank q, in (source rank, source token) order
        return [(p, t) for p in range(R) for t in range(self.T[p]) if q in self.ranks(p, t)]

    def slots(self, e):  # low-latency rows of expert e (CPU backend: ascending source rank, token)
        return [(p, t) for p in range(R) for t in range(self.T[p]) if e in self.idx[p][t]]

    def local_idx(self, q, rows):
        return np.array([[e - q * self.L if e >= 0 and e // self.L == q else -1 for e in self.idx[p][t]]
                         for p, t in rows], np.int64).reshape(len(rows), self.K)


def bf16_rows(rows, H):
    return np.stack(rows).astype(np.uint16) if rows else np.zeros((0, H), np.uint16)


def test_deep_ep_megatron():
    # Megatron-LM's fused_a2a: get_buffer sizing, FusedDispatch forward (layout -> dispatch with
    # async events) and backward (combine with topk_weights), FusedCombine forward (combine with
    # handle=) and backward (cached dispatch)
    deep_ep.register_as_deep_ep()
    from deep_ep import Buffer
    from deep_ep.utils import EventHandle, EventOverlap
    group = comm
    E, K, H = 4 * R, min(3, 4 * R), 64
    for case, M in enumerate((9, 300)):  # 300 > the initial capacity: regrows
        W = Routes(case, M, E, K, H)
        x, idx, probs = W.x[me], W.idx[me], W.w[me]
        hidden_bytes = x.shape[1] * max(x.itemsize, 2)
        num_nvl_bytes = num_rdma_bytes = 0
        for config in (Buffer.get_dispatch_config(group.size), Buffer.get_combine_config(group.size)):
            num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, group.size), num_nvl_bytes)
            num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, group.size), num_rdma_bytes)
        buf = Buffer(group, num_nvl_bytes, num_rdma_bytes)
        ok(not (buf.group != group or buf.num_nvl_bytes < num_nvl_bytes or buf.num_rdma_bytes < num_rdma_bytes),
           "Megatron's buffer reuse test")
        Buffer.set_num_sms(24)
        # FusedDispatch.forward, async_finish=True
        (num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank,
         event) = buf.get_dispatch_layout(idx, E, previous_event=EventOverlap(EventHandle()), async_finish=True,
                                          allocate_on_comm_stream=False)
        (recv_x, recv_idx, recv_probs, counts, handle, after) = buf.dispatch(
            x, topk_idx=idx, topk_weights=probs, num_tokens_per_rank=num_tokens_per_rank,
            num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
            num_tokens_per_expert=num_tokens_per_expert, previous_event=event, async_finish=True,
            allocate_on_comm_stream=False)
        after.current_stream_wait()
        tokens_per_expert = np.array(counts)
        rows = W.rows(me)
        lidx = W.local_idx(me, rows)
        same(recv_x, bf16_rows([W.x[p][t] for p, t in rows], H), "Megatron recv_x case %d" % case)
        same(recv_idx, lidx, "Megatron recv token indices")
        want_p = np.array([W.w[p][t] for p, t in rows], np.float32).reshape(len(rows), K)
        same(recv_probs, np.where(lidx >= 0, want_p, np.float32(0)), "Megatron recv token probs")
        same(tokens_per_expert, np.array([int((lidx == l).any(1).sum()) for l in range(W.L)]), "Megatron counts")
        # the experts: rank q scales its rows by q + 1 (bf16)
        y = f32_to_bf16(bf16_to_f32(recv_x) * np.float32(me + 1)).reshape(len(rows), H)
        # FusedCombine.forward
        combined, _, after = buf.combine(y, handle=handle, async_finish=True,
                                         previous_event=EventOverlap(EventHandle()), allocate_on_comm_stream=False)
        after.current_stream_wait()
        want = np.zeros((W.T[me], H), np.uint16)
        for t in range(W.T[me]):
            acc = np.zeros(H, np.float32)
            for q in W.ranks(me, t):
                acc = acc + bf16_to_f32(f32_to_bf16(bf16_to_f32(x[t]) * np.float32(q + 1)))
            want[t] = f32_to_bf16(acc)
        same(combined, want, "Megatron combine case %d" % case)
        # FusedCombine.backward: the cached dispatch of the output gradient
        def grad_out(p):
            return f32_to_bf16(rng(71, case, p).standard_normal((W.T[p], H)).astype(np.float32))
        grad_x, n1, n2, n3, n4, after = buf.dispatch(np.ascontiguousarray(grad_out(me)), handle=handle,
                                                    previous_event=EventOverlap(EventHandle()), async_finish=True,
                                                    allocate_on_comm_stream=False)
        after.current_stream_wait()
        ok((n1, n2, n3, n4) == (None,) * 4, "cached dispatch returns four Nones")
        same(grad_x, bf16_rows([grad_out(p)[t] for p, t in rows], H), "Megatron cached dispatch")
        # FusedDispatch.backward: combine of the received rows' gradients with their probs' gradients
        # (nonzero everywhere: they are summed as they are)
        def grads(q, p, t):
            g = rng(72, case, q, p, t)
            return f32_to_bf16(g.standard_normal(H).astype(np.float32)), g.standard_normal(K).astype(np.float32)
        gx = bf16_rows([grads(me, p, t)[0] for p, t in rows], H)
        gp = np.array([grads(me, p, t)[1] for p, t in rows], np.float32).reshape(len(rows), K)
        grad_x, grad_probs, after = buf.combine(gx, handle, topk_weights=gp.astype(np.float32),
                                                previous_event=EventOverlap(EventHandle()), async_finish=True,
                                                allocate_on_comm_stream=False)
        after.current_stream_wait()
        want_x = np.zeros((W.T[me], H), np.uint16)
        want_p = np.zeros((W.T[me], K), np.float32)
        for t in range(W.T[me]):
            acc, accp = np.zeros(H, np.float32), np.zeros(K, np.float32)
            for q in W.ranks(me, t):
                gq, gpq = grads(q, me, t)
                acc, accp = acc + bf16_to_f32(gq), accp + gpq
            want_x[t], want_p[t] = f32_to_bf16(acc), accp
        same(grad_x, want_x, "Megatron backward combine")
        same(grad_probs, want_p, "Megatron backward combined probs")
        Buffer.set_num_sms(20)
        buf.destroy()


def test_deep_ep_sglang():
    # SGLang's DeepEPDispatcher: Config(**json), the buffer sized for both modes, normal mode (capture
    # -> layout -> dispatch with expert_alignment=128 and a config -> combine), FP8 normal dispatch with
    # DeepGEMM's column-major scales (float32, and UE8M0 packed in int32), then low-latency mode
    # (clean_low_latency_buffer, dispatch and combine by keyword, with and without the receive hook)
    deep_ep.register_as_deep_ep()
    from deep_ep import Buffer, Config
    cfg = {"num_sms": 24, "num_max_nvl_chunked_send_tokens": 16, "num_max_nvl_chunked_recv_tokens": 256,
           "num_max_rdma_chunked_send_tokens": 6, "num_max_rdma_chunked_recv_tokens": 128}
    normal_dispatch_config, normal_combine_config = Config(**cfg), Config(**cfg)
    group, E, K, H, M = comm, 2 * R, min(3, 2 * R), 640, 6
    hidden_bytes = H * 2
    num_nvl_bytes = num_rdma_bytes = 0
    for config in (normal_dispatch_config, normal_combine_config):
        num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, group.size), num_nvl_bytes)
        num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, group.size), num_rdma_bytes)
    num_rdma_bytes = max(Buffer.get_low_latency_rdma_size_hint(M, H, group.size, E), num_rdma_bytes)
    buf = Buffer(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode=True,
                 num_qps_per_rank=max(cfg["num_sms"], E // group.size), allow_mnnvl=True)
    W = Routes(10, M, E, K, H)
    rows = W.rows(me)
    lidx = W.local_idx(me, rows)
    # normal mode, bf16
    previous_event = Buffer.capture()
    (num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank,
     previous_event) = buf.get_dispatch_layout(W.idx[me], E, previous_event=previous_event, async_finish=True,
                                               allocate_on_comm_stream=previous_event is not None)
    recv_x, recv_topk_ids, recv_topk_weights, num_recv_tokens_per_expert, handle, event = buf.dispatch(
        W.x[me], topk_idx=W.idx[me], topk_weights=W.w[me], num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, previous_event=previous_event, async_finish=True,
        allocate_on_comm_stream=True, expert_alignment=128, config=normal_dispatch_config)
    event.current_stream_wait()
    same(recv_x, bf16_rows([W.x[p][t] for p, t in rows], H), "SGLang normal recv_x")
    same(recv_topk_ids, lidx, "SGLang normal recv topk_ids")
    cnt = [int((lidx == l).any(1).sum()) for l in range(W.L)]
    ok(num_recv_tokens_per_expert == [(c + 127) // 128 * 128 for c in cnt], "SGLang counts aligned to 128")
    combined, _, event = buf.combine(recv_x, handle, async_finish=True, previous_event=Buffer.capture(),
                                     allocate_on_comm_stream=True, config=normal_combine_config)
    event.current_stream_wait()
    want = np.stack([f32_to_bf16(bf16_to_f32(W.x[me][t]) * np.float32(len(W.ranks(me, t))))
                     for t in range(W.T[me])]).reshape(W.T[me], H) if W.T[me] else np.zeros((0, H), np.uint16)
    same(combined, want, "SGLang normal combine (each rank returns the row it got)")
    # normal mode, FP8 with column-major scales: float32 [T, H/128], and UE8M0 packed [T, H/512] int32
    def fp8(p):
        g = rng(73, p)
        q = g.integers(0, 0x7F, (W.T[p], H)).astype(np.uint8)
        return (q, np.asfortranarray(g.random((W.T[p], H // 128)).astype(np.float32)),
                np.asfortranarray(g.integers(0, 2**31, (W.T[p], H // 512)).astype(np.int32)))
    for which in (1, 2):
        xq = fp8(me)
        (rq, rs), _, _, _, h, event = buf.dispatch(
            (xq[0], xq[which]), topk_idx=W.idx[me], topk_weights=W.w[me], num_tokens_per_rank=num_tokens_per_rank,
            num_tokens_per_rdma_rank=None, is_token_in_rank=is_token_in_rank,
            num_tokens_per_expert=num_tokens_per_expert, previous_event=Buffer.capture(), async_finish=True,
            allocate_on_comm_stream=True, expert_alignment=128, config=normal_dispatch_config)
        event.current_stream_wait()
        same(np.asarray(rq).view(np.uint8), np.stack([fp8(p)[0][t] for p, t in rows]).reshape(len(rows), H),
             "SGLang FP8 rows")
        want_s = np.stack([fp8(p)[which][t] for p, t in rows]).reshape(len(rows), -1)
        same(rs, want_s, "SGLang FP8 scales (%s)" % want_s.dtype)
        ok(rs.flags.c_contiguous, "received scales are row-major")
        rq2, rs2 = buf.dispatch((xq[0], xq[which]), handle=h)[0]
        same(rs2, want_s, "SGLang FP8 scales, cached dispatch")
        y = f32_to_bf16(fp8_to_f32(rq)).reshape(len(rows), H)
        out, _, _ = buf.combine(y, h, config=normal_combine_config)
        same(out, f32_to_bf16(np.stack([fp8_to_f32(xq[0][t]) * np.float32(len(W.ranks(me, t)))
                                        for t in range(W.T[me])]).reshape(W.T[me], H)), "SGLang FP8 combine")
    # low-latency mode
    if buf.low_latency_mode:
        buf.clean_low_latency_buffer(M, H, E)
    for return_recv_hook in (False, True):
        topk_ids = W.idx[me]
        expected_m = (W.T[me] * buf.group_size * topk_ids.shape[1] + E) // E
        ok(expected_m >= 0, "expected_m")
        packed_recv_hidden, packed_recv_count, ll_handle, event, hook = buf.low_latency_dispatch(
            W.x[me], topk_ids, M, E, use_fp8=False, async_finish=not return_recv_hook,
            return_recv_hook=return_recv_hook)
        hook() if return_recv_hook else event.current_stream_wait()
        ok(packed_recv_hidden.shape == (W.L, R * M, H), "SGLang LL shape")
        for l in range(W.L):
            slots = W.slots(me * W.L + l)
            ok(int(packed_recv_count[l]) == len(slots), "SGLang LL masked_m")
            same(packed_recv_hidden[l, :len(slots)], bf16_rows([W.x[p][t] for p, t in slots], H), "SGLang LL rows")
        # the experts: expert e scales its rows by e + 1 (bf16)
        y = np.zeros(packed_recv_hidden.shape, np.uint16)  # bits (the output may be ml_dtypes' bfloat16)
        for l in range(W.L):
            n = int(packed_recv_count[l])
            y[l, :n] = f32_to_bf16(bf16_to_f32(packed_recv_hidden[l, :n]) * np.float32(me * W.L + l + 1))
        combined_hidden_states, event, hook = buf.low_latency_combine(
            x=y, topk_idx=topk_ids, topk_weights=W.w[me], handle=ll_handle, async_finish=not return_recv_hook,
            return_recv_hook=return_recv_hook)
        hook() if return_recv_hook else event.current_stream_wait()
        same(combined_hidden_states, ll_combined(W, me), "SGLang LL combine (hook %s)" % return_recv_hook)
    # FP8 low-latency dispatch as on Blackwell with DeepGEMM: round_scale and use_ue8m0
    (q, s), cnt, _, event, hook = buf.low_latency_dispatch(W.x[me], W.idx[me], M, E, use_fp8=True, round_scale=True,
                                                           use_ue8m0=True, async_finish=True, return_recv_hook=False)
    event.current_stream_wait()
    ok(q.shape == (W.L, R * M, H) and s.shape == (W.L, R * M, (H // 128 + 3) // 4) and s.dtype == np.int32,
       "SGLang LL FP8 UE8M0 shapes")
    buf.destroy()


def ll_combined(W, q):
    """DeepEP's low-latency combine of rank q's tokens when expert e returns its rows times e + 1:
    per expert rank, the weighted rows in k order, then the ranks in order (float32, then bf16)."""
    out = np.zeros((W.T[q], W.H), np.uint16)
    for t in range(W.T[q]):
        acc = np.zeros(W.H, np.float32)
        for r in W.ranks(q, t):
            part = np.zeros(W.H, np.float32)
            for k, e in enumerate(W.idx[q][t]):
                if e >= 0 and e // W.L == r:
                    yv = bf16_to_f32(f32_to_bf16(bf16_to_f32(W.x[q][t]) * np.float32(e + 1)))
                    part = part + W.w[q][t, k] * yv
            acc = acc + part
        out[t] = f32_to_bf16(acc)
    return out


def test_deep_ep_vllm():
    # vLLM's DeepEP prepare/finalize: the high-throughput manager's Buffer kwargs and set_num_sms,
    # dispatch by keyword with FP8 block scales (and the per-token [T, 1] scales of earlier
    # versions), the receiver's event.event test, topk id remapping, combine by keyword; the
    # low-latency manager's size hint by keyword, dispatch with the receive hook, dequantisation
    # of the FP8 rows, combine into out= through the hook; destroy()
    deep_ep.register_as_deep_ep()
    import deep_ep as DE
    group, E, K, H, M = comm, 2 * R, min(2, 2 * R), 256, 5
    available_rank_configs = [2, 4, 8, 16, 24, 32, 64, 128, 144, 160]
    buf = DE.Buffer(group=group, num_nvl_bytes=1 << 20, num_rdma_bytes=0, low_latency_mode=False,
                    num_qps_per_rank=1, explicitly_destroy=True)
    DE.Buffer.set_num_sms(20)
    dispatch_config = DE.Buffer.get_dispatch_config(R) if R in available_rank_configs else None
    combine_config = DE.Buffer.get_combine_config(R) if R in available_rank_configs else None
    ok(dispatch_config is None or isinstance(dispatch_config, DE.Config), "deep_ep.Config")
    W = Routes(20, M, E, K, H)
    rows = W.rows(me)
    lidx = W.local_idx(me, rows)
    rank_expert_offset = me * W.L

    def scales(p, cols):
        return rng(74, p, cols).random((W.T[p], cols)).astype(np.float32)
    for cols in (H // 128, 1):  # block scales; per-token scales [T, 1]
        q8 = rng(75, me).integers(0, 0x7F, (W.T[me], H)).astype(np.uint8)
        previous_event = buf.capture()
        (num_tokens_per_rank, num_tokens_per_rdma_rank, dispatch_expert_num_tokens, is_token_in_rank,
         event) = buf.get_dispatch_layout(topk_idx=W.idx[me], num_experts=E, previous_event=previous_event,
                                          async_finish=False, allocate_on_comm_stream=False)
        (token_data, expert_topk_ids, expert_topk_weights, expert_num_tokens_per_expert_list, handle,
         event) = buf.dispatch(x=(q8, scales(me, cols)), handle=None, num_tokens_per_rank=num_tokens_per_rank,
                               num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
                               num_tokens_per_expert=dispatch_expert_num_tokens, topk_idx=W.idx[me],
                               topk_weights=W.w[me], expert_alignment=1, config=dispatch_config,
                               previous_event=previous_event, async_finish=True, allocate_on_comm_stream=False)
        if event.event is not None:
            event.current_stream_wait()
        expert_x, expert_x_scale = token_data
        same(expert_x_scale, np.stack([scales(p, cols)[t] for p, t in rows]).reshape(len(rows), cols),
             "vLLM HT scales, %d columns" % cols)
        expert_topk_ids = np.where(expert_topk_ids == -1, E - 1 if rank_expert_offset == 0 else 0,
                                   expert_topk_ids + rank_expert_offset)
        same(expert_topk_ids, np.where(lidx == -1, E - 1 if me == 0 else 0, lidx + rank_expert_offset),
             "vLLM HT global topk ids")
        ok(expert_num_tokens_per_expert_list == [int((lidx == l).any(1).sum()) for l in range(W.L)], "vLLM counts")
        # finalize: the weighted, reduced expert output (bf16) combined without weights
        fused = f32_to_bf16(fp8_to_f32(expert_x)).reshape(len(rows), H)
        combined_x, _, event = buf.combine(x=fused, handle=handle, topk_weights=None, config=combine_config,
                                           previous_event=buf.capture(), async_finish=True,
                                           allocate_on_comm_stream=False)
        output = np.zeros((W.T[me], H), np.uint16)
        if event.event is not None:
            event.current_stream_wait()
        output[...] = bf16_bits(combined_x)
        same(output, f32_to_bf16(np.stack([fp8_to_f32(q8[t]) * np.float32(len(W.ranks(me, t)))
                                           for t in range(W.T[me])]).reshape(W.T[me], H)), "vLLM HT combine")
    buf.destroy()
    # low latency
    num_rdma_bytes = DE.Buffer.get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank=M, hidden=H,
                                                              num_ranks=R, num_experts=E)
    kwargs = dict(group=group, num_nvl_bytes=1 << 20, num_rdma_bytes=num_rdma_bytes, low_latency_mode=True,
                  num_qps_per_rank=W.L, allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False,
                  explicitly_destroy=True, enable_shrink=False)
    buf = DE.Buffer(**kwargs)
    for use_fp8_dispatch, do_recv_hook in ((False, False), (True, True), (False, True)):
        expert_x, expert_num_tokens, handle, _, hook = buf.low_latency_dispatch(
            W.x[me], W.idx[me], M, E, use_fp8=use_fp8_dispatch, round_scale=False, use_ue8m0=False,
            async_finish=False, return_recv_hook=True)
        hook()
        for l in range(W.L):
            ok(int(expert_num_tokens[l]) == len(W.slots(me * W.L + l)), "vLLM LL expert_num_tokens")
        if use_fp8_dispatch:  # vLLM's dequant_fp8: scales [L, S, H/128], blocks of 128
            x_fp8, x_scales = expert_x
            f = fp8_to_f32(x_fp8).reshape(W.L, -1, 128) * np.ascontiguousarray(x_scales).reshape(W.L, -1, 1)
            f = f.reshape(x_fp8.shape)
            for l in range(W.L):
                for i, (p, t) in enumerate(W.slots(me * W.L + l)):
                    xr = bf16_to_f32(W.x[p][t]).reshape(-1, 128)
                    err = np.abs(f[l, i].reshape(-1, 128) - xr)
                    ok((err <= np.abs(xr).max(1, keepdims=True) / 16).all(), "vLLM LL dequantised rows")
            continue
        fused_expert_output = np.zeros(expert_x.shape, np.uint16)  # bits, as above
        for l in range(W.L):
            n = int(expert_num_tokens[l])
            fused_expert_output[l, :n] = f32_to_bf16(bf16_to_f32(expert_x[l, :n]) * np.float32(me * W.L + l + 1))
        output = np.zeros((W.T[me], H), np.uint16)
        _, _, recv_hook = buf.low_latency_combine(fused_expert_output, W.idx[me], W.w[me], handle, async_finish=False,
                                                  zero_copy=False, return_recv_hook=do_recv_hook, out=output)
        recv_hook()
        same(output, ll_combined(W, me), "vLLM LL combine into out (hook %s)" % do_recv_hook)
    # the handle is DeepEP's 5-tuple where its meaning is the same
    ok(len(handle) == 5 and tuple(handle[2:]) == (M, H, E) and list(handle)[2:] == [M, H, E], "LL handle items")
    for call in (lambda: buf.low_latency_query_mask_buffer(np.zeros(R, np.int32)),
                 lambda: buf.low_latency_update_mask_buffer(0, True), buf.low_latency_clean_mask_buffer):
        raises(epx.UnsupportedError, call, "rank masking")
    buf.destroy()
    raises(epx.UnsupportedError, lambda: DE.Buffer(**dict(kwargs, enable_shrink=True)), "enable_shrink=True")


def test_errors():
    ok(issubclass(epx.InvalidArgumentError, ValueError) and issubclass(epx.PeerTimeoutError, TimeoutError),
       "exception bases")
    e = epx._errors.error(-8, "late")
    ok(isinstance(e, epx.PeerTimeoutError) and e.status == -8 and e.name == "EPX_ERR_TIMEOUT" and not e.recoverable,
       "timeout error fields")
    ok(epx.status_name(-3) == "EPX_ERR_MISMATCH", "status_name")


for name in sys.argv[1:] or [n for n in list(globals()) if n.startswith("test_")]:
    globals()[name]()
    comm.barrier()
comm.destroy()
print("rank %d: %d checks passed" % (me, checks))
