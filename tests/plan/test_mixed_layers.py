"""Per-layer options: a model whose layers differ (a dense first layer among MoE layers, as
DeepSeek's first dense layers or Qwen3's ``mlp_only_layers``) gets, per layer, the options
that apply to it -- one dense layer no longer removes the MoE options from every layer."""
import pytest
import torch

from moe_offload import plan_memory
from moe_offload.plan import Choice, measure_model
from moe_offload.plan.memory_plan import candidates
from moe_offload.plan.modules import options_for

from ._models import bitwise, grads

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
THRESHOLD = 1024


def _plans_are_bitwise(model, step, figs, ref) -> None:
    """The exact plans of least peak (any, and one that offloads) keep every gradient
    bitwise; the model is as before once they are removed."""
    cands = candidates(figs[1], exact=True)
    for target in (min(cands, key=lambda c: c.peak_bytes),
                   min((c for c in cands if sum(c.moved_bytes)), key=lambda c: c.peak_bytes)):
        plan = plan_memory(model, step, target.peak_bytes, figures=figs, min_offload_bytes=THRESHOLD,
                           exact=True)
        handle = plan.apply()
        try:
            assert bitwise(grads(model, step), ref), plan.describe()
        finally:
            handle.remove()
    assert bitwise(grads(model, step), ref)


def _dense_first(layers=3, tokens=32):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, num_experts=8, num_experts_per_tok=2, output_router_logits=True,
                         router_aux_loss_coef=0.01, max_position_embeddings=256, mlp_only_layers=[0])
    cfg._attn_implementation = "sdpa"
    cfg._experts_implementation = "grouped_mm"
    model = Qwen3MoeForCausalLM(cfg).float()
    ids = torch.randint(0, 128, (1, tokens), generator=torch.Generator().manual_seed(1))
    return model, lambda: model(input_ids=ids, labels=ids).loss


def test_dense_layer_keeps_moe_options_on_the_other_layers():
    model, step = _dense_first()
    layers = model.model.layers
    assert "norms+experts" not in options_for(layers[0])
    assert "norms+experts" in options_for(layers[1])
    ref = grads(model, step)
    figs = measure_model(model, step, min_offload_bytes=THRESHOLD, iters=1, warmup=0)
    f = figs[1]
    assert "norms+experts" not in f.layers[0].groups and "norms+experts" in f.layers[2].groups
    uses = {c.choices for c in candidates(f)}
    # the MoE option on the MoE layers, the dense layer on what it has
    assert any(ch[1].recompute == "norms+experts" and ch[2].recompute == "norms+experts"
               for ch in uses)
    assert all(c.recompute in lf.groups for ch in uses for c, lf in zip(ch, f.layers))
    _plans_are_bitwise(model, step, figs, ref)


class _TitanAttention(torch.nn.Module):
    def __init__(self, h, heads):
        super().__init__()
        self.heads = heads
        self.wq, self.wk, self.wv, self.wo = (torch.nn.Linear(h, h, bias=False) for _ in range(4))

    def forward(self, x):
        B, S, H = x.shape
        q, k, v = (w(x).view(B, S, self.heads, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, S, H))


class _TitanBlock(torch.nn.Module):
    """torchtitan's TransformerBlock shape: attention_norm, attention, ffn_norm, and a MoE
    (ours) or a dense feed_forward."""

    def __init__(self, h, moe: bool):
        super().__init__()
        from moe_offload import MoE
        self.attention_norm, self.ffn_norm = torch.nn.RMSNorm(h), torch.nn.RMSNorm(h)
        self.attention = _TitanAttention(h, 4)
        if moe:
            self.moe = MoE(h, 2 * h, 4, 2)
        else:
            self.feed_forward = torch.nn.Sequential(torch.nn.Linear(h, 2 * h), torch.nn.SiLU(),
                                                    torch.nn.Linear(2 * h, h))

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x))
        ff = self.moe if hasattr(self, "moe") else self.feed_forward
        return x + ff(self.ffn_norm(x))


class _Titan(torch.nn.Module):
    def __init__(self, h=32, n=3, vocab=64):
        super().__init__()
        self.tok_embeddings = torch.nn.Embedding(vocab, h)
        self.layers = torch.nn.ModuleDict({str(i): _TitanBlock(h, moe=i > 0) for i in range(n)})
        self.norm = torch.nn.RMSNorm(h)
        self.output = torch.nn.Linear(h, vocab, bias=False)

    def forward(self, ids):
        x = self.tok_embeddings(ids)
        for layer in self.layers.values():
            x = layer(x)
        return self.output(self.norm(x))


def test_torchtitan_style_model_with_the_loss_outside_is_planned_and_bitwise():
    torch.manual_seed(0)
    model = _Titan()
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(3))

    def step():              # the loss lives outside the model, as in torchtitan's train loop
        logits = model(ids)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
    ref = grads(model, step)
    figs = measure_model(model, step, min_offload_bytes=THRESHOLD, iters=1, warmup=0)
    layers, f = figs
    assert len(layers) == 3 and all(a is b for a, b in zip(layers, model.layers.values()))
    assert "norms+fc1" not in f.layers[0].groups and "norms+fc1" in f.layers[1].groups
    assert set(f.heads) == {"none"}                  # no HF loss to checkpoint or chunk
    _plans_are_bitwise(model, step, figs, ref)


def _deepseek_v2():
    """DeepSeek-V2's shape: MLA attention (its own q/kv LayerNorms inside), shared experts
    beside the routed ones, the first layer dense."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM
    torch.manual_seed(0)
    cfg = DeepseekV2Config(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                           n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2,
                           first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
                           qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                           max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    return DeepseekV2ForCausalLM(cfg).float()


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                        num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.02,
                        max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    return MixtralForCausalLM(cfg).float()


@pytest.mark.parametrize("build", [_deepseek_v2, _mixtral], ids=["deepseek_v2", "mixtral"])
def test_hugging_face_moe_families_are_planned_per_layer_and_bitwise(build):
    model = build()
    ids = torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(1))

    def step():
        return model(input_ids=ids, labels=ids).loss
    ref = grads(model, step)
    figs = measure_model(model, step, min_offload_bytes=THRESHOLD, iters=1, warmup=0)
    layers, f = figs
    assert layers is model.model.layers
    offered = [set(options_for(layer)) for layer in layers]
    assert all(set(lf.groups) == o for lf, o in zip(f.layers, offered))
    assert all(c.recompute in lf.groups for p in candidates(f, exact=True)
               for c, lf in zip(p.choices, f.layers))
    _plans_are_bitwise(model, step, figs, ref)
