"""`deep_ep.utils` of the DeepEP front: the event wrappers (`from deep_ep.utils import EventHandle,
EventOverlap`)."""
from .. import _arrays as A


class EventHandle:
    """A CUDA event recorded on the current torch stream at creation (nothing on the CPU)."""

    def __init__(self, device=None):
        self.event = None
        t = A._torch()
        if t is not None and t.cuda.is_available() and (device is None or getattr(device, "type", "cpu") == "cuda"):
            self.event = t.cuda.Event()
            self.event.record(t.cuda.current_stream(device))

    def current_stream_wait(self):
        if self.event is not None:
            A._torch().cuda.current_stream().wait_event(self.event)


class EventOverlap:
    """DeepEP's event wrapper: current_stream_wait(), and `with event:` makes the current stream wait on
    exit. extra_tensors are kept alive until the event is dropped."""

    def __init__(self, event=None, extra_tensors=None):
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self):
        if self.event is not None:
            self.event.current_stream_wait()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        if self.event is not None:
            self.event.current_stream_wait()


__all__ = ["EventHandle", "EventOverlap"]
