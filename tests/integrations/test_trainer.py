"""MoEOffloadCallback / plan_on_first_batch on CPU: a tiny HF Qwen3-MoE trained a few steps
through ``Trainer`` (and TRL's ``SFTTrainer`` when it imports) with and without the plan.

Every comparison is bitwise (``torch.equal``): both runs use our experts
(``use_moe_offload_experts``), the reference without a plan; the plan is transport and exact
recompute.  The learning rate is constant so that a shorter run is a prefix of a longer one.
"""
import os

import pytest
import torch
from torch.utils.data import SequentialSampler

from ._models import VOCAB, tiny_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")           # Trainer needs it
from safetensors.torch import load_file  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import moe_offload  # noqa: E402
from moe_offload.integrations.transformers import (FirstBatchPlanner, MoEOffloadCallback,  # noqa: E402
                                                   plan_on_first_batch)
from moe_offload.plan import Choice, make_plan, measure_model, plan_memory  # noqa: E402

PLAN = dict(min_offload_bytes=1024, iters=1, warmup=0)
EXACT = dict(exact=True, plan_kwargs=PLAN)
# micro-batch lengths (2 sequences each): the 4th, second of step 2, is longer -> re-plan in
# the middle of gradient accumulation
LENGTHS = [16, 16, 16, 24, 16, 16, 16, 16]


pytestmark = pytest.mark.usefixtures("one_thread")


def examples(lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for S in lengths:
        for _ in range(2):
            ids = torch.randint(0, VOCAB, (S,), generator=g)
            out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def collate(feats):
    """Dynamic padding to the longest sequence of the batch."""
    B, S = len(feats), max(len(f["input_ids"]) for f in feats)
    ids = torch.zeros(B, S, dtype=torch.long)
    labels = torch.full((B, S), -100, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.long)
    for i, f in enumerate(feats):
        n = len(f["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = f["input_ids"], f["labels"], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class Recording(Trainer):
    """Keeps every micro-batch's training loss (the tensor, not the rounded log); batches in
    dataset order (on every transformers 5.x)."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.losses.append(loss.detach().clone())
        return loss


class Probe(TrainerCallback):
    """Records, after each optimizer step and at each save, what the callback has applied."""

    def __init__(self, cb=None):
        self.cb, self.steps, self.saves = cb, [], []

    def _seen(self, model):
        return dict(plan=self.cb.plan if self.cb else None,
                    shape=self.cb.planner.planned_shape if self.cb else None,
                    installed=installed(model),
                    hf_ckpt=hf_checkpointing(model),
                    experts=model.config._experts_implementation)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append(self._seen(model))

    def on_save(self, args, state, control, model=None, **kwargs):
        self.saves.append(self._seen(model))


def train(tmp, cb=None, *, steps=4, lengths=LENGTHS, impl=None, resume=None, **args):
    """A ``Recording`` trainer run; ``impl`` default: ours without the callback, HF's
    ``grouped_mm`` with it (the callback switches)."""
    model = tiny_model("qwen3_moe", impl=impl or ("grouped_mm" if cb else "moe_offload"))
    kw = dict(max_steps=steps, per_device_train_batch_size=2, gradient_accumulation_steps=2,
              logging_steps=1, report_to=[], use_cpu=True,
              learning_rate=1e-2, lr_scheduler_type="constant", seed=0, disable_tqdm=True,
              save_strategy="no")
    kw.update(args)
    probe = Probe(cb)
    trainer = Recording(model=model, args=TrainingArguments(str(tmp), **kw),
                        train_dataset=examples(lengths), eval_dataset=examples([16], seed=9),
                        data_collator=collate, callbacks=([cb] if cb else []) + [probe])
    trainer.losses = []
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model, probe


def same_losses(a, b):
    assert len(a) == len(b) and len(a) > 0
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"micro-batch {i}: {x.item()!r} != {y.item()!r}"


def same_state(sd_a, sd_b):
    assert list(sd_a) == list(sd_b)
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k


def hf_checkpointing(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def _ours(fn) -> bool:
    fn = getattr(fn, "func", fn)                   # functools.partial
    fn = getattr(fn, "__func__", fn)               # bound method
    return getattr(fn, "__module__", "").startswith("moe_offload")


def installed(model) -> list:
    """Names of the modules carrying a hook or forward wrapper of ours (HF's own
    output-capturing hooks and TRL's replaced forward are theirs)."""
    return [name for name, m in model.named_modules()
            if _ours(m.__dict__.get("forward"))
            or any(_ours(h) for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values()))]


def clean(model):
    assert installed(model) == []


@pytest.fixture(scope="module")
def budget():
    """Three quarters of the activations without a plan at 2 x 16 tokens: a plan must act
    there, and 2 x 24 tokens still fit with more recompute/offload."""
    model = tiny_model("qwen3_moe")
    b = collate(examples([16])[:2])
    _, f = measure_model(model, lambda: model(**b).loss, **PLAN)
    return int(0.75 * f.act_none_bytes)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return train(tmp_path_factory.mktemp("ref"), eval_strategy="steps", eval_steps=2,
                 save_strategy="steps", save_steps=2)


@pytest.fixture(scope="module")
def planned(tmp_path_factory, budget):
    cb = MoEOffloadCallback(budget, **EXACT)
    logged = []
    cb.logger = type("L", (), {"info": staticmethod(logged.append)})()
    out = train(tmp_path_factory.mktemp("cb"), cb, eval_strategy="steps", eval_steps=2,
                save_strategy="steps", save_steps=2, eval_on_start=True)
    return out + (cb, logged)


def test_losses_weights_and_evals_bitwise(reference, planned):
    ref, ref_model, _ = reference
    got, got_model, _, _, _ = planned
    same_losses(ref.losses, got.losses)
    same_state(ref_model.state_dict(), got_model.state_dict())
    evals = lambda t: [h["eval_loss"] for h in t.state.log_history if "eval_loss" in h]  # noqa: E731
    assert len(evals(got)) == len(evals(ref)) + 1          # eval_on_start: before any plan
    assert evals(got)[1:] == evals(ref)


def test_plan_applied_then_removed(planned):
    _, model, probe, cb, _ = planned
    assert all(s["plan"] is not None and s["installed"] for s in probe.steps)
    assert all(s["experts"] == "moe_offload" for s in probe.steps)
    plan = probe.steps[0]["plan"]
    assert any(c.recompute != "none" or c.offload for c in plan.choices), "the budget forced no plan"
    assert cb.plan is None and cb.planner.handle is None
    assert model.config._experts_implementation == "grouped_mm"
    clean(model)


def test_longer_batch_replans_once(planned):
    _, _, probe, cb, logged = planned
    # step 1 planned 2 x 16; the 24-token micro-batch of step 2 (after its first micro-batch's
    # backward: gradients were accumulating) re-planned for max(24, ceil(1.25 * 16)) = 24; the
    # evaluations (no_grad) planned nothing
    assert [s["shape"] for s in probe.steps] == [(2, 16)] + [(2, 24)] * 3
    assert cb.planner.plans_made == 2
    assert probe.steps[0]["plan"] is not probe.steps[1]["plan"]
    assert probe.steps[1]["plan"] is probe.steps[3]["plan"]
    assert len(logged) == 2 and all("MemoryPlan:" in t for t in logged)
    assert "planned for batch 2 x 16" in logged[0] and "re-planned for batch 2 x 24" in logged[1]


def test_offload_stats_in_logs(tmp_path, planned):
    logs = [h for h in planned[0].state.log_history if "loss" in h]
    assert len(logs) == 4
    for h in logs:
        for k in ("offloaded_bytes", "reloaded_bytes", "forced_waits", "inline_reloads"):
            assert "moe_offload/" + k in h
    assert [h["moe_offload/plans"] for h in logs] == [1, 2, 2, 2]
    # A plan that must offload: recompute options left out, a budget between the least peak
    # and no plan's
    model = tiny_model("qwen3_moe")
    b = collate(examples([16])[:2])
    figs = measure_model(model, lambda: model(**b).loss, options=("none",), **PLAN)
    none = make_plan(model, figs, [Choice("none", 0)] * 2).prediction.peak_bytes
    least = plan_memory(model, None, None, max_time_x=1e9, figures=figs, exact=True).prediction.peak_bytes
    assert least < none
    cb = MoEOffloadCallback((least + none) // 2, exact=True,
                            plan_kwargs=dict(PLAN, options=("none",)))
    got, _, probe = train(tmp_path, cb, lengths=[16] * 8, steps=3)
    assert all(c.recompute == "none" for c in probe.steps[0]["plan"].choices)
    logs = [h for h in got.state.log_history if "loss" in h]
    moved = [h["moe_offload/offloaded_bytes"] for h in logs]
    # each interval's own counters (reset after each log): every step moves the same bytes
    assert moved[0] > 0 and moved == [moved[0]] * 3
    assert [h["moe_offload/reloaded_bytes"] for h in logs] == moved


def test_checkpoints_identical(reference, planned):
    ref_dir, got_dir = reference[0].args.output_dir, planned[0].args.output_dir
    probe = planned[2]
    assert len(probe.saves) == 2 and all(s["plan"] is not None for s in probe.saves)
    for step in (2, 4):
        a = load_file(os.path.join(ref_dir, f"checkpoint-{step}", "model.safetensors"))
        b = load_file(os.path.join(got_dir, f"checkpoint-{step}", "model.safetensors"))
        assert sorted(a) == sorted(b)
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_resume_from_checkpoint(tmp_path, planned, budget):
    # (Trainer's own resume is not bitwise the uninterrupted run: compare resumed with resumed)
    ckpt = os.path.join(planned[0].args.output_dir, "checkpoint-2")
    ref, ref_model, _ = train(tmp_path / "ref", resume=ckpt)
    cb = MoEOffloadCallback(budget, **EXACT)
    got, model, probe = train(tmp_path / "cb", cb, resume=ckpt)
    assert len(got.losses) == 4
    same_losses(ref.losses, got.losses)
    same_state(ref_model.state_dict(), model.state_dict())
    assert probe.steps and all(s["plan"] is not None for s in probe.steps)
    clean(model)


def test_hf_gradient_checkpointing_off_while_planned(tmp_path, reference, budget):
    cb = MoEOffloadCallback(budget, **EXACT)
    got, model, probe = train(tmp_path, cb, steps=2, gradient_checkpointing=True)
    same_losses(reference[0].losses[:4], got.losses)
    assert all(s["plan"] is not None and not s["hf_ckpt"] for s in probe.steps)
    assert all(l.gradient_checkpointing for l in model.model.layers)     # restored at the end


def test_max_seq_len_plans_once(tmp_path, reference, budget):
    cb = MoEOffloadCallback(2 * budget, max_seq_len=32, **EXACT)
    got, _, probe = train(tmp_path, cb, steps=2)
    same_losses(reference[0].losses[:4], got.losses)
    assert cb.planner.plans_made == 1
    assert [s["shape"] for s in probe.steps] == [(2, 32)] * 2


def test_sft_trainer(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t1"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="t0", eos_token="t2", unk_token="t1")
    g = torch.Generator().manual_seed(3)
    ds = datasets.Dataset.from_dict(
        {"input_ids": [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (15, 9, 12, 15)]})

    def run(sub, cb):
        model = tiny_model("qwen3_moe", impl="grouped_mm" if cb else "moe_offload")
        cfg = trl.SFTConfig(str(tmp_path / sub), max_steps=2, per_device_train_batch_size=2,
                            logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                            learning_rate=1e-2, save_strategy="no")
        t = trl.SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                           callbacks=[cb] if cb else [])
        t.train()
        return t, model
    ref, ref_model = run("ref", None)
    cb = MoEOffloadCallback(150_000, **EXACT)
    got, model = run("cb", cb)
    same_state(ref_model.state_dict(), model.state_dict())
    assert [h["loss"] for h in ref.state.log_history if "loss" in h] == \
        [h["loss"] for h in got.state.log_history if "loss" in h]
    assert cb.planner.plans_made == 1 and cb.planner.planned_shape == (2, 15)
    assert any("moe_offload/offloaded_bytes" in h for h in got.state.log_history)
    clean(model)


def test_plain_loop(tmp_path, budget):
    batches = [collate(examples([S])[:2]) for S in (16, 16, 24)]

    def run(planned: bool):
        model = tiny_model("qwen3_moe")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses, saved = [], None
        ctx = plan_on_first_batch(model, opt, budget_bytes=budget, **EXACT) if planned \
            else FirstBatchPlanner(experts=False)      # unattached: a no-op context
        with ctx:
            for i, b in enumerate(batches):
                loss = model(**b).loss
                loss.backward()
                losses.append(loss.detach())
                opt.step()
                opt.zero_grad()
                if i == 1:
                    model.save_pretrained(tmp_path / f"saved{int(planned)}")
                    saved = load_file(str(tmp_path / f"saved{int(planned)}" / "model.safetensors"))
            plans = ctx.plans_made
        return model, losses, saved, plans
    ref_model, ref_losses, ref_saved, _ = run(False)
    model, losses, saved, plans = run(True)
    same_losses(ref_losses, losses)
    same_state(ref_model.state_dict(), model.state_dict())
    same_state(dict(sorted(ref_saved.items())), dict(sorted(saved.items())))
    assert plans == 2
    clean(model)


def test_errors(budget):
    with pytest.raises(ValueError, match="budget_bytes"):
        MoEOffloadCallback(-1)
    with pytest.raises(ValueError, match="growth"):
        FirstBatchPlanner(growth=0.5)
    with pytest.raises(ValueError, match="max_seq_len"):
        FirstBatchPlanner(max_seq_len=0)
    model = tiny_model("qwen3_moe")
    ids = collate(examples([16])[:2])["input_ids"]
    with plan_on_first_batch(model, budget_bytes=budget, **EXACT) as planner:
        with pytest.raises(RuntimeError, match="already attached"):
            planner.attach(model)
        with torch.no_grad():
            model(input_ids=ids)                  # no grad: nothing planned
        assert planner.plan is None
        with pytest.raises(ValueError, match="no loss"):
            model(input_ids=ids)                  # no labels: nothing to measure
        assert planner.plan is None
    clean(model)


def test_fit_path(tmp_path, reference):
    """``fit`` (no budget): device memory given on the CPU, the trainer's optimizer counted."""
    sb = moe_offload.step_budget(tiny_model("qwen3_moe"), device_memory_bytes=1 << 40, reserve_bytes=0)
    static = sb.param_bytes * 4            # params, grads, AdamW's two states (fp32)
    cb = MoEOffloadCallback(device_memory_bytes=static + 2 * 150_000, reserve_bytes=0, **EXACT)
    got, model, probe = train(tmp_path, cb, steps=2)
    same_losses(reference[0].losses[:4], got.losses)
    assert all(s["plan"] is not None for s in probe.steps)
    plan = probe.steps[-1]["plan"]
    assert 2 * 150_000 <= plan.budget_bytes < static and plan.predicted_peak_bytes <= plan.budget_bytes
    clean(model)
    cb = MoEOffloadCallback(device_memory_bytes=static + 1000, reserve_bytes=0, **EXACT)
    with pytest.raises(ValueError, match="missing"):
        train(tmp_path / "small", cb, steps=1)
    assert cb.planner.model is None and cb.plan is None       # removed on the error
