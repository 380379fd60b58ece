#!/usr/bin/env python3
"""Write the seed corpora in corpus/<target>/ (run from anywhere; overwrites seed-* files).

Each seed spells a case in the byte order its target reads (see the targets' sources);
bytes past a seed's end read as zeros there.
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def pick(v, lo):  # pick(): a byte < 7 mod 8, then the offset from lo as u16
    return bytes([0]) + struct.pack("<H", v - lo)


def moe(size=0, hidden=128, M=8, E=8, maxk=4, dtype=4, combine=None, idt=2, mode=0, align=1, fp8=0, sfmt=0,
        T=6, K=2, entries=()):
    b = bytes([size]) + pick(hidden, 1) + pick(M, 0) + pick(E, 1) + pick(maxk, 0) + pick(dtype, 3)
    b += bytes([1]) if combine is None else bytes([0]) + pick(combine, 3)
    b += pick(idt, 1) + pick(mode, 0) + pick(align, 1)
    b += bytes([1]) + pick(fp8, 0) if fp8 else bytes([0])
    b += pick(sfmt, 0) + pick(-1, -1)
    b += pick(T, 0) + pick(K, 0) + bytes([0, 0])  # T, K, topk_idx buffer, clean entries
    for e in entries:
        b += bytes([4]) if e < 0 else bytes([0]) + struct.pack("<H", e)
    return b


def layout(R, L, T, K, i32, null_mask, entries):
    b = struct.pack("<HHHH", R - 1, L - 1, T, K - 1) + bytes([i32, null_mask])
    for e in entries:
        b += bytes([0]) if e == -1 else bytes([5]) + struct.pack("<H", e)
    return b


def uid_bytes(family, port, addr, nonce):
    return bytes([0]) + struct.pack("<IHBB", 0x31585045, port, family, 0) + addr.ljust(16, b"\0") + struct.pack("<Q", nonce)


SEEDS = {
    "fuzz_moe_args": {
        "ht-bf16": moe(entries=[0, 3, -1, 5, 7, 7, -1, -1, 1, 2, 6, 4]),
        "ht-fp8-i32-align4": moe(hidden=200, dtype=6, idt=1, align=4, entries=[1, 2, 3, -1, 0, 0, 7, 6, 5, 4, -1, 2]),
        "ht-f32-out-f16": moe(hidden=77, dtype=5, combine=3, T=4, K=3, entries=list(range(12))),
        "ht-t0": moe(T=0),
        "ll-bf16": moe(mode=1, entries=[0, 1, 2, 3, 4, 5, 6, 7, -1, 0, 1, 1]),
        "ll-fp8-ue8m0": moe(hidden=300, mode=1, fp8=1, sfmt=1, entries=[7, 6, 5, 4, 3, 2, 1, 0, 0, 0, -1, -1]),
        "bad-size": bytes([11]),
        "bad-ll-fp8-dtype": moe(dtype=5, mode=1, fp8=1),
    },
    "fuzz_layout": {
        "r1": layout(1, 4, 3, 2, 0, 0, [0, 1, 3, -1, 2, 2]),
        "r4-dups": layout(4, 2, 4, 3, 1, 0, [0, 0, 1, 7, 6, -1, 2, 3, 4, -1, -1, -1]),
        "r8-null-outs": layout(8, 3, 2, 4, 0, 5, [23, 0, 12, 12, 1, 2, 3, 4]),
        "bad-entry": layout(2, 2, 2, 2, 1, 0, [0, 1, 3]) + bytes([0x13]),
    },
    "fuzz_unique_id": {
        "v4": b"\x01epx1:127.0.0.1:40000:0123456789abcdef",
        "v6": b"\x01epx1:[::1]:1:FFFFFFFFFFFFFFFF",
        "v6-mapped": b"\x01epx1:[::ffff:10.0.0.1]:65535:0000000000000000",
        "leading-zeros": b"\x01epx1:010.1.2.3:00080:00000000000000aa",
        "bytes-v4": uid_bytes(4, 29500, bytes([192, 168, 0, 1]), 0x1122334455667788),
        "bytes-v6": uid_bytes(6, 1, bytes(15) + b"\x01", 1),
    },
}

for target, seeds in SEEDS.items():
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(d, "seed-" + name), "wb") as f:
            f.write(data)
