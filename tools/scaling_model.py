#!/usr/bin/env python3
"""scaling_model.py: the scale-out model of docs/SCALING.md (plain Python 3, no dependencies).

  python3 tools/scaling_model.py                 # every model table of docs/SCALING.md
  python3 tools/scaling_model.py check --ranks 4 --local 2 --tokens 512 --hidden 2048 \
      --topk 8 --experts 32 [--dtype bf16|fp8] [--mode ht|ll] [--skew S] [--counts FILE]
                                                 # bytes epx's MPI path sends for the routing
                                                 # of epx-bench, against the model and (with
                                                 # --counts) against tools/mpi_count.c's counts;
                                                 # ends "check: passed" or "check: FAILED"
  python3 tools/scaling_model.py selftest        # closed forms against brute force (ctest)

Model of epx's hierarchical scheme (src/hier/hier.h, src/hier/moe.c):
  verdict   every dispatch and combine starts with one alltoall of small blocks: to every
            rank 6 int64 (verdict, call, handle, and in a dispatch the flows to that rank,
            its host and, to a gateway, the ranks of its host, so that no count step
            follows); a high-throughput dispatch then allreduces 7 int64 (the ranks whose
            output capacity is short, and those that could not make their part);
  dispatch  a token crosses to each destination host other than its own once, to the gateway
            (the GPU with the source's local index), as one record: routing (source, token,
            top-k, weights) and row (FP8: and scales), padded to 8 bytes; the gateway fans it
            out over NVLink to the other GPUs of its host that need it;
  combine   receivers send their rows back to the gateways over NVLink; each gateway sends
            them home unreduced, one message per (gateway, source): one BF16 row per (token,
            destination rank on another host) (low latency: per (token, expert) there); the
            home GPU sums them in the single-host order (bit-identical, no chain).
  The previous combine (up to commit aba016a) chained a float32 partial sum through the
  token's destination hosts in ascending order; it is kept here for comparison only
  (Table 3b, the "previous chain" columns, and `check`'s last line).
"""
import argparse
import math
import random
import sys
from fractions import Fraction

# ---- Routing: distinct destination hosts / ranks per token -------------------------------------


class Routing:
    """K of E experts per token, drawn without replacement; R ranks, N hosts of G ranks.
    M = None: uniform over all experts; M = m < N: node-limited (m hosts drawn uniformly,
    then K experts uniformly among theirs). Every probability is exact (Fraction)."""

    def __init__(self, E, K, R, G, M=None):
        assert E % R == 0 and R % G == 0
        self.E, self.K, self.R, self.G = E, K, R, G
        self.N = R // G
        self.Eh = E // self.N  # experts per host
        self.L = E // R  # experts per rank
        self.M = M if (M is not None and M < self.N) else None
        self.pool = self.Eh * (self.M or self.N)  # experts a token can pick from

    def q(self, s):
        """P(no expert of the token on a given set of s hosts)."""
        E, K, N, Eh = self.E, self.K, self.N, self.Eh
        if s <= 0:
            return Fraction(1)
        if self.M is None:
            return Fraction(math.comb(E - s * Eh, K), math.comb(E, K))
        M, P = self.M, self.pool
        tot = Fraction(0)
        for i in range(0, min(s, M) + 1):  # i of the s hosts are among the M chosen
            pi = Fraction(math.comb(s, i) * math.comb(N - s, M - i), math.comb(N, M))
            tot += pi * Fraction(math.comb(P - i * Eh, K), math.comb(P, K))
        return tot

    def qr(self):
        """P(no expert of the token on a given rank)."""
        L, K = self.L, self.K
        if self.M is None:
            return Fraction(math.comb(self.E - L, K), math.comb(self.E, K))
        pm = Fraction(self.M, self.N)
        return (1 - pm) + pm * Fraction(math.comb(self.pool - L, K), math.comb(self.pool, K))

    def hosts(self):  # E[n], distinct destination hosts (own host included)
        return self.N * (1 - self.q(1))

    def cross(self):  # E[n - [home in D]]: hosts a token crosses to in dispatch
        return (self.N - 1) * (1 - self.q(1))

    def ranks(self):  # E[distinct destination ranks]
        return self.R * (1 - self.qr())

    def nvl_rows(self):  # E[destination ranks that are not the gateway of their host]
        return (self.R - self.N) * (1 - self.qr())

    def home_rows(self):  # E[destination ranks on other hosts than home]: rows a token's combine sends home
        return self.ranks() * Fraction(self.N - 1, self.N)

    def p_max(self, g):  # P(host g is the highest destination host)
        return self.q(self.N - 1 - g) - self.q(self.N - g)

    def p_min(self, g):  # P(host g is the lowest destination host)
        return self.q(g) - self.q(g + 1)

    # The previous combine (a float32 partial sum chained through the destination hosts), for
    # comparison only.
    def chain_send(self, g):  # float32 rows a GPU of host g sends per token of its rail
        return self.N * (1 - self.q(1)) - self.p_max(g)

    def chain_recv(self, g):
        return self.N * ((1 - self.q(1)) - self.p_min(g)) + (1 - self.p_max(g))

    def chain_hops(self):  # mean hops per token
        return self.hosts() - sum(self.p_max(g) for g in range(self.N)) / self.N

    def chain_bottleneck(self):  # max over hosts of max(send, recv), per token of the rail
        return max(max(self.chain_send(g), self.chain_recv(g)) for g in range(self.N))

    def ll_runs(self):
        """E[runs of consecutive k on one host] (low-latency chains follow ascending k)."""
        if self.N == 1:
            return Fraction(1)
        same = Fraction(self.Eh - 1, self.pool - 1)
        return 1 + (self.K - 1) * (1 - same)

    def ll_hops(self):  # runs - 1 between hosts, + 1 home unless the last run is at home
        if self.N == 1:
            return Fraction(0)
        return self.ll_runs() - 1 + (1 - Fraction(1, self.N))


def deepep_test_hosts(E, K, R, G, groups, tokens=4096, seed=1):
    """E[distinct hosts] under DeepEP's test_internode.py routing, by sampling: scores
    |N(0,1)| + 1, the `groups` hosts with the highest maximum score, then the top K
    experts among theirs."""
    N, Eh = R // G, E // (R // G)
    rng = random.Random(seed)
    tot = 0
    for _ in range(tokens):
        sc = [abs(rng.gauss(0.0, 1.0)) + 1.0 for _ in range(E)]
        gmax = [max(sc[h * Eh:(h + 1) * Eh]) for h in range(N)]
        chosen = set(sorted(range(N), key=lambda h: -gmax[h])[:groups])
        cand = [e for e in range(E) if e // Eh in chosen]
        top = sorted(cand, key=lambda e: -sc[e])[:K]
        tot += len({e // Eh for e in top})
    return tot / tokens


# ---- Parameters -------------------------------------------------------------------------------

H, K, E, G = 7168, 8, 256, 8
SCALE = lambda h: (h + 127) // 128  # noqa: E731
ROW = {"bf16": 2 * H, "fp8": H + 4 * SCALE(H)}  # dispatch rows (FP8: e4m3 + float32 scales)
ROW_LL_DEEPEP_FP8 = H + 4 * SCALE(H) + 16  # DeepEP's low-latency message (its test's count)
EPS = [8, 16, 32, 64, 128, 256]


def align(x, a):
    return (x + a - 1) // a * a


def token_record(row, K_, weights):
    """Bytes of one dispatch record of src/hier/moe.c (epx__route): int32 source, token and
    top-k ids, float32 weights when the caller passes them (high throughput), the row (FP8:
    and its scales), padded to 8 bytes."""
    return align(4 * (2 + K_ + (K_ if weights else 0)) + row, 8)


def home_record(H_, K_, combine_weights=False):
    """Bytes a high-throughput combine sends home per (token, rank): the BF16 y row padded to
    4 bytes, then K float32 weights when the caller passes topk_weights to combine (the
    tables do not: DeepSeek-V3's forward needs none). Low latency: 2H per (token, expert)."""
    return align(2 * H_, 4) + (4 * K_ if combine_weights else 0)


def params(a):
    return dict(nic=a.nic_gbs * 1e9, nvl=a.nvl_gbs * 1e9, a_net=a.alpha_net_us * 1e-6, a_nvl=a.alpha_nvl_us * 1e-6,
                skew=a.skew_factor)


def verdict_alpha(N, p):
    """The verdict that starts every dispatch and combine (an alltoall of small blocks):
    ceil(log2 N) network steps between hosts (Bruck); none on one host (single-host backend).
    The capacity allreduce of a high-throughput dispatch (ceil(log2 N) more) is not counted."""
    return math.ceil(math.log2(N)) * p["a_net"] if N > 1 else 0.0


def verdict_bytes(R, dispatch):
    """Bytes each rank sends (and receives) in the verdict's alltoall (src/hier/moe.c,
    epx__verdict): R blocks of 6 int64 in every call (the flows are zero outside a
    dispatch; one size, so that ranks that made different calls still meet)."""
    del dispatch
    return 8 * R * 6


CAPACITY_BYTES = 8 * 7  # the second round of a high-throughput dispatch (src/hier/moe.c, epx__verdict_rows)


LINK_HEAD = 16  # each message of a round along a rail: status and length (src/core/bootstrap.c)


def verdict_rail_bytes(R, dispatch, ht):
    """Bytes one rank sends and receives over the network for one verdict on the GPU path
    (src/xhost/xhost.c): inside the host the blocks gather over shared memory, then each rank
    exchanges with the same local rank of each of the N - 1 other hosts its host's G blocks
    for that rank; in a high-throughput dispatch the capacity allreduce's host sums likewise.
    No rank moves more (before commit 6c2a9ad rank 0 of a TCP star relayed all R x R blocks)."""
    N = R // G
    per_rank = verdict_bytes(R, dispatch) // R
    a2a = 2 * (N - 1) * (G * per_rank + LINK_HEAD)
    return a2a + (2 * (N - 1) * (CAPACITY_BYTES + LINK_HEAD) if ht else 0)


def ht(r, T, dtype, p, meta=True):
    """High-throughput dispatch + combine per GPU for routing r: bytes and time floors."""
    rec = token_record(ROW[dtype], K, True) if meta else ROW[dtype]
    net = p["a_net"] if r.N > 1 else 0.0
    ar = verdict_alpha(r.N, p) if meta else net  # meta=False: DeepEP's scheme, one notify step
    d_nic = float(T * r.cross()) * rec
    d_nvl = float(T * r.nvl_rows()) * ROW[dtype]
    d_log = float(T * r.hosts()) * ROW[dtype]  # DeepEP's "RDMA" bytes: tokens x hosts (own host included)
    d_t = p["skew"] * max(d_nic / p["nic"], d_nvl / p["nvl"]) + ar + net + p["a_nvl"]
    d_bound = "NIC" if d_nic / p["nic"] >= d_nvl / p["nvl"] else "NVLink"
    c_nvl = float(T * r.nvl_rows()) * 2 * H
    c_log = float(T * r.hosts()) * 2 * H
    # epx (src/hier): every remote rank's bf16 row goes home unreduced through the gateways
    # (rail-aligned), home sums in ascending rank order; by rail symmetry every GPU sends and
    # receives the same
    c_home = float(T * r.home_rows()) * home_record(H, K)
    c_t_home = p["skew"] * max(c_home / p["nic"], c_nvl / p["nvl"]) + ar + net + p["a_nvl"]
    # alternative, DeepEP's: one bf16 host partial per (token, other host); changes the rounding
    c_bf16 = float(T * r.cross()) * 2 * H
    c_t_bf16 = p["skew"] * max(c_bf16 / p["nic"], c_nvl / p["nvl"]) + net + p["a_nvl"]
    # previous epx combine (up to aba016a): float32 partial sums chained host to host
    c_chain = float(T * r.chain_bottleneck()) * 4 * H  # busiest host
    c_chain_mean = float(T * r.chain_hops()) * 4 * H
    depth = min(r.N, K, r.M or r.N) + 1 if r.N > 1 else 0
    c_t_chain = p["skew"] * max(c_chain / p["nic"], c_nvl / p["nvl"]) + depth * p["a_net"] + p["a_nvl"]
    return dict(d_nic=d_nic, d_nvl=d_nvl, d_log=d_log, d_t=d_t, d_bound=d_bound, c_nvl=c_nvl, c_log=c_log,
                c_home=c_home, c_t_home=c_t_home, c_bf16=c_bf16, c_t_bf16=c_t_bf16, c_chain=c_chain,
                c_chain_mean=c_chain_mean, c_t_chain=c_t_chain)


def md(header, rows):
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---:" for _ in header) + " |"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def f(x, n=2):
    return f"{float(x):.{n}f}"


def mb(x):
    return f"{x / 1e6:.1f}"


def us(x):
    return f"{x * 1e6:.0f}"


def routings(ep):
    """(name, Routing) for EP: uniform, and 4-node where it limits anything."""
    out = [("unif", Routing(E, K, ep, G))]
    r4 = Routing(E, K, ep, G, 4)
    if r4.M is not None:
        out.append(("4-node", r4))
    return out


def report(a):
    p = params(a)
    T, Tl = a.tokens, a.ll_tokens
    print(f"# epx scale-out model: H={H}, K={K} of E={E}, {G} GPUs per host, T={T} (HT) / {Tl} (LL) tokens per GPU")
    print(f"# NIC {a.nic_gbs:g} GB/s per GPU, NVLink {a.nvl_gbs:g} GB/s per GPU, alpha_net {a.alpha_net_us:g} us, "
          f"alpha_nvl {a.alpha_nvl_us:g} us, skew factor {a.skew_factor:g}; MB = 1e6 bytes, GB/s = 1e9 bytes/s")
    print(f"# records: dispatch FP8 {token_record(ROW['fp8'], K, True)} B, BF16 {token_record(ROW['bf16'], K, True)} B "
          f"(HT, with weights), LL FP8 {token_record(ROW['fp8'], K, False)} B; combine home {home_record(H, K)} B "
          f"per (token, rank) (HT), {2 * H} B per (token, expert) (LL)\n")

    print("## Table 1: destination hosts and ranks per token\n")
    rows = []
    for ep in EPS:
        u, l = Routing(E, K, ep, G), Routing(E, K, ep, G, 4)
        rows.append([ep, u.N, f(u.hosts()), f(l.hosts()), f(u.cross()), f(l.cross()), f(u.ranks()), f(l.ranks()),
                     f(u.home_rows()), f(l.home_rows()), f(u.chain_hops()), f(l.chain_hops())])
    print(md(["EP", "hosts", "E[n] unif", "E[n] 4-node", "crossings unif", "crossings 4-node", "ranks unif",
              "ranks 4-node", "rows home unif", "rows home 4-node", "prev. chain hops unif",
              "prev. chain hops 4-node"], rows))

    for dtype in ("fp8", "bf16"):
        print(f"\n## Table 2{'a' if dtype == 'fp8' else 'b'}: high-throughput dispatch, {dtype.upper()}, per GPU per layer\n")
        rows = []
        for ep in EPS:
            for name, r in routings(ep):
                m = ht(r, T, dtype, p)
                rows.append([ep, name, mb(m["d_nic"]), mb(m["d_nvl"]), us(m["d_t"]), m["d_bound"],
                             f(m["d_log"] / m["d_t"] / 1e9, 1)])
        print(md(["EP", "routing", "NIC MB", "NVLink MB", "floor µs", "bound", "DeepEP-convention GB/s"], rows))

    print("\n## Table 3: high-throughput combine, BF16 rows, per GPU per layer: epx (rows home) and bf16 partials\n")
    rows = []
    for ep in EPS:
        for name, r in routings(ep):
            m = ht(r, T, "bf16", p)
            rows.append([ep, name, mb(m["c_nvl"]), mb(m["c_home"]), us(m["c_t_home"]), f(m["c_log"] / m["c_t_home"] / 1e9, 1),
                         mb(m["c_bf16"]), us(m["c_t_bf16"]), f(m["c_log"] / m["c_t_bf16"] / 1e9, 1),
                         f(m["c_home"] / m["c_bf16"]) if m["c_bf16"] else "-"])
    print(md(["EP", "routing", "NVLink MB", "epx NIC MB", "epx µs", "epx GB/s", "bf16-partial NIC MB",
              "bf16-partial µs", "bf16-partial GB/s", "epx / bf16-partial bytes"], rows))

    print("\n## Table 3b: epx's combine (rows home) against the previous chain, BF16, per GPU per layer\n")
    rows = []
    for ep in EPS:
        for name, r in routings(ep):
            m = ht(r, T, "bf16", p)
            if r.N == 1:
                rows.append([ep, name, "0.0", "0.0", "0.0", "-", "-", us(m["c_t_chain"]), us(m["c_t_home"]), "-"])
                continue
            rows.append([ep, name, mb(m["c_chain_mean"]), mb(m["c_chain"]), mb(m["c_home"]),
                         f(m["c_home"] / m["c_chain_mean"]), f(m["c_home"] / m["c_chain"]), us(m["c_t_chain"]),
                         us(m["c_t_home"]), f(m["c_t_chain"] / m["c_t_home"])])
    print(md(["EP", "routing", "chain NIC MB (mean)", "chain NIC MB (busiest)", "rows-home NIC MB",
              "rows-home / chain (mean)", "rows-home / chain (busiest)", "chain µs", "rows-home µs",
              "chain µs / rows-home µs"], rows))

    print("\n## Table 4: one MoE layer (FP8 dispatch + BF16 combine), forward\n")
    rows = []
    for ep in EPS:
        row = [ep]
        for r in (Routing(E, K, ep, G), Routing(E, K, ep, G, 4)):
            m = ht(r, T, "fp8", p)
            mc = ht(r, T, "bf16", p)
            row += [us(m["d_t"] + mc["c_t_home"]), us(m["d_t"] + mc["c_t_bf16"]), us(m["d_t"] + mc["c_t_chain"])]
        rows.append(row)
    print(md(["EP", "unif: epx µs", "unif: bf16-partial µs", "unif: prev. chain µs", "4-node: epx µs",
              "4-node: bf16-partial µs", "4-node: prev. chain µs"], rows))

    print("\n## Table 5: skew — the busiest link carries s × the mean (EP64, 4-node, FP8 dispatch + epx combine)\n")
    rows = []
    for s in (1.0, 1.25, 1.5, 2.0):
        q = dict(p, skew=s)
        r = Routing(E, K, 64, G, 4)
        m, mc = ht(r, T, "fp8", q), ht(r, T, "bf16", q)
        rows.append([f(s), us(m["d_t"]), us(mc["c_t_home"]), us(m["d_t"] + mc["c_t_home"]),
                     f(m["d_log"] / m["d_t"] / 1e9, 1), f(mc["c_log"] / mc["c_t_home"] / 1e9, 1)])
    print(md(["s", "dispatch µs", "combine µs", "layer µs", "dispatch DeepEP-convention GB/s",
              "combine DeepEP-convention GB/s"], rows))

    # DeepEP comparison: H800 (NVLink ~160 GB/s max, 153 measured intranode), CX7 400 Gb/s.
    print("\n## Table 6: against DeepEP's published internode figures (FP8 dispatch, BF16 combine, T=4096)\n")
    rows = []
    pub = {16: (43, 43), 32: (58, 57), 64: (51, 50)}  # DeepEP docs/legacy.md (V1, H800, 4096 tokens)
    pub2 = {16: (90, 81), 32: (61, 61)}  # DeepEP README (V2, SM90 + CX7, 8192 tokens)
    for ep in (16, 32, 64):
        N = ep // G
        groups = min(N, 4)
        r = Routing(E, K, ep, G, groups if groups < N else None)
        en_test = deepep_test_hosts(E, K, ep, G, groups) if groups < N else float(r.hosts())
        row = [ep, f(en_test)]
        for nvl in (153.0, a.nvl_gbs):
            q = dict(p, nvl=nvl * 1e9, skew=1.0)
            m = ht(r, 4096, "fp8", q, meta=False)
            mc = ht(r, 4096, "bf16", q, meta=False)
            row += [f(m["d_log"] / m["d_t"] / 1e9, 1) + " (" + m["d_bound"] + ")", f(mc["c_log"] / mc["c_t_bf16"] / 1e9, 1)]
        row += [f"{pub[ep][0]} / {pub[ep][1]}", (f"{pub2[ep][0]} / {pub2[ep][1]}" if ep in pub2 else "-")]
        q = dict(p, skew=1.0)
        md_, mc = ht(r, 4096, "fp8", q), ht(r, 4096, "bf16", q)
        row += [f(md_["d_log"] / md_["d_t"] / 1e9, 1), f(mc["c_log"] / mc["c_t_home"] / 1e9, 1),
                f(mc["c_log"] / mc["c_t_chain"] / 1e9, 1)]
        rows.append(row)
    print(md(["EP", "E[n] (DeepEP test routing)", "model dispatch, NVLink 153", "model combine (bf16 partial), NVLink 153",
              f"model dispatch, NVLink {a.nvl_gbs:g}", f"model combine (bf16 partial), NVLink {a.nvl_gbs:g}",
              "DeepEP V1 H800 dispatch / combine", "DeepEP V2 SM90 dispatch / combine", "epx dispatch",
              "epx combine (rows home)", "prev. chain combine"], rows))
    print("\nNIC-bound limit of the convention: NIC × N/(N−1) = "
          + ", ".join(f"EP{n * G}: {a.nic_gbs * n / (n - 1):.1f} GB/s" for n in (2, 4, 8)))

    ll_pub = {8: (77, 114), 16: (118, 195), 32: (155, 273), 64: (173, 314), 128: (192, 369), 256: (194, 360)}
    print("\n## Table 7: low latency, T=%d per GPU: FP8 dispatch, BF16 combine, per GPU\n" % Tl)
    rows, ratios = [], []
    for ep in EPS:
        for name, r in routings(ep):
            N = r.N
            off = Fraction(N - 1, N)
            net = p["a_net"] if N > 1 else 0.0
            ar = verdict_alpha(N, p)
            # direct (DeepEP low-latency style): one message per (token, expert); off-host over the NIC
            dd = float(Tl * K * off) * ROW_LL_DEEPEP_FP8
            dd_nvl = float(Tl * K * (Fraction(1, N) - Fraction(1, ep))) * ROW_LL_DEEPEP_FP8
            dd_t = max(dd / p["nic"], dd_nvl / p["nvl"]) + (p["a_net"] if N > 1 else p["a_nvl"])
            dc = float(Tl * K * off) * 2 * H
            dc_t = max(dc / p["nic"], float(Tl * K * (Fraction(1, N) - Fraction(1, ep))) * 2 * H / p["nvl"]) + \
                (p["a_net"] if N > 1 else p["a_nvl"])
            # epx: verdict, one record per (token, other host), then the NVLink fan-out, as two
            # store-and-forward hops
            hd = float(Tl * r.cross()) * token_record(ROW["fp8"], K, False)
            hd_nvl = float(Tl * r.nvl_rows()) * ROW["fp8"]
            hd_t = hd / p["nic"] + hd_nvl / p["nvl"] + ar + net + p["a_nvl"]
            # epx combine: verdict, rows back to the gateways (NVLink), then one row per (token,
            # expert on another host) home: the direct combine's NIC bytes, store-and-forward
            hc_nvl = float(Tl * K * Fraction(ep - N, ep)) * 2 * H
            he_t = dc / p["nic"] + hc_nvl / p["nvl"] + ar + net + p["a_nvl"]
            # previous chain (k order, float32, weights sent along) and the bf16-partial alternative
            hc = float(Tl * r.ll_hops()) * 4 * H + float(Tl * r.cross()) * 4 * K
            hc_t = hc / p["nic"] + hc_nvl / p["nvl"] + (K + 1 if N > 1 else 0) * p["a_net"] + p["a_nvl"]
            hb = float(Tl * r.cross()) * 2 * H
            hb_t = hb / p["nic"] + hc_nvl / p["nvl"] + net + p["a_nvl"]
            pub = ll_pub.get(ep) if name == "unif" else None
            if hc:
                ratios.append(f"EP{ep} {name} {dc / hc:.2f}")
            rows.append([ep, name, f"{dd / 1e6:.2f}", us(dd_t), f"{hd / 1e6:.2f}", us(hd_t), f"{dc / 1e6:.2f}", us(dc_t),
                         us(he_t), f"{hc / 1e6:.2f}", us(hc_t), f"{hb / 1e6:.2f}", us(hb_t),
                         f"{pub[0]} / {pub[1]}" if pub else "-"])
    print(md(["EP", "routing", "direct disp. NIC MB", "µs", "epx disp. NIC MB", "µs",
              "direct = epx comb. NIC MB", "direct µs", "epx µs", "prev. chain comb. NIC MB", "µs",
              "bf16-partial comb. NIC MB", "µs", "DeepEP V1 LL µs disp. / comb."], rows))
    print("\nLow-latency combine, epx NIC bytes / previous chain's: " + ", ".join(ratios))
    # On the device (SCALING.md, "Low latency across hosts on the device"): a dispatch sends
    # max_tokens records to every rail peer, against the records needed, 1 / p with p the
    # chance that a token reaches a given other host (uniform routing); a combine sends
    # max_tokens * K rows to each, of which K / N per token are needed on average: N times.
    print("Fixed-size low-latency sends, records sent / needed (1 / P(a token reaches a given other host)): "
          + ", ".join(f"EP{ep}: p = {float(1 - Routing(E, K, ep, G).q(1)):.4f}, "
                      f"{float(1 / (1 - Routing(E, K, ep, G).q(1))):.2f}" for ep in EPS[1:]))
    print("Fixed-size low-latency combine, rows sent / needed (N hosts): "
          + ", ".join(f"EP{ep}: {ep // G}" for ep in EPS[1:]))
    print("\nVerdict alltoall, bytes each rank sends per dispatch / combine (high-throughput dispatch: "
          f"and a {CAPACITY_BYTES} B allreduce): "
          + ", ".join(f"EP{ep}: {verdict_bytes(ep, True) / 1e3:.2f} / {verdict_bytes(ep, False) / 1e3:.2f} KB"
                      for ep in EPS[1:]))
    print("Over the network per rank, the most any rank moves, per high-throughput dispatch / combine (GPU path): "
          + ", ".join(f"EP{ep}: {verdict_rail_bytes(ep, True, True) / 1e3:.2f} / "
                      f"{verdict_rail_bytes(ep, False, False) / 1e3:.2f} KB" for ep in EPS[1:]))


# ---- Check against the code: epx-bench's routing, epx's MPI bytes ---------------------------------

M64 = (1 << 64) - 1
GOLD = 0x9E3779B97F4A7C15
SEED = 0x6570782D6D6F6521  # BENCH_MOE_SEED


def mix64(x):
    x = (x + GOLD) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def key4(a, b, c, d):
    return mix64(mix64(mix64(mix64(a) ^ b) ^ c) ^ d)


class Rng:
    def __init__(self, s):
        self.s = s

    def next(self):
        self.s = (self.s + GOLD) & M64
        return mix64(self.s)

    def unit(self):
        return (self.next() >> 11) * (1.0 / 9007199254740992.0)


def bench_routing(R, T, K, E, skew):
    """tools/bench_moe_common.c: bench_moe_gen_routing, bit for bit."""
    pr = Rng(key4(SEED, 0xFEED, 0, 3))
    perm = list(range(E))
    for i in range(E - 1, 0, -1):
        j = pr.next() % (i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    wz = [math.pow(float(i + 1), -skew) for i in range(E)]
    topk = []
    for s in range(R):
        rows = []
        for t in range(T):
            r = Rng(key4(SEED, s, t, 2))
            taken = [False] * E
            e = []
            for _ in range(K):
                if skew > 0:
                    tot = 0.0
                    for i in range(E):
                        tot += 0.0 if taken[i] else wz[i]
                    u = r.unit() * tot
                    pick = -1
                    for i in range(E):
                        if taken[i]:
                            continue
                        pick = i
                        u -= wz[i]
                        if u < 0:
                            break
                    taken[pick] = True
                    e.append(perm[pick])
                else:
                    while True:
                        pick = r.next() % E
                        if not taken[pick]:
                            break
                    taken[pick] = True
                    e.append(pick)
                r.next()  # the weight
            rows.append(e)
        topk.append(rows)
    return topk


def bench_rows(H_, dtype, mode):
    """Row and scale bytes the bench's dispatch moves (its config: FP8 scales are float32)."""
    if dtype == "fp8":
        return H_ + 4 * SCALE(H_)  # ht: e4m3 + scales; ll: quantised by the dispatch
    return 2 * H_


def exact_flows(topk, R, G_, H_, K_, E_, dtype, mode):
    """What src/hier/moe.c hands to MPI in one dispatch (step `tokens`) and one combine (step
    `home`) for epx-bench's routing: bytes[step][src][dst]. Hosts are blocks of G_ ranks (as
    with EPX_LOCAL_SIZE); the gateway of source p on host k is the rank of p's local index
    there. `chain` (per rank) is what the previous, chained combine sent for the same routing,
    for comparison only."""
    L = E_ // R
    host = lambda q: q // G_  # noqa: E731
    gw = lambda p, k: k * G_ + (p % G_)  # noqa: E731
    rec = token_record(bench_rows(H_, dtype, mode), K_, mode == "ht")  # the bench passes weights to ht dispatch
    hrow = home_record(H_, K_) if mode == "ht" else 2 * H_  # and none to ht combine
    out = {st: [[0] * R for _ in range(R)] for st in ("tokens", "home")}
    out["chain"] = [0] * R
    for s in range(R):
        for e in topk[s]:
            dh = sorted({host(x // L) for x in e})
            for k in dh:
                if k != host(s):
                    out["tokens"][s][gw(s, k)] += rec
            if mode == "ht":
                for q in sorted({x // L for x in e}):  # one row per destination rank
                    if host(q) != host(s):
                        out["home"][gw(s, host(q))][s] += hrow
            else:
                for x in sorted(set(e)):  # one row per expert
                    if host(x // L) != host(s):
                        out["home"][gw(s, host(x // L))][s] += hrow
            # previous combine: a float32 partial sum per hop (ht: ascending hosts; ll: runs of
            # consecutive k on one host), then home
            if mode == "ht":
                runs = dh
            else:
                runs = []
                for x in e:
                    h = host(x // L)
                    if not runs or runs[-1] != h:
                        runs.append(h)
            holders = [gw(s, k) for k in runs] + [s]
            for a_, b_ in zip(holders, holders[1:]):
                if a_ != b_:
                    out["chain"][a_] += 4 * H_
    return out


def model_flows(R, G_, T, H_, K_, E_, dtype, mode):
    """The closed form of exact_flows under uniform routing: per rank and per host pair."""
    r = Routing(E_, K_, R, G_)
    N = r.N
    rec = token_record(bench_rows(H_, dtype, mode), K_, mode == "ht")
    if mode == "ht":
        home = float(T * r.home_rows()) * home_record(H_, K_)
        pair_home = float(G_ * T * G_ * (1 - r.qr())) * home_record(H_, K_)  # sources of host a x ranks of host b hit
    else:
        home = float(T * K_ * Fraction(N - 1, N)) * 2 * H_
        pair_home = float(G_ * T * Fraction(K_, N)) * 2 * H_
    return dict(rank={"tokens": float(T * r.cross()) * rec, "home": home},
                pair={"tokens": float(G_ * T * (1 - r.q(1))) * rec, "home": pair_home})


def read_counts(path):
    """tools/mpi_count.c's lines: {(rank, step): (bytes, ops, msgs)} and {(rank, step, dest): bytes}."""
    c, d = {}, {}
    with open(path) as fh:
        for line in fh:
            if not line.startswith("mpicount "):
                continue
            kv = dict(x.split("=") for x in line.split()[1:])
            if "dest" in kv:
                d[(int(kv["rank"]), kv["step"], int(kv["dest"]))] = int(kv["bytes"])
            else:
                c[(int(kv["rank"]), kv["step"])] = (int(kv["bytes"]), int(kv["ops"]), int(kv["msgs"]))
    return c, d


def check(a):
    R, G_, T, H_, K_, E_ = a.ranks, a.local, a.tokens, a.hidden, a.topk, a.experts
    if R % G_ or E_ % R:
        print(f"check: FAILED (--ranks {R} must be a multiple of --local {G_}, --experts {E_} of --ranks)")
        return 1
    N = R // G_
    topk = bench_routing(R, T, K_, E_, a.skew)
    ex = exact_flows(topk, R, G_, H_, K_, E_, a.dtype, a.mode)
    mo = model_flows(R, G_, T, H_, K_, E_, a.dtype, a.mode)
    cnt, dst = read_counts(a.counts) if a.counts else (None, None)
    asserted = a.skew == 0  # the closed form is for uniform routing
    fails = []
    print(f"# check: {R} ranks as {N} hosts of {G_}, T={T} H={H_} K={K_} E={E_}, {a.mode} {a.dtype}, skew {a.skew:g}; "
          f"bytes per operation, sent through MPI (tokens: dispatch, home: combine)\n")
    ops = None
    if cnt:
        calls = {cnt.get((q, "alltoall"), (0, 0, 0))[1] for q in range(R)}
        if len(calls) != 1 or next(iter(calls)) % 2:
            fails.append(f"alltoall calls differ between ranks or are not 2 per operation: {sorted(calls)}")
        else:
            ops = next(iter(calls)) // 2  # one verdict per dispatch and per combine
            print(f"operations (from the verdict alltoalls: 1 per dispatch and per combine): "
                  f"{ops} dispatches, {ops} combines\n")
    hdr = ["step", "rank", "model (closed form)", "exact (bench routing)", "model / exact"]
    if cnt:
        hdr += ["measured (PMPI) / op", "ops", "measured / exact"]

    def meas(b, e):  # measured bytes per operation, and its ratio to the exact count
        if not ops:
            return ["-", "-"]
        if b % ops:
            fails.append(f"{b} bytes is not a multiple of {ops} operations")
        per = b / ops
        return [f"{per:.1f}", f"{per / e:.6f}" if e else ("-" if per == 0 else "inf")]

    rows = []
    for st in ("tokens", "home"):
        for q in range(R):
            e = sum(ex[st][q])
            m = mo["rank"][st]
            ratio = m / e if e else float("inf")
            if asserted and abs(ratio - 1) > a.tol:
                fails.append(f"{st} rank {q}: model / exact = {ratio:.4f}")
            row = [st, q, f"{m:.0f}", e, f"{ratio:.4f}"]
            if cnt:
                b, o, _ = cnt.get((q, st), (0, 0, 0))
                per, r_ = meas(b, e)
                if ops and b != e * ops:
                    fails.append(f"{st} rank {q}: measured {b} bytes in {ops} operations, exact {e} per operation")
                if ops and o != ops and e:
                    fails.append(f"{st} rank {q}: sent in {o} operations, {ops} expected")
                row += [per, o, r_]
            rows.append(row)
    print(md(hdr, rows))

    print("\nPer host pair (all ranks of host a to all ranks of host b):\n")
    hdr = ["step", "from host", "to host", "model (closed form)", "exact (bench routing)", "model / exact"]
    if cnt:
        hdr += ["measured (PMPI) / op", "measured / exact"]
    rows = []
    for st in ("tokens", "home"):
        for ha in range(N):
            for hb in range(N):
                if ha == hb:
                    continue
                e = sum(ex[st][s][d] for s in range(ha * G_, (ha + 1) * G_) for d in range(hb * G_, (hb + 1) * G_))
                m = mo["pair"][st]
                ratio = m / e if e else float("inf")
                if asserted and abs(ratio - 1) > a.tol:
                    fails.append(f"{st} hosts {ha}->{hb}: model / exact = {ratio:.4f}")
                row = [st, ha, hb, f"{m:.0f}", e, f"{ratio:.4f}"]
                if cnt:
                    b = sum(dst.get((s, st, d), 0) for s in range(ha * G_, (ha + 1) * G_)
                            for d in range(hb * G_, (hb + 1) * G_))
                    row += meas(b, e)
                rows.append(row)
    print(md(hdr, rows))

    if cnt and ops:
        # Every (rank, destination): rail alignment (a rank sends only to its gateways / homes)
        # and the bytes of each pair.
        bad = 0
        for st in ("tokens", "home"):
            for s in range(R):
                for d in range(R):
                    if dst.get((s, st, d), 0) != ex[st][s][d] * ops:
                        bad += 1
                        fails.append(f"{st} rank {s} -> rank {d}: measured {dst.get((s, st, d), 0)}, "
                                     f"exact {ex[st][s][d] * ops}")
        pairs = sum(1 for st in ("tokens", "home") for s in range(R) for d in range(R) if ex[st][s][d])
        print(f"\n(step, rank, destination) cells: {pairs} of {2 * R * R} carry bytes in the exact count (each rank "
              f"to the rank of its local index on every other host); measured ≠ exact in {bad}")
        # The verdicts: one alltoall per operation; the allreduces of MoE creation and of the
        # capacity round of every high-throughput dispatch.
        vd, vc = verdict_bytes(R, True), verdict_bytes(R, False)
        cap = CAPACITY_BYTES if a.mode == "ht" else 0
        want, want_ar, calls_ar = ops * (vd + vc), 8 * 2 * R + ops * cap, 1 + (ops if cap else 0)
        got = {cnt.get((q, "alltoall"), (0, 0, 0))[0] for q in range(R)}
        got_ar = {cnt.get((q, "allreduce"), (0, 0, 0))[:2] for q in range(R)}
        print(f"verdict alltoall: {vd} B per dispatch, {vc} B per combine: {want} B expected per rank, measured "
              f"{', '.join(str(x) for x in sorted(got))}; allreduce: {8 * 2 * R} B at creation + {cap} B per "
              f"dispatch: {want_ar} B in {calls_ar} call(s) expected per rank, measured "
              f"{', '.join(f'{b} B in {c}' for b, c in sorted(got_ar))}")
        if got != {want}:
            fails.append(f"alltoall bytes {sorted(got)}, expected {want}")
        if got_ar != {(want_ar, calls_ar)}:
            fails.append(f"allreduce (bytes, calls) {sorted(got_ar)}, expected {(want_ar, calls_ar)}")
        for st in ("rows", "other"):
            b = {cnt.get((q, st), (0, 0, 0))[0] for q in range(R)}
            if b != {0}:
                fails.append(f"step {st}: {sorted(b)} bytes, none expected")
        a2a = [cnt.get((q, "a2a"), (0, 0, 0)) for q in range(R)]
        cards = [cnt.get((q, "cards"), (0, 0, 0)) for q in range(R)]
        print(f"not MoE: the bench's own barriers and result gathers (epx_barrier, epx_alltoall): "
              f"{cards[0][1]} operations, cards {cards[0][0]} B and data {a2a[0][0]} B (rank 0)")

    tot = {st: [sum(ex[st][q]) for q in range(R)] for st in ("tokens", "home")}
    print("\nmax/mean over ranks (exact): " + ", ".join(
        f"{st} {max(v) / (sum(v) / R):.3f}" for st, v in tot.items() if sum(v)))
    means = {st: mo["rank"][st] / (sum(v) / R) for st, v in tot.items() if sum(v)}
    print("model / exact, mean over ranks: " + ", ".join(f"{st} {x:.4f}" for st, x in means.items()))
    for st, x in means.items():
        if asserted and abs(x - 1) > a.tol_mean:
            fails.append(f"{st}: model / exact of the mean over ranks = {x:.4f}")
    ch = ex["chain"]
    if sum(ch):
        print(f"previous chained combine, same routing (exact, not run): {sum(ch)} B over all ranks, max {max(ch)} per "
              f"rank; rows home: {sum(tot['home'])} B, max {max(tot['home'])} — rows home / chain = "
              f"{sum(tot['home']) / sum(ch):.3f} (total), {max(tot['home']) / max(ch):.3f} (busiest rank)")
    if not asserted:
        print("(model / exact not asserted: the closed form is for uniform routing, --skew 0)")
    for msg in fails[:20]:
        print("check: " + msg)
    print("check:", "FAILED" if fails else "passed" + ("" if cnt else " (model against exact only: no --counts)"))
    return 1 if fails else 0


# ---- Self-test (ctest) ------------------------------------------------------------------------------


def selftest():
    rng = random.Random(7)
    ok = True
    for (E_, K_, R, G_, M) in ((32, 4, 8, 2, None), (32, 4, 8, 2, 2), (24, 3, 6, 1, None), (48, 5, 12, 2, 3)):
        r = Routing(E_, K_, R, G_, M)
        N, Eh, L = r.N, r.Eh, r.L
        # brute force over tokens (tolerances below)
        n_hosts = n_ranks = n_home = 0.0
        sends = [0.0] * N
        draws = 40000
        for _ in range(draws):
            if r.M is None:
                e = rng.sample(range(E_), K_)
            else:
                hs = rng.sample(range(N), r.M)
                e = rng.sample([h * Eh + j for h in hs for j in range(Eh)], K_)
            home = rng.randrange(N)
            dh = sorted({x // Eh for x in e})
            n_hosts += len(dh)
            dr = {x // L for x in e}
            n_ranks += len(dr)
            n_home += sum(1 for q in dr if q // G_ != home)
            for i, hh in enumerate(dh):
                nxt = dh[i + 1] if i + 1 < len(dh) else home
                if nxt != hh:
                    sends[hh] += 1
        for name, got, want in (("hosts", n_hosts / draws, float(r.hosts())), ("ranks", n_ranks / draws, float(r.ranks())),
                                ("rows home", n_home / draws, float(r.home_rows()))):
            if abs(got - want) > 0.03 * want:
                ok = False
                print(f"selftest: {name} {E_},{K_},{R},{G_},{M}: sampled {got:.4f}, formula {want:.4f}")
        for g in range(N):
            want = float(r.chain_send(g)) / N * 1.0  # per token of one source, sources spread over N hosts
            got = sends[g] / draws
            if abs(got - want) > 0.03 * max(want, 0.1):
                ok = False
                print(f"selftest: chain send host {g} {E_},{K_},{R},{G_},{M}: sampled {got:.4f}, formula {want:.4f}")
    # exact byte count from a generated routing against the closed form (large T: close), per
    # rank and per host pair, and the pairs' sums against the ranks'
    for (R, G_, mode, dtype) in ((4, 2, "ht", "bf16"), (4, 2, "ll", "fp8"), (8, 2, "ht", "fp8"), (8, 4, "ll", "bf16")):
        T = 256
        topk = bench_routing(R, T, 8, 32, 0.0)
        ex = exact_flows(topk, R, G_, 256, 8, 32, dtype, mode)
        mo = model_flows(R, G_, T, 256, 8, 32, dtype, mode)
        N = R // G_
        for st in ("tokens", "home"):
            for q in range(R):
                e = sum(ex[st][q])
                if abs(e - mo["rank"][st]) > 0.05 * mo["rank"][st]:
                    ok = False
                    print(f"selftest: {mode} {dtype} {R}/{G_} {st} rank {q}: exact {e}, model {mo['rank'][st]:.0f}")
                if any(ex[st][q][d] for d in range(R) if d % G_ != q % G_ or d // G_ == q // G_):
                    ok = False
                    print(f"selftest: {mode} {R}/{G_} {st} rank {q} sends off its rail or inside its host")
            pairs = [sum(ex[st][s][d] for s in range(ha * G_, (ha + 1) * G_) for d in range(hb * G_, (hb + 1) * G_))
                     for ha in range(N) for hb in range(N) if ha != hb]
            if sum(pairs) != sum(sum(v) for v in ex[st]):
                ok = False
                print(f"selftest: {mode} {R}/{G_} {st}: host pairs do not add up to the ranks")
            for pb in pairs:
                if abs(pb - mo["pair"][st]) > 0.06 * mo["pair"][st]:
                    ok = False
                    print(f"selftest: {mode} {dtype} {R}/{G_} {st} host pair: exact {pb}, model {mo['pair'][st]:.0f}")
            if abs(mo["pair"][st] * N * (N - 1) - mo["rank"][st] * R) > 1e-6 * mo["rank"][st] * R:
                ok = False
                print(f"selftest: {mode} {R}/{G_} {st}: pair and rank closed forms disagree")
    print("selftest:", "passed" if ok else "FAILED")
    return 0 if ok else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="model", choices=("model", "check", "selftest"))
    ap.add_argument("--tokens", type=int, default=None, help="tokens per GPU (model: HT, default 4096)")
    ap.add_argument("--ll-tokens", type=int, default=128)
    ap.add_argument("--nic-gbs", type=float, default=46.0, help="usable NIC bandwidth per GPU, one way")
    ap.add_argument("--nvl-gbs", type=float, default=392.0, help="usable NVLink bandwidth per GPU, each way")
    ap.add_argument("--alpha-net-us", type=float, default=3.0, help="one network step (GPU-initiated put + flag)")
    ap.add_argument("--alpha-nvl-us", type=float, default=1.2, help="one NVLink step (flag release/acquire)")
    ap.add_argument("--skew-factor", type=float, default=1.0, help="busiest link / mean link")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--local", type=int, default=2, help="ranks per simulated host (EPX_LOCAL_SIZE)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp8"))
    ap.add_argument("--mode", default="ht", choices=("ht", "ll"))
    ap.add_argument("--skew", type=float, default=0.0, help="epx-bench --skew (Zipf exponent)")
    ap.add_argument("--counts", default=None, help="stderr of a run under tools/mpi_count.c")
    ap.add_argument("--tol", type=float, default=0.05,
                    help="check: largest |model / exact - 1| per rank and host pair (uniform routing; T=512 samples "
                         "spread it to about 3 %%)")
    ap.add_argument("--tol-mean", type=float, default=0.015,
                    help="check: largest |model / exact - 1| of the mean over ranks (uniform routing)")
    a = ap.parse_args()
    if a.what == "selftest":
        return selftest()
    if a.what == "check":
        a.tokens = a.tokens or 512
        return check(a)
    a.tokens = a.tokens or 4096
    report(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
