"""``use_chunked_loss``: HF causal LMs' loss without full logits, vs the unpatched model."""
import pytest
import torch
from torch import nn

from ._models import ARCHS, batch, clone, tiny_model, transformers
from moe_offload.integrations.transformers.loss import use_chunked_loss
from moe_offload.ops.linear_cross_entropy import causal_lm_loss
from transformers.loss.loss_utils import ForCausalLMLoss


def _step(model, ids, **kw):
    """Training forward with labels and the router aux loss; loss, aux, grads."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, output_router_logits=True, use_cache=False, **kw)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _max_grad_err(grads, ref):
    assert grads.keys() == ref.keys()
    return max(_rel_err(grads[n], ref[n]) for n in ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_and_grads_match_unpatched_fp32(arch):
    model = tiny_model(arch, "eager")
    ids = batch()
    ref_out, ref_grads = _step(model, ids)
    handle = use_chunked_loss(model, chunk_tokens=5)            # 32 tokens: 7 chunks, the last of 2
    out, grads = _step(model, ids)
    assert out.logits is None and ref_out.logits is not None
    assert torch.equal(out.aux_loss, ref_out.aux_loss)          # the router aux loss is untouched
    assert _rel_err(out.loss, ref_out.loss) < 1e-6
    assert _max_grad_err(grads, ref_grads) < 1e-5
    handle.remove()


def test_bf16_within_twice_hf_error():
    """bf16 model: |ours - fp32| <= 2 |HF bf16 - fp32| + 1 bf16 ulp, loss and every grad."""
    ids = batch()
    ref = tiny_model("qwen3_moe", "eager", dtype=torch.bfloat16)
    hf_out, hf_grads = _step(ref, ids)
    ours_model = clone(ref)
    use_chunked_loss(ours_model, chunk_tokens=7)
    out, grads = _step(ours_model, ids)
    fp32 = ref.float()
    f_out, f_grads = _step(fp32, ids)
    eps = torch.finfo(torch.bfloat16).eps
    assert _rel_err(out.loss, f_out.loss) <= 2 * _rel_err(hf_out.loss, f_out.loss) + eps
    for n in f_grads:
        assert _rel_err(grads[n], f_grads[n]) <= 2 * _rel_err(hf_grads[n], f_grads[n]) + eps, n


def test_hf_kwargs_num_items_and_shift_labels():
    """``num_items_in_batch`` (HF Trainer's gradient accumulation) and ``shift_labels``."""
    ids = batch()
    labels = ids.clone()
    labels[0, :5] = -100
    shift = torch.roll(ids, -1, 1)
    shift[:, -1] = -100
    model = tiny_model("qwen3_moe", "eager")
    patched = clone(model)
    use_chunked_loss(patched, chunk_tokens=6)
    for kw in (dict(labels=labels, num_items_in_batch=torch.tensor(40)),
               dict(labels=ids, shift_labels=shift), dict(labels=labels, ignore_index=-100)):
        a = model(input_ids=ids, use_cache=False, **kw).loss
        b = patched(input_ids=ids, use_cache=False, **kw).loss
        assert _rel_err(b, a) < 1e-6, kw


def test_causal_lm_loss_matches_hf_loss_function():
    g = torch.Generator().manual_seed(3)
    B, S, H, V = 2, 9, 8, 30
    h = torch.randn(B, S, H, generator=g)
    w = torch.randn(V, H, generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[1, 3:] = -100
    shift = torch.randint(0, V, (B, S), generator=g)
    logits = h @ w.t()
    for kw in ({}, dict(num_items_in_batch=torch.tensor(11)), dict(num_items_in_batch=7),
               dict(shift_labels=shift), dict(shift_labels=shift, num_items_in_batch=5)):
        ref = ForCausalLMLoss(logits, labels, V, **kw)
        torch.testing.assert_close(causal_lm_loss(h, w, labels, chunk_tokens=4, **kw), ref, rtol=1e-6, atol=0)


def test_eval_and_no_grad_unchanged_bitwise():
    model = tiny_model("qwen3_moe", "eager")
    ids = batch()
    with torch.no_grad():
        ref_plain = model(input_ids=ids, use_cache=False)
        ref_labels = model(input_ids=ids, labels=ids, output_router_logits=True, use_cache=False)
    handle = use_chunked_loss(model)
    with torch.no_grad():
        plain = model(input_ids=ids, use_cache=False)
        labelled = model(input_ids=ids, labels=ids, output_router_logits=True, use_cache=False)
    assert torch.equal(plain.logits, ref_plain.logits)
    assert torch.equal(labelled.logits, ref_labels.logits) and torch.equal(labelled.loss, ref_labels.loss)
    out = model(input_ids=ids, use_cache=False)                 # grad enabled, no labels: real logits
    assert torch.equal(out.logits, ref_plain.logits) and out.logits.requires_grad
    handle.remove()


def test_return_dict_false_drops_logits():
    model = tiny_model("qwen3_moe", "eager")
    ids = batch()
    ref = model(input_ids=ids, labels=ids, output_router_logits=True, use_cache=False, return_dict=False)
    use_chunked_loss(model)
    out = model(input_ids=ids, labels=ids, output_router_logits=True, use_cache=False, return_dict=False)
    assert len(out) == len(ref) - 1 and not any(o is None for o in out)
    assert _rel_err(out[0], ref[0]) < 1e-6 and torch.equal(out[1], ref[1])      # loss, aux loss


def test_remove_restores_everything():
    model = tiny_model("qwen3_moe", "eager")
    custom = lambda logits, labels, vocab_size, **kw: ForCausalLMLoss(logits, labels, vocab_size, **kw) * 2
    model.loss_function = custom                                 # a loss the user had set
    keys = list(model.state_dict())
    ids = batch()
    ref, ref_grads = _step(model, ids)
    handle = use_chunked_loss(model)
    assert list(model.state_dict()) == keys
    with pytest.raises(ValueError, match="already active"):
        use_chunked_loss(model)
    out, _ = _step(model, ids)
    assert out.logits is None
    handle.remove()
    handle.remove()                                               # idempotent
    assert list(model.state_dict()) == keys
    assert "forward" not in model.lm_head.__dict__ and model.loss_function is custom
    assert not model._forward_hooks and not model._forward_pre_hooks
    again, grads = _step(model, ids)
    assert torch.equal(again.logits, ref.logits) and torch.equal(again.loss, ref.loss)
    assert all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads)
    fresh = tiny_model("qwen3_moe", "eager")
    use_chunked_loss(fresh).remove()
    assert "_loss_function" not in fresh.__dict__


def test_bad_structure_raises():
    model = tiny_model("qwen3_moe", "eager")
    head = model.lm_head
    model.lm_head = nn.Identity()
    with pytest.raises(ValueError, match="nn.Linear"):
        use_chunked_loss(model)
    model.lm_head = type("QuantLinear", (nn.Linear,), {"forward": lambda self, x: x})(32, 64)
    with pytest.raises(ValueError, match="custom head"):
        use_chunked_loss(model)
    model.lm_head = head
    with pytest.raises(ValueError, match="loss_function"):
        use_chunked_loss(_with_head(nn.Module()))
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="soft-caps"):
        use_chunked_loss(model)


def _with_head(m):
    m.lm_head = nn.Linear(2, 2)
    return m


def test_logits_changed_before_loss_raise():
    """A model that transforms lm_head's output before its loss would get a wrong loss: it raises."""
    model = tiny_model("qwen3_moe", "eager")
    handle = use_chunked_loss(model)
    model.lm_head.register_forward_hook(lambda m, i, o: o * 2)
    ids = batch()
    with pytest.raises(RuntimeError, match="changed lm_head's output"):
        model(input_ids=ids, labels=ids, use_cache=False)
    with torch.no_grad():                                         # disarmed: still works
        assert model(input_ids=ids, use_cache=False).logits is not None
    handle.remove()
