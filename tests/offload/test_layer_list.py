"""find_layers: one finder for the planner, the benchmark and the HF integration."""
import pytest
import torch
from torch import nn

from moe_offload.offload import find_layers


class Block(nn.Module):
    def __init__(self, h=8):
        super().__init__()
        self.lin = nn.Linear(h, h)

    def forward(self, x):
        return x + self.lin(x)


class Titan(nn.Module):
    """torchtitan's shape: layers in a ModuleDict keyed by index, no loss inside."""

    def __init__(self, n=3):
        super().__init__()
        self.tok_embeddings = nn.Embedding(16, 8)
        self.layers = nn.ModuleDict({str(i): Block() for i in range(n)})
        self.output = nn.Linear(8, 16)


def test_module_dict_layers_come_back_in_order_as_the_same_modules():
    m = Titan()
    layers = find_layers(m)
    assert isinstance(layers, nn.ModuleList) and len(layers) == 3
    assert all(a is b for a, b in zip(layers, m.layers.values()))
    assert list(find_layers(m, m.layers)) == list(m.layers.values())


def test_the_language_model_beats_a_vision_tower_and_an_experts_list():
    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(6))

    class VLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision = nn.Module()
            self.vision.blocks = nn.ModuleList(Block(4) for _ in range(5))
            self.model = nn.Module()
            self.model.layers = nn.ModuleList(nn.Sequential(Block(16), Experts()) for _ in range(2))
    m = VLM()
    assert find_layers(m) is m.model.layers


def test_hugging_face_decoder_layers_are_found():
    pytest.importorskip("transformers")
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16, num_experts=4, num_experts_per_tok=2)
    m = Qwen3MoeForCausalLM(cfg)
    assert find_layers(m) is m.model.layers
    from moe_offload.integrations.transformers import find_decoder_layers
    assert find_decoder_layers(m) is m.model.layers


def test_errors_say_what_to_pass():
    with pytest.raises(ValueError, match="pass layers="):
        find_layers(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="non-empty"):
        find_layers(nn.Linear(2, 2), layers=[])
