"""A DeepEP-compatible front over epx: `from epx import deep_ep` (or `import epx.deep_ep as deep_ep`)
instead of `import deep_ep`, and code written for DeepEP's `Buffer` runs on epx. The package has
DeepEP's layout: `Buffer`, `Config`, `EventOverlap` and `topk_idx_t` here, `EventHandle` and
`EventOverlap` in `epx.deep_ep.utils`, `Buffer` and `Config` in `epx.deep_ep.buffer`. To run code
that says `import deep_ep` / `from deep_ep.utils import ...` unmodified, call
`epx.deep_ep.register_as_deep_ep()` first (below).

What maps onto what:
- Buffer(group, ...)                 a communicator bootstrapped from the torch ProcessGroup, on the
                                     current CUDA device whenever CUDA is available (whatever the
                                     group's backend: gloo groups too, as DeepEP) and epx was built
                                     with CUDA, else on the CPU backend; num_nvl_bytes /
                                     num_rdma_bytes / num_qps_per_rank are accepted and not needed
                                     (epx sizes its own buffers);
                                     enable_shrink=True (rank masking) raises UnsupportedError.
                                     Collective, as DeepEP's: what one rank refuses fails it on
                                     every rank (the others: RemoteInvalidError).
- get_dispatch_layout                computed locally with tensor ops (no synchronisation).
- dispatch / combine                 epx high-throughput dispatch / combine (rows ordered by source
                                     rank then source token; deterministic float32 reduction);
                                     dispatch(handle=...) is epx's cached dispatch. FP8 scales may be
                                     [T] or [T, C <= ceil(H/128)], float32 or int32, any layout.
- low_latency_dispatch / _combine    epx low-latency dispatch / combine (static expert-major shapes,
                                     FP8 with float32 or UE8M0 scales). The handle is a 5-sequence
                                     like DeepEP's tuple (items 2-4: max tokens, hidden, experts).
- events                             work runs on the current torch stream; previous_event makes it
                                     wait first; async_finish returns an event recorded after it.
- return_recv_hook                   the call only sends (epx_moe_ll_dispatch_send / _combine_send)
                                     and the returned hook receives: the outputs are complete after
                                     hook() (on the CUDA backend, in stream order); at most two
                                     batches in flight, hooks called in the order of the calls.
                                     Without it, the hook does nothing.

Contexts (one per hidden size, dtype, expert count, top-k and alignment) are created lazily and
collectively on first use. High-throughput contexts size themselves to the largest token count
seen: a dispatch with more tokens than any before fails on every rank, the ranks agree on the
largest count, and the call is retried once on a larger context — nothing is lost.

Also accepted instead of a ProcessGroup: an `epx.Comm` (or None: a communicator from epx-run's
environment). Then numpy arrays work too (CPU backend); that is how CI tests this module without
torch. bf16 numpy data is ml_dtypes' bfloat16 or raw uint16 bits; other dtypes epx supports (f16,
f32) work as well.
"""
import sys

from .._errors import InvalidUsageError
from . import buffer, utils
from .buffer import Buffer, Config
from .utils import EventHandle, EventOverlap


def __getattr__(name):
    if name == "topk_idx_t":  # DeepEP's dtype of topk_idx; epx takes int64 and int32 alike
        try:
            import torch
        except ImportError:
            raise AttributeError("topk_idx_t is a torch dtype and torch is not installed") from None
        return torch.int64
    raise AttributeError("module %r has no attribute %r" % (__name__, name))


def register_as_deep_ep():
    """Make this front answer to the name `deep_ep`: afterwards `import deep_ep`, `from deep_ep import
    Buffer, Config`, `from deep_ep.utils import EventHandle, EventOverlap` and `deep_ep.buffer` give
    epx's, so code written for DeepEP runs unmodified (importlib.util.find_spec("deep_ep") finds it
    too). Call it before that code imports deep_ep, in every process that runs it (sys.modules is
    per process: spawned workers need the call too, e.g. from their entry point or a
    sitecustomize). Idempotent; returns this module. Raises InvalidUsageError, changing nothing,
    when another module of one of those names is already imported (a real DeepEP's objects may
    already be held elsewhere, and the two cannot be mixed). What DeepEP has and epx lacks
    (HybridEPBuffer, ElasticBuffer, ...) stays absent, so `from deep_ep import HybridEPBuffer` raises
    ImportError and hasattr() checks see it missing."""
    this = sys.modules[__name__]
    names = {"deep_ep": this, "deep_ep.buffer": buffer, "deep_ep.utils": utils}
    for name, mod in names.items():
        have = sys.modules.get(name)
        if have is not None and have is not mod:
            raise InvalidUsageError(-2, "a module named %r is already imported (%s): call "
                                        "epx.deep_ep.register_as_deep_ep() before anything imports DeepEP"
                                    % (name, getattr(have, "__file__", None) or have))
    sys.modules.update(names)
    return this


__all__ = ["Buffer", "Config", "EventOverlap", "EventHandle", "register_as_deep_ep"]
