"""Python CPU tests (numpy, several processes): run with pytest, or as a plain script.

Each case launches cpu_worker.py as N ranks through the repository's launcher (build/bin/epx-run,
or $EPX_RUN), and one case bootstraps two ranks from a unique id through multiprocessing."""
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
PKG = os.path.dirname(HERE)
sys.path.insert(0, PKG)


def _launcher():
    cand = os.environ.get("EPX_RUN") or os.path.join(os.path.dirname(PKG), os.environ.get("EPX_BUILD_DIR", "build"),
                                                     "bin", "epx-run")
    return cand if os.path.exists(cand) else None


def _rank_main(nranks, rank, uid, q):
    sys.path.insert(0, PKG)
    import numpy as np
    import epx
    try:
        with epx.Comm(nranks, rank, uid, backend="cpu") as c:
            got = c.alltoall(np.arange(nranks * 3, dtype=np.int64) + 100 * rank)
            want = np.concatenate([np.arange(rank * 3, rank * 3 + 3) + 100 * p for p in range(nranks)])
            q.put((rank, bool((got == want).all()), ""))
    except Exception as e:  # noqa: BLE001
        q.put((rank, False, repr(e)))


# A stand-in for torch, for Comm.from_torch and deep_ep.Buffer(group) without torch: each process is
# rank $FAKE_TORCH_RANK of $FAKE_TORCH_SIZE; CUDA is available only where $FAKE_TORCH_NO_DEVICE is
# set, and torch.cuda.current_device() raises on the rank it names; the group's backend is
# $FAKE_TORCH_BACKEND (default gloo; nccl: all_gather_object asks for the current device first, as
# torch's moves the objects through it); all_gather_object goes through files in $FAKE_TORCH_DIR and
# gives up after $FAKE_TORCH_TIMEOUT seconds (torch's own timeout is minutes)
_FAKE_TORCH = {
    "torch/__init__.py": (
        "import os\n"
        "import types\n"
        "from . import distributed\n"
        "class Tensor:  # nothing here is one\n"
        "    pass\n"
        "class dtype:\n"
        "    pass\n"
        "def _current_device():\n"
        "    if os.environ.get('FAKE_TORCH_NO_DEVICE') == os.environ['FAKE_TORCH_RANK']:\n"
        "        raise RuntimeError('CUDA error: no CUDA-capable device is detected')\n"
        "    return 0\n"
        "cuda = types.SimpleNamespace(is_available=lambda: 'FAKE_TORCH_NO_DEVICE' in os.environ,\n"
        "                             current_device=_current_device)\n"),
    "torch/distributed/__init__.py": (
        "import os, pickle, time, types\n"
        "group = types.SimpleNamespace(WORLD='world')\n"
        "_calls = [0]\n"
        "def get_rank(group=None):\n"
        "    return int(os.environ['FAKE_TORCH_RANK'])\n"
        "def get_world_size(group=None):\n"
        "    return int(os.environ['FAKE_TORCH_SIZE'])\n"
        "def get_backend(group=None):\n"
        "    return os.environ.get('FAKE_TORCH_BACKEND', 'gloo')\n"
        "def all_gather_object(object_list, obj, group=None):\n"
        "    if get_backend() == 'nccl':  # torch moves the objects through the current device\n"
        "        import torch\n"
        "        try:\n"
        "            torch.cuda.current_device()\n"
        "        except RuntimeError as e:\n"
        "            raise RuntimeError('fake torch: all_gather_object over nccl: %s' % e)\n"
        "    # call n: this rank writes file n.rank whole (a rename), then reads every rank's\n"
        "    d, n, me = os.environ['FAKE_TORCH_DIR'], _calls[0], get_rank()\n"
        "    _calls[0] += 1\n"
        "    with open(os.path.join(d, '%d.%d.tmp' % (n, me)), 'wb') as f:\n"
        "        pickle.dump(obj, f)\n"
        "    os.rename(os.path.join(d, '%d.%d.tmp' % (n, me)), os.path.join(d, '%d.%d' % (n, me)))\n"
        "    deadline = time.monotonic() + float(os.environ.get('FAKE_TORCH_TIMEOUT', '60'))\n"
        "    for r in range(len(object_list)):\n"
        "        path = os.path.join(d, '%d.%d' % (n, r))\n"
        "        while not os.path.exists(path):\n"
        "            if time.monotonic() > deadline:\n"
        "                raise RuntimeError('fake torch: all_gather_object %d: rank %d never came' % (n, r))\n"
        "            time.sleep(0.005)\n"
        "        with open(path, 'rb') as f:\n"
        "            object_list[r] = pickle.load(f)\n"),
}


_MAKERS = {"Comm.from_torch": "lambda: epx.Comm.from_torch(timeout_ms=8000)",
           "deep_ep.Buffer": "lambda: deep_ep.Buffer(dist.group.WORLD, timeout_ms=8000)"}


def _raise_code(setup, handlers, makers=tuple(_MAKERS)):
    """A script for _fake_torch_ranks: after `setup`, each of `makers` (names in _MAKERS) must raise within
    5 s of a common start (the timeout a hang would meet is 8 s), into `handlers` (except clauses that
    check the exception); then it prints "rank R ok"."""
    return ("import os, time, epx, torch.distributed as dist\n"
            "from epx import deep_ep\n"
            "r, R = dist.get_rank(), dist.get_world_size()\n" + setup +
            "for what, make in ((%s)):\n" % "".join("(%r, %s), " % (m, _MAKERS[m]) for m in makers) +
            "    dist.all_gather_object([None] * R, None)  # every rank here: the clocks start together\n"
            "    t0 = time.monotonic()\n"
            "    try:\n"
            "        make()\n"
            "        raise SystemExit('rank %d: %s did not raise' % (r, what))\n" + handlers +
            "    assert time.monotonic() - t0 < 5, (what, time.monotonic() - t0)\n"
            "print('rank %d ok' % r)\n")


class CpuTests(unittest.TestCase):
    def _run(self, n):
        run = _launcher()
        if run is None:
            self.skipTest("epx-run not built (cmake --build build)")
        env = dict(os.environ, PYTHONPATH=PKG + os.pathsep + os.environ.get("PYTHONPATH", ""))
        p = subprocess.run([run, "-n", str(n), "--timeout", "120", "--", sys.executable,
                            os.path.join(HERE, "cpu_worker.py")], env=env, capture_output=True, text=True, timeout=180)
        self.assertEqual(p.returncode, 0, "ranks failed:\n" + p.stdout[-4000:] + p.stderr[-8000:])
        self.assertEqual(p.stdout.count("checks passed"), n, p.stdout)

    def test_np1(self):
        self._run(1)

    def test_np2(self):
        self._run(2)

    def test_np3(self):
        self._run(3)

    def test_np4(self):
        self._run(4)

    def test_unique_id_bootstrap(self):
        import epx
        uid = epx.get_unique_id()
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        procs = [ctx.Process(target=_rank_main, args=(2, r, uid, q)) for r in range(2)]
        for p in procs:
            p.start()
        res = sorted(q.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(30)
        self.assertEqual([r[:2] for r in res], [(0, True), (1, True)], res)

    def _fake_torch_ranks(self, n, code, env=lambda r: {}, wait=20):
        # `code` run by n processes under the fake torch (first on their PYTHONPATH) without a launcher,
        # each with env(rank) added to its environment; each must exit 0 and print "rank R ok" within
        # `wait` seconds of the start (a rank still running then is killed and fails the test)
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in _FAKE_TORCH.items():
                os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
                with open(os.path.join(tmp, name), "w") as f:
                    f.write(text)
            os.mkdir(os.path.join(tmp, "exchange"))
            path = os.pathsep.join([tmp, PKG] + [p for p in [os.environ.get("PYTHONPATH")] if p])
            procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=dict(os.environ, PYTHONPATH=path, FAKE_TORCH_RANK=str(r),
                                                          FAKE_TORCH_SIZE=str(n), FAKE_TORCH_DIR=os.path.join(
                                                              tmp, "exchange"), **env(r)))
                     for r in range(n)]
            deadline, report, ok = time.monotonic() + wait, "", 0
            for r, p in enumerate(procs):
                try:
                    out, err = p.communicate(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    p.kill()
                    out, err = p.communicate()
                    err += "\n(still running after %d s: killed)" % wait
                ok += p.returncode == 0 and "rank %d ok" % r in out
                report += "--- rank %d (exit %s)\n%s%s\n" % (r, p.returncode, out[-1000:], err[-2000:])
            self.assertEqual(ok, n, report)

    def test_from_torch_unique_id_fails(self):
        # rank 0's get_unique_id fails (here: its bootstrap cannot listen, on an interface that does not
        # exist): Comm.from_torch and deep_ep.Buffer(group) raise that error on rank 0 and, at once,
        # RemoteInvalidError with rank 0's message on the others (before, rank 0 raised before torch's
        # all_gather_object and the others waited in it until torch's timeout)
        code = _raise_code("", (
            "    except epx.SystemCallError as e:\n"
            "        assert r == 0 and 'EPX_SOCKET_IFNAME=nope0' in e.message, (what, e)\n"
            "    except epx.RemoteInvalidError as e:\n"
            "        want = \"rank 0 could not make the communicator's id (EPX_ERR_SYSTEM: EPX_SOCKET_IFNAME=\"\n"
            "        assert r != 0 and e.message.startswith(want + 'nope0'), (what, e)\n"))
        for n in (2, 3):
            with self.subTest(nranks=n):
                self._fake_torch_ranks(n, code, lambda r: {"EPX_SOCKET_IFNAME": "nope0"} if r == 0 else {})

    def test_from_torch_device_fails(self):
        # torch.cuda.current_device() raises on the last rank only, where deep_ep.Buffer(group) asks for
        # it (CUDA in torch and libepx) before a gloo group's exchange: that rank raises it, the others
        # RemoteInvalidError naming it, at once
        code = _raise_code("deep_ep.buffer.cuda_built = lambda: True  # whether or not this libepx has CUDA\n", (
            "    except epx.RemoteInvalidError as e:\n"
            "        want = 'rank %d could not get its current CUDA device (RuntimeError: CUDA error: ' % (R - 1)\n"
            "        assert r != R - 1 and e.message == want + 'no CUDA-capable device is detected)', (what, e)\n"
            "    except RuntimeError as e:\n"
            "        assert r == R - 1 and 'no CUDA-capable device' in str(e), (what, e)\n"), ("deep_ep.Buffer",))
        for n in (2, 3):
            with self.subTest(nranks=n):
                self._fake_torch_ranks(n, code, lambda r: {"FAKE_TORCH_NO_DEVICE": str(n - 1)})

    def test_from_torch_nccl_no_device(self):
        # over an NCCL group torch moves the exchange's objects through the device, so a rank whose
        # torch.cuda.current_device() fails cannot take part: it raises its own error (not the exchange's)
        # and the others meet the group's timeout (1 s in the fake)
        code = ("import epx, torch.distributed as dist\n"
                "r, R = dist.get_rank(), dist.get_world_size()\n"
                "try:\n"
                "    epx.Comm.from_torch(timeout_ms=8000)\n"
                "    raise SystemExit('rank %d: from_torch did not raise' % r)\n"
                "except RuntimeError as e:\n"
                "    assert str(e).startswith('CUDA error') if r == R - 1 else 'never came' in str(e), e\n"
                "print('rank %d ok' % r)\n")
        self._fake_torch_ranks(2, code, lambda r: {"FAKE_TORCH_NO_DEVICE": "1", "FAKE_TORCH_BACKEND": "nccl",
                                                   "FAKE_TORCH_TIMEOUT": "1"})

    def test_from_torch_fake_group(self):
        # the normal path, over the fake torch: Comm.from_torch and deep_ep.Buffer(group) make a CPU
        # communicator of the group's ranks, which moves data
        code = ("import numpy as np, epx, torch.distributed as dist\n"
                "from epx import deep_ep\n"
                "r, R = dist.get_rank(), dist.get_world_size()\n"
                "with epx.Comm.from_torch(timeout_ms=15000) as c:\n"
                "    assert (c.rank, c.size, c.backend) == (r, R, 'cpu'), (c.rank, c.size, c.backend)\n"
                "    got = c.alltoall(np.arange(R * 3, dtype=np.int64) + 100 * r)\n"
                "    want = np.concatenate([np.arange(r * 3, r * 3 + 3) + 100 * p for p in range(R)])\n"
                "    assert (got == want).all(), got\n"
                "b = deep_ep.Buffer(dist.group.WORLD, timeout_ms=15000)\n"
                "assert (b.rank, b.group_size, b.comm.backend) == (r, R, 'cpu')\n"
                "assert (b.comm.alltoall(np.full(R, r, np.int32)) == np.arange(R)).all()\n"
                "b.destroy()\n"
                "print('rank %d ok' % r)\n")
        for n in (1, 2, 3):
            with self.subTest(nranks=n):
                self._fake_torch_ranks(n, code)

    def test_library_errors(self):
        import epx
        with self.assertRaises(epx.InvalidArgumentError) as cm:
            epx.Comm(2, 5, epx.get_unique_id())
        self.assertEqual(cm.exception.status, -1)
        self.assertTrue(cm.exception.message)
        with self.assertRaises(epx.InvalidArgumentError):
            epx.Comm(1, 0, "not-an-id")

    def test_errors_pickle(self):
        # exceptions cross process boundaries (multiprocessing, concurrent.futures) by pickling
        import pickle
        import epx
        for st in range(-14, 0):
            e = epx._errors.error(st, "detail")
            e2 = pickle.loads(pickle.dumps(e))
            self.assertIs(type(e2), type(e))
            self.assertEqual((e2.status, e2.message, str(e2), e2.recoverable), (e.status, "detail", str(e), e.recoverable))

    def test_config_device(self):
        # a torch.device without an index ("cuda") means the current device, not device 0
        import epx
        from epx import _comm, _lib

        class Dev:
            def __init__(self, index):
                self.type, self.index = "cuda", index
        self.assertEqual(_comm._config(None, Dev(None), None).device, _lib.EPX_UNSET)
        self.assertEqual(_comm._config(None, Dev(3), None).device, 3)
        self.assertEqual(_comm._config(None, 2, None).device, 2)
        for kw in ({"timeout_ms": 2**32 + 5}, {"device": -2**31 - 1}, {"backend": 2**40}):  # ctypes would wrap them
            with self.assertRaises(epx.InvalidArgumentError, msg=str(kw)):
                _comm._config(kw.get("backend"), kw.get("device"), kw.get("timeout_ms"))

    def _ranks(self, n, code):
        # `code` run by n ranks under epx-run: each must exit 0 and print "rank R ok"
        run = _launcher()
        if run is None:
            self.skipTest("epx-run not built (cmake --build build)")
        env = dict(os.environ, PYTHONPATH=PKG + os.pathsep + os.environ.get("PYTHONPATH", ""))
        p = subprocess.run([run, "-n", str(n), "--timeout", "100", "--", sys.executable, "-c", code], env=env,
                           capture_output=True, text=True, timeout=150)
        self.assertEqual((p.returncode, p.stdout.count(" ok")), (0, n), p.stdout[-2000:] + p.stderr[-4000:])

    def test_bad_backend_on_one_rank(self):
        # Comm() with a backend name only Python rejects, on rank 1 of 2: it raises there, and rank 0's
        # creation fails at once with RemoteInvalid (not at its timeout, a minute)
        code = ("import os, time, epx\n"
                "r = int(os.environ['EPX_RANK'])\n"
                "t0 = time.monotonic()\n"
                "try:\n"
                "    epx.Comm(backend='nope' if r == 1 else 'CPU', timeout_ms=60000)\n"
                "    raise SystemExit('rank %d: no error' % r)\n"
                "except epx.RemoteInvalidError:\n"
                "    assert r == 0\n"
                "except epx.InvalidArgumentError as e:\n"
                "    assert r == 1 and 'nope' in e.message, e\n"
                "assert time.monotonic() - t0 < 20, time.monotonic() - t0\n"
                "print('rank %d ok' % r)\n")
        self._ranks(2, code)

    def test_released_moe_one_rank(self):
        # a collective on a Moe destroyed on rank 1 and released there by a later collective: rank 1 has no
        # context left to join it with, and says so with an unrecoverable InvalidArgumentError, so that
        # leaving `with comm` aborts the communicator and rank 0's call fails at once (PeerFailure) instead
        # of at its timeout (a minute); rank 1 stays alive meanwhile (its exit would end rank 0's wait too)
        code = ("import os, time, numpy as np, epx\n"
                "r = int(os.environ['EPX_RANK'])\n"
                "c = epx.Comm(timeout_ms=60000)\n"
                "m = epx.Moe(c, 16, 4, 4, 2, dtype='f32')\n"
                "if r == 1:\n"
                "    m.destroy()\n"
                "c.alltoall(np.zeros(1 << 20, np.float32))  # 2 MiB read from each other: past the eager\n"
                "t0 = time.monotonic()  # slots, so rank 1 returns (then aborts) only once rank 0 read it\n"
                "try:\n"
                "    with c:\n"
                "        m.dispatch(np.ones((2, 16), np.float32), np.zeros((2, 2), np.int64))\n"
                "    raise SystemExit('rank %d: no error' % r)\n"
                "except epx.InvalidArgumentError as e:\n"
                "    assert r == 1 and not e.recoverable and 'released' in e.message, repr(e)\n"
                "    time.sleep(3)\n"
                "except epx.PeerFailureError:\n"
                "    assert r == 0 and time.monotonic() - t0 < 2, time.monotonic() - t0\n"
                "print('rank %d ok' % r)\n")
        self._ranks(2, code)

    # Prologue of the one-rank-refuses scripts: rank r of R, the last one `bad`; together(what, call, own,
    # text) checks that call(), a collective, fails on every rank well within the 8 s timeout the scripts
    # give their communicators: rank `bad` with its own exception `own` (its text holding `text`), the
    # others with RemoteInvalidError (they used to wait for that rank until their timeout)
    _TOGETHER = ("import os, time, numpy as np, epx\n"
                 "from epx import deep_ep\n"
                 "r, R = int(os.environ['EPX_RANK']), int(os.environ['EPX_NRANKS'])\n"
                 "bad = R - 1\n"
                 "def together(what, call, own, text):\n"
                 "    t0 = time.monotonic()\n"
                 "    try:\n"
                 "        call()\n"
                 "        raise SystemExit('rank %d: %s did not raise' % (r, what))\n"
                 "    except epx.RemoteInvalidError as e:\n"
                 "        assert r != bad, (what, e)\n"
                 "    except own as e:\n"
                 "        assert r == bad and text in str(e), (what, e)\n"
                 "    assert time.monotonic() - t0 < 2, (what, r, time.monotonic() - t0)\n")

    def test_moe_wrong_mode_one_rank(self):
        # a call of the other mode than its Moe's on one rank (a high-throughput call on a low-latency
        # context, or the reverse), a valid call on the others: that rank raises InvalidUsageError once it
        # failed the call of its context's mode that stands in for it (dispatch / ll_dispatch, combine /
        # ll_combine), and the others fail at once; before, it raised alone and they waited
        code = self._TOGETHER + (
            "c = epx.Comm(timeout_ms=8000)\n"
            "E, K, M, H = 2 * R, 2, 4, 16\n"
            "ht = epx.Moe(c, H, E, M, K, dtype='bf16')  # the same arrays fit either context\n"
            "ll = epx.Moe(c, H, E, M, K, dtype='bf16', mode='ll')\n"
            "x = np.full((2, H), 0x3F80, np.uint16)  # bf16 ones\n"
            "idx, w = np.array([[0, E - 1], [1, -1]], np.int64), np.ones((2, K), np.float32)\n"
            "y = np.zeros((E // R, R * M, H), np.uint16)\n"
            "hr, lr = ht.dispatch(x, idx, w), ll.ll_dispatch(x, idx)\n"
            "valid = {'dispatch': lambda: ht.dispatch(x, idx, w),\n"
            "         'dispatch_cached': lambda: ht.dispatch_cached(hr.handle, x),\n"
            "         'combine': lambda: ht.combine(hr.handle, hr.recv_x),\n"
            "         'll_dispatch': lambda: ll.ll_dispatch(x, idx),\n"
            "         'split ll_dispatch': lambda: ll.ll_dispatch(x, idx, split=True),\n"
            "         'll_combine': lambda: ll.ll_combine(lr.handle, y, w)}\n"
            "wrong = {'dispatch': lambda: ll.dispatch(x, idx, w),\n"
            "         'dispatch_cached': lambda: ll.dispatch_cached(hr.handle, x),\n"
            "         'combine': lambda: ll.combine(hr.handle, hr.recv_x),\n"
            "         'll_dispatch': lambda: ht.ll_dispatch(x, idx),\n"
            "         'split ll_dispatch': lambda: ht.ll_dispatch(x, idx, split=True),\n"
            "         'll_combine': lambda: ht.ll_combine(lr.handle, y, w)}\n"
            "for b, g in (('dispatch', 'll_dispatch'), ('dispatch_cached', 'll_dispatch'), ('combine', 'll_combine'),\n"
            "             ('dispatch', 'll_combine'), ('combine', 'split ll_dispatch'), ('ll_dispatch', 'dispatch'),\n"
            "             ('split ll_dispatch', 'combine'), ('ll_combine', 'combine'), ('ll_combine', 'dispatch_cached')):\n"
            "    mode = 'low-latency' if 'll_' in b else 'high-throughput'\n"
            "    together('%s on one rank, %s on the others' % (b, g), wrong[b] if r == bad else valid[g],\n"
            "             epx.InvalidUsageError, 'is a %s call, but this MoE context was created for' % mode)\n"
            "assert c.alltoall(np.full(R, r, np.int32)).tolist() == list(range(R))\n"
            "assert ht.combine(hr.handle, hr.recv_x)[0].shape == (2, H)  # still usable\n"
            "assert ll.ll_combine(lr.handle, y, w).shape == (2, H)\n"
            "print('rank %d ok' % r)\n")
        for n in (2, 3):
            with self.subTest(nranks=n):
                self._ranks(n, code)

    def test_deep_ep_buffer_refused_on_one_rank(self):
        # deep_ep.Buffer's constructor is collective (as DeepEP's): what it refuses on one rank only
        # (enable_shrink=True, an EPX_DEEP_EP_MAX_TOKENS that is not a positive integer) raises there, and
        # the others' constructors fail at once, over a communicator they were given or one of their own;
        # so do their calls along the handle of the other mode's dispatch on one rank
        code = self._TOGETHER + (
            "c = epx.Comm(timeout_ms=8000)\n"
            "together('Buffer(enable_shrink=True)', lambda: deep_ep.Buffer(c, enable_shrink=r == bad),\n"
            "         epx.UnsupportedError, 'enable_shrink')\n"
            "for v, exc in (('0', epx.InvalidArgumentError), ('many', ValueError)):\n"
            "    os.environ['EPX_DEEP_EP_MAX_TOKENS'] = v if r == bad else '64'\n"
            "    together('Buffer with EPX_DEEP_EP_MAX_TOKENS=' + v, lambda: deep_ep.Buffer(c), exc, v)\n"
            "del os.environ['EPX_DEEP_EP_MAX_TOKENS']\n"
            "buf = deep_ep.Buffer(c)\n"
            "E, K, H, M, T = 2 * R, 2, 32, 4, 3\n"
            "x, xb = np.ones((T, H), np.float32), np.zeros((T, H), np.uint16)\n"
            "idx, w = np.tile(np.array([0, E - 1], np.int64), (T, 1)), np.ones((T, K), np.float32)\n"
            "_, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)\n"
            "recv_x, _, _, _, h, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_tokens_per_expert=per_expert,\n"
            "                                     is_token_in_rank=in_rank)\n"
            "lx, _, lh, _, _ = buf.low_latency_dispatch(xb, idx, M, E, use_fp8=False)\n"
            "together('combine along a low-latency handle', lambda: buf.combine(recv_x, lh if r == bad else h),\n"
            "         epx.InvalidArgumentError, 'not of a low_latency_dispatch')\n"
            "together('cached dispatch along a low-latency handle', lambda: buf.dispatch(x, handle=lh if r == bad\n"
            "         else h), epx.InvalidArgumentError, 'not of a low_latency_dispatch')\n"
            "together('low_latency_combine along a high-throughput handle', lambda: buf.low_latency_combine(\n"
            "         np.zeros_like(lx), idx, w, h if r == bad else lh), epx.InvalidArgumentError, 'not of a dispatch')\n"
            "assert buf.combine(recv_x, h)[0].shape == (T, H)  # still usable\n"
            "buf.destroy()\n"
            "print('rank %d ok' % r)\n")
        own = self._TOGETHER + (  # the Buffer's own communicator, from epx-run's environment
            "together('Buffer(enable_shrink=True) over a communicator of its own',\n"
            "         lambda: deep_ep.Buffer(timeout_ms=8000, enable_shrink=r == bad), epx.UnsupportedError,\n"
            "         'enable_shrink')\n"
            "print('rank %d ok' % r)\n")
        for n in (2, 3):
            with self.subTest(nranks=n):
                self._ranks(n, code)
                self._ranks(n, own)

    def _script(self, code):
        env = dict(os.environ, PYTHONPATH=PKG + os.pathsep + os.environ.get("PYTHONPATH", ""))
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)

    def test_registered_array_outlives_comm(self):
        # the communicator going out of scope must not unmap the memory of an array it made
        p = self._script("import gc, numpy as np, epx\n"
                         "def make():\n"
                         "    c = epx.Comm(1, 0, epx.get_unique_id(), backend='cpu')\n"
                         "    a = c.empty((256, 1024), np.float32)\n"
                         "    a[:] = 1\n"
                         "    return a\n"
                         "a = make()\n"
                         "gc.collect()\n"
                         "print(int(a.sum()))\n")
        self.assertEqual((p.returncode, p.stdout.strip()), (0, str(256 * 1024)), p.stderr[-2000:])

    def test_deep_ep_module_names(self):
        # DeepEP's import paths: epx.deep_ep.utils / .buffer, and after register_as_deep_ep() the name
        # deep_ep itself (import, from-import, submodules, find_spec); what epx lacks stays absent;
        # a deep_ep imported before is not replaced
        p = self._script("import importlib.util, sys, types\n"
                         "from epx.deep_ep.utils import EventHandle, EventOverlap\n"
                         "from epx.deep_ep.buffer import Buffer, Config\n"
                         "import epx, epx.deep_ep as front\n"
                         "assert importlib.util.find_spec('deep_ep') is None\n"
                         "assert front.register_as_deep_ep() is front and front.register_as_deep_ep() is front\n"
                         "import deep_ep\n"
                         "from deep_ep import Buffer as B2, Config as C2, EventOverlap as O2\n"
                         "from deep_ep.utils import EventHandle as H3, EventOverlap as O3\n"
                         "import deep_ep.buffer, deep_ep.utils\n"
                         "assert deep_ep is front and (B2, C2, O2, H3, O3) == (Buffer, Config, EventOverlap,\n"
                         "    EventHandle, EventOverlap) and deep_ep.buffer.Buffer is Buffer\n"
                         "assert importlib.util.find_spec('deep_ep') is not None\n"
                         "assert not hasattr(deep_ep, 'ElasticBuffer')\n"
                         "try:\n"
                         "    from deep_ep import HybridEPBuffer\n"
                         "    raise SystemExit('HybridEPBuffer imported')\n"
                         "except ImportError:\n"
                         "    pass\n"
                         "for n in ('deep_ep', 'deep_ep.utils', 'deep_ep.buffer'):\n"
                         "    del sys.modules[n]\n"
                         "sys.modules['deep_ep'] = other = types.ModuleType('deep_ep')\n"
                         "try:\n"
                         "    front.register_as_deep_ep()\n"
                         "    raise SystemExit('registered over another deep_ep')\n"
                         "except epx.InvalidUsageError as e:\n"
                         "    assert 'already imported' in e.message, e\n"
                         "assert sys.modules['deep_ep'] is other and 'deep_ep.utils' not in sys.modules\n"
                         "print('ok')\n")
        self.assertEqual((p.returncode, p.stdout.strip()), (0, "ok"), p.stderr[-3000:])

    def test_deep_ep_group_backend(self):
        # Buffer(group) with a torch ProcessGroup works on the current CUDA device whenever torch has CUDA
        # and libepx a CUDA backend, whatever the group's backend (vLLM passes its gloo CPU group, as
        # DeepEP allows), else on the CPU backend; a fake torch, a fake answer of libepx's query and
        # Comm.from_torch show what is asked for
        p = self._script("import sys, types, epx\n"
                         "from epx import deep_ep\n"
                         "asked = []\n"
                         "class Fake:\n"
                         "    rank, size, backend = 0, 1, 'cpu'\n"
                         "    def _agree(self, prepare):  # Buffer's agreement on its arguments\n"
                         "        return prepare()[1]\n"
                         "epx.Comm.from_torch = classmethod(lambda cls, group, **kw: asked.append(kw) or Fake())\n"
                         "for cuda, built in ((True, True), (False, True), (True, False)):\n"
                         "    epx._lib.lib.epx_moe_device_memory = lambda *a, st=0 if built else -5: st\n"
                         "    epx._comm.cuda_built.cache_clear()\n"
                         "    t = types.ModuleType('torch')\n"
                         "    t.cuda = types.SimpleNamespace(is_available=lambda: cuda, current_device=lambda: 3)\n"
                         "    sys.modules['torch'] = t\n"
                         "    deep_ep.Buffer(object(), 0, 0, timeout_ms=5000)\n"
                         "print(asked)\n")
        self.assertEqual(p.returncode, 0, p.stderr[-3000:])
        self.assertEqual(p.stdout.strip(), str([{"backend": "cuda", "device": 3, "timeout_ms": 5000},
                                                {"backend": "cpu", "timeout_ms": 5000},
                                                {"backend": "cpu", "timeout_ms": 5000}]))

    def test_deep_ep_cuda_tensors_without_cuda_build(self):
        # an epx built without CUDA, torch with CUDA: Buffer(group) makes a CPU communicator (before, the
        # CUDA backend: UnsupportedError at creation), and a dispatch of CUDA tensors raises
        # InvalidArgumentError saying that this build has no CUDA backend; a fake torch (CUDA tensors
        # that only describe themselves) and a fake answer of libepx's query stand in
        p = self._script("import sys, types, numpy as np, epx\n"
                         "from epx import deep_ep\n"
                         "epx._lib.lib.epx_moe_device_memory = lambda *a: -5\n"
                         "epx.Comm.from_torch = classmethod(lambda cls, group, **kw: epx.Comm(1, 0,\n"
                         "    epx.get_unique_id(), **kw))\n"
                         "class dtype:\n"
                         "    def __init__(self, name):\n"
                         "        self.name = name\n"
                         "    def __str__(self):\n"
                         "        return 'torch.' + self.name\n"
                         "class Tensor:\n"
                         "    is_cuda, device = True, 'cuda:0'\n"
                         "    def __init__(self, shape, name):\n"
                         "        self.shape, self.dtype = shape, dtype(name)\n"
                         "    def is_contiguous(self):\n"
                         "        return True\n"
                         "t = types.ModuleType('torch')\n"
                         "t.Tensor, t.dtype, t.int64 = Tensor, dtype, None\n"
                         "t.cuda = types.SimpleNamespace(is_available=lambda: True, current_device=lambda: 0)\n"
                         "t.full = lambda shape, v, dtype, device: np.full(shape, v, np.int64)\n"
                         "sys.modules['torch'] = t\n"
                         "b = deep_ep.Buffer(object(), 0, 0, timeout_ms=5000)\n"
                         "assert b.comm.backend == 'cpu', b.comm.backend\n"
                         "try:\n"
                         "    b.dispatch(Tensor((4, 64), 'bfloat16'), topk_idx=Tensor((4, 2), 'int64'),\n"
                         "               num_tokens_per_expert=np.zeros(2, np.int32))\n"
                         "    raise SystemExit('CUDA tensors accepted')\n"
                         "except epx.InvalidArgumentError as e:\n"
                         "    print(e.message)\n")
        self.assertEqual(p.returncode, 0, p.stderr[-3000:])
        self.assertIn("x is on cuda:0, but this epx build has no CUDA backend", p.stdout)

    def test_cuda_built_query(self):
        # the package's answer to "has this libepx a CUDA backend?" agrees with epx-info's, for the
        # library of the same build
        run = _launcher()
        info = run and os.path.join(os.path.dirname(run), "epx-info")
        if not info or not os.path.exists(info):
            self.skipTest("epx-info not built (cmake --build build)")
        p = subprocess.run([info], capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 0, p.stderr[-2000:])
        env = dict(os.environ, PYTHONPATH=PKG, EPX_LIBRARY=os.path.join(os.path.dirname(os.path.dirname(run)), "lib"))
        q = subprocess.run([sys.executable, "-c", "import epx; print(epx._comm.cuda_built())"], env=env,
                           capture_output=True, text=True, timeout=60)
        self.assertEqual((q.returncode, q.stdout.strip()), (0, str("cuda not built" not in p.stdout)),
                         q.stderr[-2000:])

    def test_abort_with_pending_ll_send(self):
        # abort() must abort even while a split low-latency send is pending on a healthy communicator
        p = self._script("import numpy as np, epx\n"
                         "c = epx.Comm(1, 0, epx.get_unique_id(), backend='cpu')\n"
                         "m = epx.Moe(c, 16, 2, 4, 2, dtype='f32', mode='ll')\n"
                         "r = m.ll_dispatch(np.ones((2, 16), np.float32), np.zeros((2, 2), np.int64), split=True)\n"
                         "c.abort()\n"
                         "print(bool(c._h), bool(m._h), bool(r.handle._h))\n")
        self.assertEqual((p.returncode, p.stdout.strip()), (0, "False False False"), p.stderr[-2000:])


if __name__ == "__main__":
    unittest.main(verbosity=2)
