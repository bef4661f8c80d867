"""Streams and events: the CUDA backend and the ``emulate`` backend.

The engine talks to the device only through these few calls, so the whole state machine
runs unchanged on CPU with ``emulate=True``: CPU tensors stand in for device tensors,
copies really copy into separate host buffers (and the originals are freed), while
streams and events are no-ops whose ``query()`` is always True.
"""
from __future__ import annotations

import contextlib

import torch


class EmulateBackend:
    """CPU stand-in: every CPU tensor is a "device" tensor; events are always complete."""

    emulated = True

    def __init__(self) -> None:
        self.d2h_stream = None
        self.h2d_stream = None

    def is_device_tensor(self, t: torch.Tensor) -> bool:
        return t.is_cpu

    def current_stream(self):
        return None

    def stream(self, stream):
        return contextlib.nullcontext()

    def record_event(self, stream, timing: bool = False):
        return None

    def elapsed_seconds(self, start, end) -> float:
        return 0.0

    def wait_event(self, stream, event) -> None:
        pass

    def query(self, event) -> bool:
        return True

    def synchronize(self, event) -> None:
        pass

    def empty_host(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def empty_device(self, nbytes: int, device: torch.device) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def before_copy(self, stream, direction: str) -> None:
        """Called on ``stream`` right before each copy (``"d2h"`` or ``"h2d"``); a
        no-op here.  :class:`DelayedCopies` uses it to widen race windows in tests."""

    def ensure_streams(self, device) -> None:
        pass

    def graph_task_id(self) -> int:
        """Autograd's id of the backward running on this thread, -1 outside backward.

        torch has no public spelling of this (torch 2.10-2.13); ``torch.autograd.graph``
        and ``torch.utils.checkpoint`` use the same ``torch._C`` call."""
        return torch._C._current_graph_task_id()


class CudaBackend(EmulateBackend):
    """Real CUDA streams and events.  Side streams are created at the first offload, on
    the device of the first offloaded tensor (one device per context)."""

    emulated = False

    def is_device_tensor(self, t: torch.Tensor) -> bool:
        return t.is_cuda

    def ensure_streams(self, device) -> None:
        if self.d2h_stream is None:
            self.d2h_stream = torch.cuda.Stream(device=device)
            self.h2d_stream = torch.cuda.Stream(device=device)

    def current_stream(self):
        return torch.cuda.current_stream()

    def stream(self, stream):
        return torch.cuda.stream(stream)

    def record_event(self, stream, timing: bool = False):
        event = torch.cuda.Event(enable_timing=timing)
        event.record(stream)
        return event

    def elapsed_seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3

    def wait_event(self, stream, event) -> None:
        if event is not None:
            stream.wait_event(event)

    def query(self, event) -> bool:
        return event is None or event.query()

    def synchronize(self, event) -> None:
        if event is not None:
            event.synchronize()

    def empty_host(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)



class DelayedCopies:
    """Test aid: wraps a backend and launches a GPU sleep before each copy.

    ``d2h_cycles`` / ``h2d_cycles`` are ``torch.cuda._sleep`` cycles queued on the side
    stream right before each device-to-host / host-to-device copy, so a missing wait
    turns into a visible race.  Everything else is forwarded to the wrapped backend.
    Install with :func:`add_copy_delays`.
    """

    def __init__(self, inner, d2h_cycles: int = 0, h2d_cycles: int = 0) -> None:
        self.inner = inner
        self.d2h_cycles = int(d2h_cycles)
        self.h2d_cycles = int(h2d_cycles)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def before_copy(self, stream, direction: str) -> None:
        cycles = self.d2h_cycles if direction == "d2h" else self.h2d_cycles
        if cycles > 0 and not self.inner.emulated:
            with torch.cuda.stream(stream):
                torch.cuda._sleep(cycles)
        self.inner.before_copy(stream, direction)


def add_copy_delays(ctx, d2h_cycles: int = 0, h2d_cycles: int = 0) -> None:
    """Test aid: make ``ctx`` (a ``CpuOffloadContext``) sleep before its copies."""
    inner = ctx.backend
    while isinstance(inner, DelayedCopies):
        inner = inner.inner
    ctx.backend = DelayedCopies(inner, d2h_cycles, h2d_cycles)
