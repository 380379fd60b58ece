#!/usr/bin/env python3
"""scaling_model.py: the scale-out model of docs/SCALING.md (plain Python 3, no dependencies).

  python3 tools/scaling_model.py                 # every model table of docs/SCALING.md
  python3 tools/scaling_model.py check --ranks 4 --local 2 --tokens 512 --hidden 2048 \
      --topk 8 --experts 32 [--dtype bf16|fp8] [--mode ht|ll] [--skew S] [--counts FILE]
                                                 # bytes epx's MPI path sends for the routing
                                                 # of epx-bench, against the model and (with
                                                 # --counts) against tools/mpi_count.c's counts
  python3 tools/scaling_model.py selftest        # closed forms against brute force (ctest)

Model of epx's hierarchical scheme (src/hier/hier.h, src/hier/moe.c):
  dispatch  a token crosses to each destination host other than its own once, to the gateway
            (the GPU with the source's local index), with a routing record; the gateway fans
            it out over NVLink to the other GPUs of its host that need it;
  combine   receivers send their rows back to the gateways over NVLink; then a float32
            partial sum is *chained* through the token's destination hosts in ascending order
            (bit-identical to the single-host sum) and ends at the home GPU: one float32 row
            per hop, hops = n - [home host is the last destination host].
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

    def p_max(self, g):  # P(host g is the highest destination host)
        return self.q(self.N - 1 - g) - self.q(self.N - g)

    def p_min(self, g):  # P(host g is the lowest destination host)
        return self.q(g) - self.q(g + 1)

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


def params(a):
    return dict(nic=a.nic_gbs * 1e9, nvl=a.nvl_gbs * 1e9, a_net=a.alpha_net_us * 1e-6, a_nvl=a.alpha_nvl_us * 1e-6,
                skew=a.skew_factor)


def ht(r, T, dtype, p, meta=True):
    """High-throughput dispatch + combine per GPU for routing r: bytes and time floors."""
    rec = ROW[dtype] + (4 * (2 + 2 * K) if meta else 0)  # row + routing record (src, token, top-k, weights)
    d_nic = float(T * r.cross()) * rec
    d_nvl = float(T * r.nvl_rows()) * ROW[dtype]
    d_log = float(T * r.hosts()) * ROW[dtype]  # DeepEP's "RDMA" bytes: tokens x hosts (own host included)
    d_t = p["skew"] * max(d_nic / p["nic"], d_nvl / p["nvl"]) + (2 * p["a_net"] if r.N > 1 else 0) + p["a_nvl"]
    d_bound = "NIC" if d_nic / p["nic"] >= d_nvl / p["nvl"] else "NVLink"
    c_nvl = float(T * r.nvl_rows()) * 2 * H
    c_chain = float(T * r.chain_bottleneck()) * 4 * H  # float32 partial sums, busiest host
    c_bf16 = float(T * r.cross()) * 2 * H  # alternative: one bf16 host partial per (token, host)
    depth = min(r.N, K, r.M or r.N) + 1 if r.N > 1 else 0
    c_t = p["skew"] * max(c_chain / p["nic"], c_nvl / p["nvl"]) + depth * p["a_net"] + p["a_nvl"]
    c_t_bf16 = p["skew"] * max(c_bf16 / p["nic"], c_nvl / p["nvl"]) + (p["a_net"] if r.N > 1 else 0) + p["a_nvl"]
    c_log = float(T * r.hosts()) * 2 * H
    # alternative, bit-exact: every remote rank's bf16 row goes home unreduced (through the
    # gateways, rail-aligned) and home sums in ascending rank order
    c_home = float(T * r.ranks() * Fraction(r.N - 1, r.N)) * 2 * H
    c_t_home = p["skew"] * max(c_home / p["nic"], c_nvl / p["nvl"]) + (p["a_net"] if r.N > 1 else 0) + p["a_nvl"]
    return dict(d_nic=d_nic, d_nvl=d_nvl, d_log=d_log, d_t=d_t, d_bound=d_bound, c_nvl=c_nvl, c_chain=c_chain,
                c_bf16=c_bf16, c_t=c_t, c_t_bf16=c_t_bf16, c_log=c_log, c_home=c_home, c_t_home=c_t_home)


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


def report(a):
    p = params(a)
    T, Tl = a.tokens, a.ll_tokens
    print(f"# epx scale-out model: H={H}, K={K} of E={E}, {G} GPUs per host, T={T} (HT) / {Tl} (LL) tokens per GPU")
    print(f"# NIC {a.nic_gbs:g} GB/s per GPU, NVLink {a.nvl_gbs:g} GB/s per GPU, alpha_net {a.alpha_net_us:g} us, "
          f"alpha_nvl {a.alpha_nvl_us:g} us, skew factor {a.skew_factor:g}; MB = 1e6 bytes, GB/s = 1e9 bytes/s\n")

    print("## Table 1: destination hosts and ranks per token\n")
    rows = []
    for ep in EPS:
        u, l = Routing(E, K, ep, G), Routing(E, K, ep, G, 4)
        rows.append([ep, u.N, f(u.hosts()), f(l.hosts()), f(u.cross()), f(l.cross()), f(u.ranks()), f(l.ranks()),
                     f(u.chain_hops()), f(l.chain_hops()), f(u.ll_runs()), f(l.ll_runs())])
    print(md(["EP", "hosts", "E[n] unif", "E[n] 4-node", "crossings unif", "crossings 4-node", "ranks unif",
              "ranks 4-node", "chain hops unif", "chain hops 4-node", "LL runs unif", "LL runs 4-node"], rows))

    for dtype in ("fp8", "bf16"):
        print(f"\n## Table 2{'a' if dtype == 'fp8' else 'b'}: high-throughput dispatch, {dtype.upper()}, per GPU per layer\n")
        rows = []
        for ep in EPS:
            for name, r in (("unif", Routing(E, K, ep, G)), ("4-node", Routing(E, K, ep, G, 4))):
                if name == "4-node" and r.M is None:
                    continue
                m = ht(r, T, dtype, p)
                rows.append([ep, name, mb(m["d_nic"]), mb(m["d_nvl"]), us(m["d_t"]), m["d_bound"],
                             f(m["d_log"] / m["d_t"] / 1e9, 1)])
        print(md(["EP", "routing", "NIC MB", "NVLink MB", "floor µs", "bound", "DeepEP-convention GB/s"], rows))

    print("\n## Table 3: high-throughput combine, BF16 rows, per GPU per layer\n")
    rows = []
    for ep in EPS:
        for name, r in (("unif", Routing(E, K, ep, G)), ("4-node", Routing(E, K, ep, G, 4))):
            if name == "4-node" and r.M is None:
                continue
            m = ht(r, T, "bf16", p)
            rows.append([ep, name, mb(m["c_nvl"]), mb(m["c_chain"]), us(m["c_t"]), f(m["c_log"] / m["c_t"] / 1e9, 1),
                         mb(m["c_home"]), us(m["c_t_home"]), f(m["c_log"] / m["c_t_home"] / 1e9, 1),
                         mb(m["c_bf16"]), us(m["c_t_bf16"]), f(m["c_log"] / m["c_t_bf16"] / 1e9, 1)])
    print(md(["EP", "routing", "NVLink MB", "chain NIC MB (busiest)", "chain µs", "chain GB/s", "rows-home NIC MB",
              "rows-home µs", "rows-home GB/s", "bf16-partial NIC MB", "bf16-partial µs", "bf16-partial GB/s"], rows))

    print("\n## Table 4: one MoE layer (FP8 dispatch + BF16 combine), forward\n")
    rows = []
    for ep in EPS:
        row = [ep]
        for r in (Routing(E, K, ep, G), Routing(E, K, ep, G, 4)):
            m = ht(r, T, "fp8", p)
            mc = ht(r, T, "bf16", p)
            row += [us(m["d_t"] + mc["c_t"]), us(m["d_t"] + mc["c_t_home"]), us(m["d_t"] + mc["c_t_bf16"])]
        rows.append(row)
    print(md(["EP", "unif: chain µs", "unif: rows-home µs", "unif: bf16-partial µs", "4-node: chain µs",
              "4-node: rows-home µs", "4-node: bf16-partial µs"], rows))

    print("\n## Table 5: skew — the busiest link carries s × the mean (EP64, 4-node, FP8 dispatch + chain combine)\n")
    rows = []
    for s in (1.0, 1.25, 1.5, 2.0):
        q = dict(p, skew=s)
        r = Routing(E, K, 64, G, 4)
        m, mc = ht(r, T, "fp8", q), ht(r, T, "bf16", q)
        rows.append([f(s), us(m["d_t"]), us(mc["c_t"]), us(m["d_t"] + mc["c_t"]), f(m["d_log"] / m["d_t"] / 1e9, 1)])
    print(md(["s", "dispatch µs", "combine µs", "layer µs", "dispatch DeepEP-convention GB/s"], rows))

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
        mc = ht(r, 4096, "bf16", q, meta=False)
        row += [f(mc["c_log"] / mc["c_t"] / 1e9, 1), f(mc["c_log"] / mc["c_t_home"] / 1e9, 1)]
        rows.append(row)
    print(md(["EP", "E[n] (DeepEP test routing)", "model dispatch, NVLink 153", "model combine (bf16 partial), NVLink 153",
              f"model dispatch, NVLink {a.nvl_gbs:g}", f"model combine (bf16 partial), NVLink {a.nvl_gbs:g}",
              "DeepEP V1 H800 dispatch / combine", "DeepEP V2 SM90 dispatch / combine", "epx chain combine",
              "rows-home combine"], rows))
    print("\nNIC-bound limit of the convention: NIC × N/(N−1) = "
          + ", ".join(f"EP{n * G}: {a.nic_gbs * n / (n - 1):.1f} GB/s" for n in (2, 4, 8)))

    ll_pub = {8: (77, 114), 16: (118, 195), 32: (155, 273), 64: (173, 314), 128: (192, 369), 256: (194, 360)}
    print("\n## Table 7: low latency, T=%d per GPU: FP8 dispatch, BF16 combine, per GPU\n" % Tl)
    rows = []
    for ep in EPS:
        for name, r in (("unif", Routing(E, K, ep, G)), ("4-node", Routing(E, K, ep, G, 4))):
            if name == "4-node" and r.M is None:
                continue
            N = r.N
            off = Fraction(N - 1, N)
            # direct (DeepEP low-latency style): one message per (token, expert); off-host over the NIC
            dd = float(Tl * K * off) * ROW_LL_DEEPEP_FP8
            dd_nvl = float(Tl * K * (Fraction(1, N) - Fraction(1, ep))) * ROW_LL_DEEPEP_FP8
            dd_t = max(dd / p["nic"], dd_nvl / p["nvl"]) + (p["a_net"] if N > 1 else p["a_nvl"])
            dc = float(Tl * K * off) * 2 * H
            dc_t = max(dc / p["nic"], float(Tl * K * (Fraction(1, N) - Fraction(1, ep))) * 2 * H / p["nvl"]) + \
                (p["a_net"] if N > 1 else p["a_nvl"])
            # epx hierarchical: one row per (token, other host) + routing record; fan-out over NVLink
            hd = float(Tl * r.cross()) * (ROW["fp8"] + 4 * (2 + K))
            hd_nvl = float(Tl * r.nvl_rows()) * ROW["fp8"]
            hd_t = hd / p["nic"] + hd_nvl / p["nvl"] + (p["a_net"] if N > 1 else 0) + p["a_nvl"]
            # epx chain combine (k order, float32) and the bf16-partial alternative
            hc = float(Tl * r.ll_hops()) * 4 * H + float(Tl * r.cross()) * 4 * K
            hc_nvl = float(Tl * K * Fraction(ep - N, ep)) * 2 * H
            hc_t = hc / p["nic"] + hc_nvl / p["nvl"] + (K + 1 if N > 1 else 0) * p["a_net"] + p["a_nvl"]
            hb = float(Tl * r.cross()) * 2 * H
            hb_t = hb / p["nic"] + hc_nvl / p["nvl"] + (p["a_net"] if N > 1 else 0) + p["a_nvl"]
            pub = ll_pub.get(ep) if name == "unif" else None
            rows.append([ep, name, f"{dd / 1e6:.2f}", us(dd_t), f"{hd / 1e6:.2f}", us(hd_t), f"{dc / 1e6:.2f}", us(dc_t),
                         f"{hc / 1e6:.2f}", us(hc_t), f"{hb / 1e6:.2f}", us(hb_t),
                         f"{pub[0]} / {pub[1]}" if pub else "-"])
    print(md(["EP", "routing", "direct disp. NIC MB", "µs", "hier disp. NIC MB", "µs",
              "direct = rows-home comb. NIC MB", "µs", "chain comb. NIC MB", "µs", "bf16-partial comb. NIC MB", "µs",
              "DeepEP V1 LL µs disp. / comb."], rows))


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


def exact_bytes(topk, R, G, H_, K_, E_, dtype, mode):
    """What src/hier/moe.c hands to MPI per rank in one dispatch and one combine."""
    L = E_ // R
    host = lambda q: q // G  # noqa: E731
    gw = lambda p, k: k * G + (p % G)  # noqa: E731
    S = SCALE(H_)
    if mode == "ht":
        row = H_ + 4 * S if dtype == "fp8" else 2 * H_
        meta = 4 * (2 + 2 * K_)  # the bench passes weights to dispatch
    else:
        row = H_ + 4 * S if dtype == "fp8" else 2 * H_
        meta = 4 * (2 + K_)
    out = {k: [0] * R for k in ("rows", "meta", "weights", "chain")}
    for s in range(R):
        for t, e in enumerate(topk[s]):
            dh = sorted({host(x // L) for x in e})
            for k in dh:
                if k != host(s):
                    out["rows"][s] += row
                    out["meta"][s] += meta
                    if mode == "ll":
                        out["weights"][s] += 4 * K_
            if mode == "ht":
                runs = dh  # ranks ascending -> hosts ascending (hosts are blocks of ranks)
            else:
                runs = []
                for x in e:  # ascending k
                    h = host(x // L)
                    if not runs or runs[-1] != h:
                        runs.append(h)
            holders = [gw(s, k) for k in runs] + [s]
            for a_, b_ in zip(holders, holders[1:]):
                if a_ != b_:
                    out["chain"][a_] += 4 * H_
    return out


def model_bytes(R, G, T, H_, K_, E_, dtype, mode):
    r = Routing(E_, K_, R, G)
    S = SCALE(H_)
    row = H_ + 4 * S if dtype == "fp8" else 2 * H_
    meta = 4 * (2 + 2 * K_) if mode == "ht" else 4 * (2 + K_)
    out = {k: [0.0] * R for k in ("rows", "meta", "weights", "chain")}
    for q in range(R):
        g = q // G
        out["rows"][q] = float(T * r.cross()) * row
        out["meta"][q] = float(T * r.cross()) * meta
        out["weights"][q] = float(T * r.cross()) * 4 * K_ if mode == "ll" else 0.0
        out["chain"][q] = float(T * (r.chain_send(g) if mode == "ht" else r.ll_hops())) * 4 * H_
    return out


def read_counts(path):
    c = {}
    with open(path) as fh:
        for line in fh:
            if not line.startswith("mpicount "):
                continue
            kv = dict(x.split("=") for x in line.split()[1:])
            c[(int(kv["rank"]), kv["step"])] = (int(kv["bytes"]), int(kv["ops"]))
    return c


def check(a):
    R, G, T = a.ranks, a.local, a.tokens
    topk = bench_routing(R, T, a.topk, a.experts, a.skew)
    ex = exact_bytes(topk, R, G, a.hidden, a.topk, a.experts, a.dtype, a.mode)
    mo = model_bytes(R, G, T, a.hidden, a.topk, a.experts, a.dtype, a.mode)
    cnt = read_counts(a.counts) if a.counts else None
    print(f"# check: {R} ranks as {R // G} hosts of {G}, T={T} H={a.hidden} K={a.topk} E={a.experts}, {a.mode} {a.dtype}, "
          f"skew {a.skew:g}; bytes per rank per operation, sent through MPI\n")
    hdr = ["step", "rank", "model (closed form)", "exact (bench routing)", "model / exact"]
    if cnt:
        hdr += ["measured (PMPI) / op", "ops", "measured / exact"]
    rows = []
    steps = ("rows", "meta", "chain") if a.mode == "ht" else ("rows", "meta", "weights", "chain")
    for st in steps:
        for q in range(R):
            e, m = ex[st][q], mo[st][q]
            row = [st, q, f"{m:.0f}", e, f"{m / e:.4f}" if e else "-"]
            if cnt:
                ops_key = "rows" if st in ("rows", "meta") else st
                if st == "weights":
                    ops_key = "weights"
                b, _ = cnt.get((q, st), (0, 0))
                ops = cnt.get((q, ops_key), (0, 0))[1]
                per = b / ops if ops else 0
                row += [f"{per:.1f}", ops, f"{per / e:.6f}" if e else "-"]
            rows.append(row)
    print(md(hdr, rows))
    tot = {st: sum(ex[st]) for st in steps}
    print("\nmax/mean over ranks (exact): " + ", ".join(
        f"{st} {max(ex[st]) / (tot[st] / R):.3f}" for st in steps if tot[st]))


# ---- Self-test (ctest) ------------------------------------------------------------------------------


def selftest():
    rng = random.Random(7)
    ok = True
    for (E_, K_, R, G_, M) in ((32, 4, 8, 2, None), (32, 4, 8, 2, 2), (24, 3, 6, 1, None), (48, 5, 12, 2, 3)):
        r = Routing(E_, K_, R, G_, M)
        N, Eh, L = r.N, r.Eh, r.L
        # brute force over tokens (sampling is exact enough at 200k draws; tolerances below)
        n_hosts = n_ranks = 0.0
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
            n_ranks += len({x // L for x in e})
            for i, hh in enumerate(dh):
                nxt = dh[i + 1] if i + 1 < len(dh) else home
                if nxt != hh:
                    sends[hh] += 1
        for name, got, want in (("hosts", n_hosts / draws, float(r.hosts())), ("ranks", n_ranks / draws, float(r.ranks()))):
            if abs(got - want) > 0.03 * want:
                ok = False
                print(f"selftest: {name} {E_},{K_},{R},{G_},{M}: sampled {got:.4f}, formula {want:.4f}")
        for g in range(N):
            want = float(r.chain_send(g)) / N * 1.0  # per token of one source, sources spread over N hosts
            got = sends[g] / draws
            if abs(got - want) > 0.03 * max(want, 0.1):
                ok = False
                print(f"selftest: chain send host {g} {E_},{K_},{R},{G_},{M}: sampled {got:.4f}, formula {want:.4f}")
    # exact byte count from a generated routing against the closed form (large T: close)
    R, G_, T = 4, 2, 256
    topk = bench_routing(R, T, 8, 32, 0.0)
    ex = exact_bytes(topk, R, G_, 256, 8, 32, "bf16", "ht")
    mo = model_bytes(R, G_, T, 256, 8, 32, "bf16", "ht")
    for st in ("rows", "chain"):
        for q in range(R):
            if abs(ex[st][q] - mo[st][q]) > 0.05 * mo[st][q]:
                ok = False
                print(f"selftest: {st} rank {q}: exact {ex[st][q]}, model {mo[st][q]:.0f}")
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
    a = ap.parse_args()
    if a.what == "selftest":
        return selftest()
    if a.what == "check":
        a.tokens = a.tokens or 512
        check(a)
        return 0
    a.tokens = a.tokens or 4096
    report(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
