"""``examples/train_ep.py`` (EP + FSDP2 + offload) trains on 2 gloo ranks, and offload
changes nothing: the losses are bitwise those of the same run with ``--no-offload``."""
import importlib.util
import pathlib

import pytest
import torch._dynamo  # noqa: F401  (FSDP2 imports it lazily: once here, not in every forked rank)

from ._harness import spawn

_PATH = pathlib.Path(__file__).resolve().parents[2] / "examples" / "train_ep.py"
_spec = importlib.util.spec_from_file_location("train_ep_example", _PATH)
train_ep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_ep)       # loaded before the ranks fork

TINY = ["--steps", "3", "--layers", "2", "--hidden", "16", "--heads", "2", "--ffn", "16",
        "--experts", "4", "--vocab", "32", "--batch", "2", "--seq", "8"]


def example_worker(rank: int, world: int):
    with_offload = train_ep.main(TINY)
    without = train_ep.main(TINY + ["--no-offload"])
    assert with_offload == without, (with_offload, without)
    assert with_offload[-1] < with_offload[0], with_offload
    capacity = train_ep.main(TINY + ["--capacity-factor", "2"])
    assert capacity[-1] < capacity[0], capacity


def test_example_trains_on_two_ranks(tmp_path):
    spawn(2, example_worker, tmp_path)


@pytest.mark.cuda
def test_example_trains_on_one_gpu_nccl(tmp_path):
    spawn(1, example_worker, tmp_path, backend="nccl")
