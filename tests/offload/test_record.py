"""Records: named states, autograd's in-place version check on every path, dedup keyed
on the version, and a randomized comparison with plain autograd (CPU, emulate)."""
import contextlib
import random
import re

import pytest
import torch

from moe_offload.offload import get_cpu_offload_context
from moe_offload.offload.record import State, version_holder
from tests.offload._helpers import SMALL

EMU = dict(emulate=True, min_offload_bytes=SMALL)
PREFIX = ("one of the variables needed for gradient computation has been modified by an "
          "inplace operation: ")


def _inplace_error(fn):
    with pytest.raises(RuntimeError) as info:
        fn()
    assert str(info.value).startswith(PREFIX), str(info.value)
    return str(info.value)


def _head(msg: str) -> str:
    """The part of autograd's message that names tensor, producer and versions."""
    return msg.split(" Hint:")[0]


def test_version_holder_tracks_writes_without_keeping_storage():
    t = torch.randn(100)
    h = version_holder(t)
    assert h._version == t._version == 0 and h.untyped_storage().nbytes() == 0
    view = t[10:]
    del t
    view.mul_(2)
    assert h._version == 1


@pytest.mark.parametrize("where", ["offloaded", "below_threshold", "resident", "opt_out"])
def test_inplace_after_save_raises_autograd_error(where):
    """Same text as autograd without offload, on every path (torch skips its own check
    for tensors saved through hooks)."""
    def program(ctx=None, opt=None):
        x = torch.randn(64 if where != "below_threshold" else 2, 64, requires_grad=True)
        a = x * 2.0                               # saves nothing itself
        with ctx or contextlib.nullcontext():
            with opt or contextlib.nullcontext():
                y = a.sin()                       # saves a
        with torch.no_grad():
            a.add_(1)
        y.sum().backward()

    ref = _inplace_error(program)
    num_layers = 0 if where == "resident" else 1
    ctx, _ = get_cpu_offload_context(True, num_layers, 1, **EMU)
    opt = get_cpu_offload_context(False)[0] if where == "opt_out" else None
    got = _inplace_error(lambda: program(ctx, opt))
    assert _head(got) == _head(ref)
    if where == "offloaded":
        assert ctx.stats()["offloaded_tensors"] == 1
    if where == "below_threshold":
        assert ctx.stats()["below_threshold_tensors"] == 1


def test_inplace_on_saved_output_and_parameter():
    """A saved output (exp saves its result) and a parameter written after the save."""
    def program(ctx=None):
        w = torch.nn.Parameter(torch.randn(64, 64))
        x = torch.randn(64, 64, requires_grad=True)
        with ctx or contextlib.nullcontext():
            e = x.exp()
            y = (e @ w).sum()
        with torch.no_grad():
            w.add_(1)
        y.backward()

    ref = _inplace_error(program)
    assert "[torch.FloatTensor [64, 64]] is at version 1" in ref
    ctx, _ = get_cpu_offload_context(True, 1, 1, **EMU)
    assert _head(_inplace_error(lambda: program(ctx))) == _head(ref)

    def program_output(ctx=None):
        x = torch.randn(64, 64, requires_grad=True)
        with ctx or contextlib.nullcontext():
            e = x.exp()
        with torch.no_grad():
            e.mul_(2)
        e.sum().backward()

    ref = _inplace_error(program_output)
    ctx, _ = get_cpu_offload_context(True, 1, 1, **EMU)
    assert _head(_inplace_error(lambda: program_output(ctx))) == _head(ref)


def test_dedup_keys_on_version():
    """Saved, written in place, saved again: two values.  The first saver is never
    back-propagated, so the program is valid and the gradient must be exact."""
    def program(ctx=None):
        x = torch.randn(64, 64, dtype=torch.float64, requires_grad=True)
        with ctx or contextlib.nullcontext():
            a = x * 1.0
            y1 = a.sin()                  # saves a (version 0)
            with torch.no_grad():
                a.add_(1024.0)
            y2 = a.cos()                  # saves a (version 1)
        y2.sum().backward()
        del y1
        return x.grad

    torch.manual_seed(0)
    ref = program()
    ctx, _ = get_cpu_offload_context(True, 1, 1, **EMU)
    torch.manual_seed(0)
    got = program(ctx)
    assert torch.equal(ref, got)
    assert ctx.stats()["offloaded_tensors"] == 2 and ctx.stats()["dedup_hits"] == 0


def test_record_states_and_checked_transitions():
    ctx, sync = get_cpu_offload_context(True, 1, 2, **EMU)
    x = torch.randn(64, 64, requires_grad=True)
    with ctx:
        y = x.sin()
    y = sync(y)
    with ctx:                             # the boundary releases layer 0's device copy
        y = sync(y * 2)
    records = [r for layer in ctx._step.layers for r in layer.alive()]
    assert [r.state for r in records] == [State.ON_HOST]
    with pytest.raises(RuntimeError, match="cannot go from ON_HOST to ON_HOST"):
        records[0]._move(State.ON_HOST)
    records[0].prefetch()
    assert records[0].state is State.RELOADED
    y.sum().backward()
    assert records[0].state is State.ON_HOST


# -- randomized: in-place writes interleaved with saves ---------------------------------

def _program(seed, ctx=None, opt=None):
    """A random chain of saves and in-place writes over big (offloadable) and small
    (kept) tensors, spread over three layers with opt-out regions; returns the grads of
    the leaves or raises what autograd raises."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    big = torch.randn(32, 32, generator=gen, dtype=torch.float64, requires_grad=True)
    small = torch.randn(4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    live = [big * 1.0, small * 1.0]
    outs = []
    for layer in range(3):
        with ctx or contextlib.nullcontext():
            for _ in range(rng.randint(2, 5)):
                region = opt if rng.random() < 0.3 else None   # draw in both runs
                with region or contextlib.nullcontext():
                    t = rng.choice(live)
                    op = rng.randrange(6)
                    if op == 0:
                        y = t.sin()                     # saves its input
                    elif op == 1:
                        y = t.exp()                     # saves its output
                    elif op == 2:
                        y = t * t                       # saves one storage twice
                    elif op == 3:
                        y = t[: t.shape[0] // 2].cos()  # saves a view
                    elif op == 4:
                        with torch.no_grad():
                            t.add_(0.5)                 # in-place write, not recorded
                        continue
                    else:
                        t.mul_(1.25)                    # in-place write, recorded
                        continue
                    live.append(y)
                    outs.append(y)
    chosen = [o for o in outs if rng.random() < 0.5] or outs[-1:]
    loss = sum(o.sum() for o in chosen)
    loss.backward()
    return [big.grad, small.grad]


@pytest.mark.parametrize("seed", range(40))
def test_randomized_inplace_matches_autograd(seed):
    try:
        ref, ref_err = _program(seed), None
    except RuntimeError as e:
        ref, ref_err = None, str(e)
    ctx, _ = get_cpu_offload_context(True, 2, 3, **EMU)
    opt = get_cpu_offload_context(False)[0]
    try:
        got, got_err = _program(seed, ctx, opt), None
    except RuntimeError as e:
        got, got_err = None, str(e)
    if ref_err is not None:
        assert got_err is not None, f"autograd raised, offload did not: {ref_err}"
        assert got_err.startswith(PREFIX) and ref_err.startswith(PREFIX)
        # tensor, shape and versions as autograd names them
        pick = lambda m: (re.search(r"\[(.*?) \[(.*?)\]\]", m).groups(),
                          re.search(r"is at version (\d+); expected version (\d+)", m).groups())
        assert pick(got_err) == pick(ref_err)
    else:
        assert got_err is None, got_err
        for a, b in zip(ref, got):
            assert (a is None and b is None) or torch.equal(a, b)


def test_randomized_programs_cover_every_path():
    """The seeds above exercise offloaded, kept, opted-out and deduplicated saves and
    both outcomes (so the comparison is not vacuous)."""
    totals, errors = {}, 0
    for seed in range(40):
        ctx, _ = get_cpu_offload_context(True, 2, 3, **EMU)
        opt = get_cpu_offload_context(False)[0]
        try:
            _program(seed, ctx, opt)
        except RuntimeError:
            errors += 1
        for k, v in ctx.stats().items():
            totals[k] = totals.get(k, 0) + v
    assert totals["offloaded_tensors"] > 0 and totals["kept_on_device_tensors"] > 0
    assert totals["dedup_hits"] > 0 and totals["below_threshold_tensors"] > 0
    assert 0 < errors < 40
