"""FSDP2 (``fully_shard``) + expert parallelism + our offload, on gloo ranks.

The dense parts of each block (norms, projection, router) are sharded by FSDP2; the
experts are sharded by EP and left out of FSDP2 (``ignored_params``).  FSDP2's unsharded
parameters are ``nn.Parameter`` objects built on its all-gather output buffer
(``torch.as_strided`` of it); after each block's forward (``reshard_after_forward=True``)
it frees that buffer in place (``resize_(0)``) and re-gathers it for backward.  What
autograd saves is the ``Parameter`` itself or a view of it (``weight.t()``), which the
engine never offloads.  The tests check that no offload record ever covers an unsharded
parameter's bytes, that every buffer is freed after the forward, and that the grads are
bitwise those of the same FSDP2 run without offload.
"""
import pytest
import torch
import torch._dynamo  # noqa: F401  (FSDP2 imports it lazily: once here, not in every forked rank)
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import moe_offload.offload.context as offload_context
from moe_offload import offload_module_list

from ._harness import device_for, spawn
from ._models import Stack

H, F, K, BLOCKS = 8, 6, 2, 2


def build_model(world: int, device, reshard_after_forward: bool = True) -> Stack:
    torch.manual_seed(0)
    model = Stack(BLOCKS, H, F, 2 * world, K, ep_group=dist.group.WORLD, device=device)
    for blk in model.blocks:
        fully_shard(blk, reshard_after_forward=reshard_after_forward,
                    ignored_params=set(blk.moe.experts.parameters()))
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    return model


def fsdp_params(model):
    """Every ``FSDPParam`` of ``model`` (FSDP2 internals, read only)."""
    out = []
    for m in model.modules():
        state = m._get_fsdp_state() if hasattr(m, "_get_fsdp_state") else None
        group = getattr(state, "_fsdp_param_group", None) if state is not None else None
        if group is not None:
            out.extend(group.fsdp_params)
    return out


def _gathered_ranges(model):
    """Byte ranges of the unsharded parameters' storages that are allocated now."""
    ranges = []
    for fp in fsdp_params(model):
        for buf in fp.all_gather_outputs:
            st = buf.untyped_storage()
            if st.nbytes() > 0:
                ranges.append((st.data_ptr(), st.data_ptr() + st.nbytes()))
    return ranges


def _local_grads(model):
    out = []
    for p in model.parameters():
        g = p.grad
        out.append(g.to_local().clone() if hasattr(g, "to_local") else g.clone())
    return out


def fsdp_worker(rank: int, world: int, backend: str):
    device = device_for(backend)
    model = build_model(world, device)
    torch.manual_seed(1 + rank)
    x = torch.randn(2, 4 + 3 * rank, H, device=device)

    def step():
        model.zero_grad(set_to_none=True)
        y = model(x)
        loss = (y * y).mean() + model.aux_loss()
        loss.backward()
        return [loss.detach()] + _local_grads(model)

    plain = step()

    # Watch every offload record the engine creates: none may cover an unsharded param.
    overlaps = []

    class WatchedRecord(offload_context.Record):
        __slots__ = ()

        def __init__(self, eng, key, layer, dev, mode, start, nbytes, gpu, *rest):
            st = gpu if isinstance(gpu, torch.UntypedStorage) else gpu.untyped_storage()
            lo = st.data_ptr() + start
            for a, b in _gathered_ranges(model):
                if lo < b and a < lo + nbytes:
                    overlaps.append((key, nbytes))
            super().__init__(eng, key, layer, dev, mode, start, nbytes, gpu, *rest)

    offload_context.Record, original = WatchedRecord, offload_context.Record
    handle = offload_module_list(model.blocks, num_layers=BLOCKS, min_offload_bytes=0,
                                 emulate=backend != "nccl")
    try:
        for _ in range(2):                       # the second step reuses pool blocks
            model.zero_grad(set_to_none=True)
            y = model(x)
            # After the forward FSDP2 freed every unsharded parameter (reshard after
            # forward); nothing of ours re-allocated or kept one.
            assert _gathered_ranges(model) == [], "unsharded params alive after forward"
            loss = (y * y).mean() + model.aux_loss()
            loss.backward()
            moved = [loss.detach()] + _local_grads(model)
            for a, b in zip(plain, moved):
                assert torch.equal(a, b)
        stats = handle.stats()
    finally:
        handle.remove()
        offload_context.Record = original
    assert overlaps == [], overlaps
    assert stats["offloaded_tensors"] > 0
    assert stats["reloaded_bytes"] >= stats["offloaded_bytes"]


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_ep_offload_bitwise(tmp_path, world):
    spawn(world, fsdp_worker, tmp_path, "gloo")


@pytest.mark.cuda
def test_fsdp2_ep_offload_bitwise_nccl(tmp_path):
    spawn(1, fsdp_worker, tmp_path, "nccl", backend="nccl")
