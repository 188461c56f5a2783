"""AdamW parameter groups (dense/MoE, tied/untied, frozen), exact decoupled decay step; cosine and WSD schedules, resume."""
import copy
import math

import pytest
import torch

from qwen3_scratch.model.config import ModelConfig
from qwen3_scratch.model.transformer import Qwen3Model
from qwen3_scratch.training.optimizer import build_optimizer, group_sizes, param_groups
from qwen3_scratch.training.scheduler import SCHEDULES, build_scheduler, cosine_lr, lr_fn, wsd_decay_start, wsd_lr


def tiny(**kw):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=16, intermediate_size=48, moe_intermediate_size=16, kernels="torch", **kw)
    m = Qwen3Model(cfg); m.init_weights(); return m


def names(model):
    d, n = param_groups(model)
    return set(d["names"]), set(n["names"])


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("tied", [True, False])
def test_groups(moe, tied):
    kw = dict(num_experts=4, num_experts_per_tok=2) if moe else {}
    m = tiny(tie_word_embeddings=tied, **kw)
    decay, no_decay = names(m)
    all_names = {n for n, _ in m.named_parameters()}
    assert decay | no_decay == all_names and not decay & no_decay
    assert "embed_tokens.weight" in no_decay
    assert all(p.ndim >= 2 for n, p in m.named_parameters() if n in decay)
    assert all(p.ndim == 1 for n, p in m.named_parameters() if n in no_decay and n != "embed_tokens.weight")
    assert all("norm" in n for n in no_decay - {"embed_tokens.weight"})
    assert ("lm_head.weight" in decay) == (not tied)
    if moe:
        for i in range(2):
            assert {f"layers.{i}.mlp.experts.gate_up_proj", f"layers.{i}.mlp.experts.down_proj",
                    f"layers.{i}.mlp.gate.weight"} <= decay
    s = group_sizes(build_optimizer(m, lr=1e-3))
    assert s["decay_tensors"] == len(decay) and s["no_decay_tensors"] == len(no_decay)
    assert s["decay_numel"] + s["no_decay_numel"] == sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("moe", [False, True])
def test_zero_grad_step_is_pure_decay(moe):
    kw = dict(num_experts=4, num_experts_per_tok=2) if moe else {}
    m = tiny(tie_word_embeddings=False, **kw)
    lr, wd = 3e-2, 0.1
    opt = build_optimizer(m, lr=lr, weight_decay=wd)
    assert opt.param_groups[0]["betas"] == (0.9, 0.95) and opt.param_groups[0]["eps"] == 1e-8
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for p in m.parameters(): p.grad = torch.zeros_like(p)
    opt.step()
    decay, _ = names(m)
    for n, p in m.named_parameters():
        want = before[n] * (1 - lr * wd) if n in decay else before[n]
        assert torch.equal(p.detach(), want), n  # exact: same float ops as AdamW's p.mul_(1 - lr * wd)


def test_frozen_excluded_and_no_trainable_error():
    m = tiny()
    m.embed_tokens.weight.requires_grad_(False)
    m.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    decay, no_decay = names(m)
    assert "embed_tokens.weight" not in no_decay and "layers.0.self_attn.q_proj.weight" not in decay
    assert len(decay | no_decay) == sum(p.requires_grad for p in m.parameters())
    m.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"): build_optimizer(m, lr=1e-3)


def test_fused_choice():
    m = tiny()
    assert build_optimizer(m, lr=1e-3).defaults["foreach"] is True
    with pytest.raises(ValueError, match="CUDA"): build_optimizer(m, lr=1e-3, fused=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_on_cuda():
    assert build_optimizer(tiny().cuda(), lr=1e-3).defaults["fused"] is True


W, T = 100, 1000


def test_cosine_values():
    assert math.isclose(cosine_lr(0, W, T), 1 / (W + 1))
    assert cosine_lr(W, W, T) == 1.0
    assert math.isclose(cosine_lr((W + T) // 2, W, T), 0.55)
    assert cosine_lr(T, W, T) == 0.1 and cosine_lr(2 * T, W, T) == 0.1
    f = [cosine_lr(s, W, T) for s in range(T + 1)]
    assert all(b > a for a, b in zip(f[:W], f[1:W + 1])) and all(b < a for a, b in zip(f[W:T], f[W + 1:]))


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_wsd_values(shape):
    start = wsd_decay_start(T, 0.2)
    assert start == 800
    f = [wsd_lr(s, W, T, decay_shape=shape) for s in range(T + 1)]
    assert f[0] == cosine_lr(0, W, T)
    assert all(v == 1.0 for v in f[W:start + 1])                  # plateau exact (decay p = 0 at `start`)
    assert math.isclose(f[900], 0.55) and f[T] == 0.1
    assert all(b > a for a, b in zip(f[:W], f[1:W + 1])) and all(b < a for a, b in zip(f[start:T], f[start + 1:]))


@pytest.mark.parametrize("kind", SCHEDULES)
def test_scheduler_follows_and_resumes(kind):
    def make():
        p = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.AdamW([p], lr=1e-3)
        return p, opt, build_scheduler(opt, kind, warmup_steps=10, total_steps=100, decay_shape="cosine")

    p, opt, sch = make()
    fn, lrs = lr_fn(kind, 10, 100, decay_shape="cosine"), []
    for i in range(40):
        lrs.append(opt.param_groups[0]["lr"]); p.grad = torch.ones_like(p); opt.step(); sch.step()
    assert lrs == pytest.approx([1e-3 * fn(s) for s in range(40)], rel=1e-12)
    saved = copy.deepcopy((opt.state_dict(), sch.state_dict()))
    ref = []
    for _ in range(70): p.grad = torch.ones_like(p); opt.step(); sch.step(); ref.append(opt.param_groups[0]["lr"])
    p2, opt2, sch2 = make()
    opt2.load_state_dict(saved[0]); sch2.load_state_dict(saved[1])
    got = []
    for _ in range(70): p2.grad = torch.ones_like(p2); opt2.step(); sch2.step(); got.append(opt2.param_groups[0]["lr"])
    assert got == ref and ref[-1] == pytest.approx(1e-4)


def test_scheduler_errors():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))], lr=1e-3)
    with pytest.raises(ValueError, match=r"valid ones are \('cosine', 'wsd'\)"): build_scheduler(opt, "step", 10, 100)
    with pytest.raises(ValueError, match=r"warmup_steps \(200\) > total_steps \(100\)"): build_scheduler(opt, "cosine", 200, 100)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"): build_scheduler(opt, "wsd", -5, 100)
    with pytest.raises(ValueError, match="step must be >= 0"): wsd_lr(-1, 10, 100)
    with pytest.raises(ValueError, match="decay phase"): build_scheduler(opt, "wsd", 90, 100)
    with pytest.raises(ValueError, match="decay_frac"): build_scheduler(opt, "wsd", 10, 100, decay_frac=0)
    with pytest.raises(ValueError, match=r"valid ones are \('linear', 'cosine'\)"):
        build_scheduler(opt, "wsd", 10, 100, decay_shape="exp")
