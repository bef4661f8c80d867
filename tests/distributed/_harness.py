"""Spawn ``W`` worker processes on one machine for the distributed tests.

Each worker (forked for gloo, spawned for NCCL) joins a process group through a ``FileStore`` in the test's ``tmp_path``
(no port to pick), runs ``fn(rank, world, *args)`` with one CPU thread, and tears the
group down.  A worker's exception fails the test with its traceback.
"""
from __future__ import annotations

import datetime
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, store_path: str, backend: str, fn, args) -> None:
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    store = dist.FileStore(store_path, world)
    # A collective that never pairs up fails after a minute instead of hanging CI.
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(world: int, fn, tmp_path, *args, backend: str = "gloo", timeout_s: float = 180.0) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` spawned ranks (``fn`` must be a
    module-level function so that the children can import it); a rank that fails fails
    the call with its traceback, and ranks still running after ``timeout_s`` are killed."""
    store_path = os.path.join(str(tmp_path), f"store_{fn.__name__}_{world}")
    # gloo/CPU: fork (the children inherit the imported torch; a fresh interpreter per
    # rank costs seconds of imports on a loaded machine).  NCCL/CUDA needs spawn.
    method = "spawn" if backend == "nccl" else "fork"
    context = mp.start_processes(_entry, args=(world, store_path, backend, fn, args),
                                 nprocs=world, join=False, start_method=method)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):      # raises with the traceback if a rank fails
        if time.monotonic() > deadline:
            for p in context.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{fn.__name__} on {world} ranks did not finish in {timeout_s} s")


def device_for(backend: str) -> torch.device:
    """The device a worker of ``backend`` computes on."""
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
