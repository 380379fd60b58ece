"""torch tests of epx and epx.deep_ep, 2 processes (one per GPU, NCCL group), or with --device cpu
(gloo group, CPU tensors, CPU backend). Run on the GPU machine:

    NCCL_NVLS_ENABLE=0 PYTHONPATH=python python3 python/tests/test_gpu_torch.py            # 2 GPUs
    PYTHONPATH=python python3 python/tests/test_gpu_torch.py --device cpu                  # torch, CPU
    NCCL_NVLS_ENABLE=0 PYTHONPATH=python python3 -m pytest -q python/tests/test_gpu_torch.py

EPX_TORCH_RANKS=N runs N processes instead of 2 (one GPU each: 1 on a machine with one GPU, where
NCCL refuses two ranks on the same device; any N with --device cpu).

Checks: alltoall of CUDA tensors against torch.distributed; DeepEP-style layout, dispatch, cached
dispatch and combine against a reference built from every rank's data (bit-exact for bf16); on CUDA,
FP8 dispatch with DeepEP users' scale layouts, and a Buffer over a gloo group (vLLM's); a small
MoE layer (router, dispatch, two experts per rank as matmuls, combine) forward and backward against
a single-process torch reference, gradients included; low-latency dispatch/combine where the backend
has it (both backends do)."""
import os
import socket
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

try:
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as tmp
except ImportError:  # CI has no torch
    torch = None

NRANKS = int(os.environ.get("EPX_TORCH_RANKS", "2"))


def _seeded(seed, *shape, device, dtype=None, scale=1.0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype or torch.float32)


def _tokens(rank):
    return 20 + 17 * rank  # different T per rank


def check_alltoall(rank, R, dev, comm):
    x = torch.arange(R * 5, device=dev, dtype=torch.float32) + 1000 * rank
    got = comm.alltoall(x)
    want = torch.empty_like(x)
    dist.all_to_all_single(want, x)
    assert torch.equal(got, want), (got, want)
    # on a stream given as a torch stream object, then as its address; a stream that is not
    # one is refused on this rank before the call, and the call fails on the others
    side = torch.cuda.Stream(dev) if dev.type == "cuda" else None
    for s in ((side, side.cuda_stream) if side is not None else (None,)):
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(dev))
        got = comm.alltoall(x, stream=s)
        if side is not None:
            side.synchronize()
        assert torch.equal(got, want), (s, got, want)
    try:
        comm.alltoall(x, stream="not a stream" if rank == R - 1 else None)
        raise AssertionError("alltoall with a bad stream did not raise")
    except TypeError:
        assert rank == R - 1
    except Exception as e:  # noqa: BLE001
        assert rank != R - 1 and type(e).__name__ == "RemoteInvalidError", repr(e)


def check_ht(rank, R, dev, buf):
    from epx import deep_ep
    E, K, H = 4 * R, 3, 256
    xs = [_seeded(10 + p, _tokens(p), H, device=dev, dtype=torch.bfloat16) for p in range(R)]
    ws = [torch.rand(_tokens(p), K, generator=torch.Generator().manual_seed(20 + p)).to(dev) for p in range(R)]
    idx = []
    for p in range(R):
        g = torch.Generator().manual_seed(30 + p)
        i = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(_tokens(p))])
        i[torch.rand(_tokens(p), K, generator=g) < 0.1] = -1
        idx.append(i.to(dev))
    x, w, topk = xs[rank], ws[rank], idx[rank]
    L = E // R
    per_rank, _, per_expert, in_rank, ev = buf.get_dispatch_layout(topk, E, previous_event=buf.capture(),
                                                                   async_finish=True)
    ev.current_stream_wait()
    hit = torch.zeros(_tokens(rank), E, dtype=torch.bool, device=dev)
    for k in range(K):
        v = topk[:, k] >= 0
        hit[v.nonzero().squeeze(1), topk[v, k]] = True
    assert torch.equal(per_expert, hit.sum(0).int()) and torch.equal(in_rank, hit.view(-1, R, L).any(2))
    assert torch.equal(per_rank, in_rank.sum(0).int())
    recv_x, recv_idx, recv_w, counts, handle, ev = buf.dispatch(
        x, topk_idx=topk, topk_weights=w, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, config=deep_ep.Buffer.get_dispatch_config(R), async_finish=True)
    ev.current_stream_wait()
    rows = [(p, t) for p in range(R) for t in range(_tokens(p)) if ((idx[p][t] >= 0) & (idx[p][t] // L == rank)).any()]
    want_x = torch.stack([xs[p][t] for p, t in rows])
    assert torch.equal(recv_x, want_x), "dispatch rows"
    want_idx = torch.stack([torch.where((idx[p][t] >= 0) & (idx[p][t] // L == rank), idx[p][t] - rank * L, -1)
                            for p, t in rows])
    assert torch.equal(recv_idx, want_idx), "recv_topk_idx"
    assert torch.equal(recv_w, torch.where(want_idx >= 0, torch.stack([ws[p][t] for p, t in rows]), 0.0))
    assert counts == [int((want_idx == l).any(1).sum()) for l in range(L)], counts
    # combine: y = rows * (rank + 1); token t = sum over ranks in ascending order, float32, then bf16
    y = (recv_x.float() * (rank + 1)).to(torch.bfloat16)
    out, out_w, ev = buf.combine(y, handle, recv_w)
    want = torch.zeros(_tokens(rank), H, device=dev)
    for q in range(R):
        went = ((topk >= 0) & (topk // L == q)).any(1)
        want = torch.where(went[:, None], want + (x.float() * (q + 1)).to(torch.bfloat16).float(), want)
    assert torch.equal(out, want.to(torch.bfloat16)), "combine bits"
    assert torch.equal(out_w, torch.where(topk >= 0, w, 0.0)), "combined weights"
    again, *_ = buf.dispatch(x * 2, handle=handle)
    assert torch.equal(again, want_x * 2), "cached dispatch"


def check_ht_fp8_scales(rank, R, dev, buf):
    """FP8 dispatch with the scale layouts DeepEP users pass (SGLang, vLLM, DeepGEMM): [T, C] float32
    row-major and column-major, [T, 1], int32 UE8M0 words [T, ceil(C/4)] column-major; received row-major
    in the input's dtype and shape, plain and cached."""
    E, K, H = 4 * R, 2, 640  # C = 5 scale blocks
    C = (H + 127) // 128
    L = E // R
    idx = [torch.stack([torch.randperm(E, generator=torch.Generator().manual_seed(40 + 97 * p + t))[:K]
                        for t in range(_tokens(p))]).to(dev) for p in range(R)]
    q = [_seeded(50 + p, _tokens(p), H, device=dev).clamp(-400, 400).to(torch.float8_e4m3fn) for p in range(R)]
    rows = [(p, t) for p in range(R) for t in range(_tokens(p)) if (idx[p][t] // L == rank).any()]
    forms = {
        "row-major": lambda p: _seeded(60 + p, _tokens(p), C, device=dev).abs() + 0.5,
        "column-major": lambda p: (_seeded(70 + p, C, _tokens(p), device=dev).abs() + 0.5).t(),
        "[T, 1]": lambda p: _seeded(80 + p, _tokens(p), 1, device=dev).abs() + 0.5,
        "ue8m0 words": lambda p: torch.randint(0, 2 ** 31 - 1, ((C + 3) // 4, _tokens(p)),
                                               generator=torch.Generator().manual_seed(90 + p),
                                               dtype=torch.int32).to(dev).t(),
    }
    for name, make in forms.items():
        scales = [make(p) for p in range(R)]
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx[rank], E)
        (rq, rs), _, _, _, handle, _ = buf.dispatch((q[rank], scales[rank]), topk_idx=idx[rank],
                                                   num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                   num_tokens_per_expert=per_expert)
        want_q = torch.stack([q[p][t] for p, t in rows])
        want_s = torch.stack([scales[p][t] for p, t in rows])
        assert torch.equal(rq.view(torch.uint8), want_q.view(torch.uint8)), name + ": fp8 rows"
        assert rs.dtype == want_s.dtype and rs.is_contiguous() and torch.equal(rs, want_s), name + ": scales"
        (cq, cs), *_ = buf.dispatch((q[rank], scales[rank]), handle=handle)
        assert torch.equal(cq.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(cs, want_s), \
            name + ": cached"


def check_gloo_group(rank, R, dev):
    """vLLM's way: Buffer over a gloo group on a GPU machine works on the current GPU (as DeepEP)."""
    from epx import deep_ep
    g = dist.new_group(backend="gloo")
    buf = deep_ep.Buffer(g)
    try:
        assert buf.comm.backend == "cuda", buf.comm.backend
        x = torch.arange(R * 3, device=dev, dtype=torch.float32) + 100 * rank
        want = torch.cat([torch.arange(3, device=dev, dtype=torch.float32) + 3 * rank + 100 * p for p in range(R)])
        assert torch.equal(buf.comm.alltoall(x), want)
    finally:
        buf.destroy()


class _Dispatch(torch.autograd.Function if torch else object):
    @staticmethod
    def forward(ctx, x, w, topk, state):
        buf = state["buf"]
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk, state["E"])
        recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
            x, topk_idx=topk, topk_weights=w, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert)
        state["handle"] = handle
        ctx.state = state
        ctx.mark_non_differentiable(recv_idx)
        return recv_x, recv_w, recv_idx

    @staticmethod
    def backward(ctx, grad_x, grad_w, _):
        buf, handle = ctx.state["buf"], ctx.state["handle"]
        if grad_w is None:
            grad_w = torch.zeros(handle.num_recv_tokens, ctx.state["K"], device=grad_x.device)
        gx, gw, _ = buf.combine(grad_x.contiguous(), handle, grad_w.contiguous())
        return gx, gw, None, None


class _Combine(torch.autograd.Function if torch else object):
    @staticmethod
    def forward(ctx, y, state):
        ctx.state = state
        out, _, _ = state["buf"].combine(y, state["handle"])
        return out

    @staticmethod
    def backward(ctx, grad):
        g, *_ = ctx.state["buf"].dispatch(grad.contiguous(), handle=ctx.state["handle"])
        return g, None


def _expert(x, w1, w2):
    return torch.nn.functional.silu(x @ w1) @ w2


def check_moe_layer(rank, R, dev, buf):
    """Router -> dispatch -> experts (two per rank, matmuls) -> combine, forward and backward."""
    torch.backends.cuda.matmul.allow_tf32 = False
    E, K, H, F = 2 * R, 2, 64, 96
    L = E // R
    wr = _seeded(100, H, E, device=dev, scale=0.2).requires_grad_()
    w1 = _seeded(101, E, H, F, device=dev, scale=0.1).requires_grad_()
    w2 = _seeded(102, E, F, H, device=dev, scale=0.1).requires_grad_()
    xs = [_seeded(110 + p, _tokens(p), H, device=dev) for p in range(R)]
    gs = [_seeded(120 + p, _tokens(p), H, device=dev) for p in range(R)]

    def route(x):
        probs = torch.softmax(x @ wr, dim=-1)
        w, topk = torch.topk(probs, K, dim=-1)
        return w, topk

    # distributed
    x = xs[rank].clone().requires_grad_()
    w, topk = route(x)
    state = {"buf": buf, "E": E, "K": K}
    recv_x, recv_w, recv_idx = _Dispatch.apply(x, w, topk, state)
    y = torch.zeros_like(recv_x)
    for l in range(L):
        e = rank * L + l
        h = _expert(recv_x, w1[e], w2[e])
        for k in range(K):
            y = y + torch.where((recv_idx[:, k] == l)[:, None], recv_w[:, k:k + 1] * h, torch.zeros_like(h))
    out = _Combine.apply(y, state)
    (out * gs[rank]).sum().backward()
    # reference: one process, every rank's tokens
    wr_ref = wr.detach().clone().requires_grad_()
    w1_ref = w1.detach().clone().requires_grad_()
    w2_ref = w2.detach().clone().requires_grad_()
    X = torch.cat(xs).clone().requires_grad_()
    probs = torch.softmax(X @ wr_ref, dim=-1)
    W, TOP = torch.topk(probs, K, dim=-1)
    OUT = torch.zeros_like(X)
    for e in range(E):
        h = _expert(X, w1_ref[e], w2_ref[e])
        for k in range(K):
            OUT = OUT + torch.where((TOP[:, k] == e)[:, None], W[:, k:k + 1] * h, torch.zeros_like(h))
    (OUT * torch.cat(gs)).sum().backward()
    lo = sum(_tokens(p) for p in range(rank))
    sl = slice(lo, lo + _tokens(rank))
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, OUT[sl].detach(), **tol)
    torch.testing.assert_close(x.grad, X.grad[sl], **tol)
    for name, mine, ref in (("w1", w1.grad, w1_ref.grad), ("w2", w2.grad, w2_ref.grad)):
        local = slice(rank * L, (rank + 1) * L)
        torch.testing.assert_close(mine[local], ref[local], **tol, msg=lambda m: name + ": " + m)
    g = wr.grad.clone()
    dist.all_reduce(g)
    torch.testing.assert_close(g, wr_ref.grad, **tol)


def check_ll(rank, R, dev, buf):
    E, K, H, M = 4 * R, 4, 128, 16  # K = 4: a token has several experts on a rank
    L = E // R
    T = 5 + 3 * rank
    g = torch.Generator().manual_seed(200 + rank)
    x = torch.randn(T, H, generator=g).to(dev, torch.bfloat16)
    topk = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(dev)
    w = torch.rand(T, K, generator=g).to(dev)
    recv_x, recv_count, handle, ev, hook = buf.low_latency_dispatch(x, topk, M, E, use_fp8=False,
                                                                    return_recv_hook=True)
    hook()
    assert recv_x.shape == (L, R * M, H)
    # identity experts: out[t] = over the expert ranks q ascending, the sum of w[t,k] * x[t]
    # over the k ascending whose expert is on q (float32 products and sums)
    out, ev, hook = buf.low_latency_combine(recv_x, topk, w, handle)
    want = torch.zeros(T, H, device=dev)
    for q in range(R):
        part = torch.zeros(T, H, device=dev)
        for k in range(K):
            on_q = (topk[:, k:k + 1] // L == q).float()
            part = part + on_q * (w[:, k:k + 1] * x.float())
        want = want + part
    torch.testing.assert_close(out.float(), want.to(torch.bfloat16).float(), rtol=0, atol=0)
    return "ok"


def _worker(rank, R, port, device):
    import epx
    from epx import deep_ep
    cuda = device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method="tcp://127.0.0.1:%d" % port, world_size=R,
                            rank=rank)
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    # Buffer(group) works on the current GPU whenever CUDA is available, as DeepEP; torch CPU tensors
    # on a machine with GPUs need a CPU-backend communicator given explicitly
    comm = None if cuda else epx.Comm.from_torch(dist.group.WORLD, backend="cpu")
    buf = deep_ep.Buffer(dist.group.WORLD, int(1e8), 0, comm=comm)
    assert buf.comm.backend == ("cuda" if cuda else "cpu"), buf.comm.backend
    check_alltoall(rank, R, dev, buf.comm)
    check_ht(rank, R, dev, buf)
    if cuda:
        check_ht_fp8_scales(rank, R, dev, buf)
        check_gloo_group(rank, R, dev)
    check_moe_layer(rank, R, dev, buf)
    ll = check_ll(rank, R, dev, buf)
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    buf.destroy()
    if comm is not None:
        comm.destroy()
    print("rank %d (%s): alltoall, dispatch/combine, MoE layer forward+backward ok; low-latency %s"
          % (rank, device, ll), flush=True)
    dist.destroy_process_group()


def run(device="cuda"):
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp.spawn(_worker, args=(NRANKS, port, device), nprocs=NRANKS, join=True)


def test_torch_cuda():
    import pytest
    if torch is None:
        pytest.skip("torch is not installed")
    if not torch.cuda.is_available() or torch.cuda.device_count() < NRANKS:
        pytest.skip("needs %d GPUs" % NRANKS)
    run("cuda")


def test_torch_cpu():
    import pytest
    if torch is None:
        pytest.skip("torch is not installed")
    run("cpu")


if __name__ == "__main__":
    if torch is None:
        print("skipped: torch is not installed")
        sys.exit(0)
    run(sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cuda")
