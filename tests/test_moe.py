"""The Mixture-of-Experts layer: HF Qwen3MoeForCausalLM parity (logits, aux loss, loss, gradients, both checkpoint key
forms, save_hf back into transformers), grouped GEMM == loop, capacity dropping, the global-batch balancing loss with a
fake all-reduce, a debug_moe training smoke test, and meta-device parameter counts. CPU, float32."""
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM  # noqa: E402

from qwen3_scratch.model.config import ModelConfig  # noqa: E402
from qwen3_scratch.model.hf import load_hf, save_hf  # noqa: E402
from qwen3_scratch.model.moe import (SparseMoeBlock, expert_capacity, load_balancing_loss,  # noqa: E402
                                     pack_router_stats)
from qwen3_scratch.model.transformer import Qwen3Model  # noqa: E402

CONFIGS = {  # name: HF Qwen3MoeConfig kwargs on top of BASE
    "top2-norm-step1": dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1),
    "top1-nonorm-step2": dict(num_experts=4, num_experts_per_tok=1, norm_topk_prob=False, decoder_sparse_step=2),
    "top4-norm-mlponly": dict(num_experts=8, num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1,
                              mlp_only_layers=[1], tie_word_embeddings=True),
    "top2-nonorm-step2-tied": dict(num_experts=6, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=2,
                                   tie_word_embeddings=True),
}
BASE = dict(vocab_size=211, hidden_size=48, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
            num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
            router_aux_loss_coef=0.02, tie_word_embeddings=False)


def make_hf(name, seed=0):
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**BASE, **CONFIGS[name]}))
    with torch.no_grad():  # norm gains away from one, sharper routers: every parameter matters, loads are uneven
        for n, p in model.named_parameters():
            if "norm" in n: p.normal_(1.0, 0.2)
            elif n.endswith("mlp.gate.weight"): p.mul_(20)
    return model.eval()


def ids_for(batch=2, seq=33, vocab=211, seed=1):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def shifted(ids):
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_parity_logits_aux_loss_grads(name, tmp_path):
    hf = make_hf(name)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path).eval()
    ids = ids_for()
    ref = hf(ids, labels=ids, output_router_logits=True)
    out = ours(ids, labels=shifted(ids))
    assert (out.logits - ref.logits).abs().max() <= 1e-4
    assert abs(out.aux_loss - ref.aux_loss) <= 1e-5
    assert abs(out.loss - ref.loss) <= 1e-5
    ref.loss.backward(); out.loss.backward()
    theirs = dict(hf.named_parameters())
    for n, p in ours.named_parameters():
        hn = "model." + n if "model." + n in theirs else n
        g_ref = theirs[hn].grad
        assert g_ref is not None and p.grad is not None, n
        torch.testing.assert_close(p.grad, g_ref, atol=1e-5, rtol=1e-3, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("name", ["top2-norm-step1", "top4-norm-mlponly"])
def test_padding_mask_aux_loss_matches_hf(name, tmp_path):
    hf = make_hf(name)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path).eval()
    ids, am = ids_for(), torch.ones(2, 33, dtype=torch.long)
    am[1, 20:] = 0
    with torch.no_grad():
        ref = hf(ids, attention_mask=am, output_router_logits=True)
        out = ours(ids, attention_mask=am)
    assert abs(out.aux_loss - ref.aux_loss) <= 1e-5
    assert (out.logits[1, :20] - ref.logits[1, :20]).abs().max() <= 1e-4


def test_checkpoint_key_forms_and_save_hf(tmp_path):
    hf = make_hf("top2-nonorm-step2-tied")
    ids = ids_for()
    with torch.no_grad(): ref = hf(ids).logits
    hf.save_pretrained(tmp_path / "hub")  # transformers 5.17 writes per-expert keys (the Hub form)
    with safe_open(tmp_path / "hub/model.safetensors", framework="pt") as sf:
        keys = set(sf.keys())
    assert "model.layers.1.mlp.experts.5.gate_proj.weight" in keys and not any(k.endswith("gate_up_proj") for k in keys)
    ours = load_hf(tmp_path / "hub").eval()

    # the per-expert form written by hand from the stacked tensors (split gate_up_proj, rename)
    sd = {}
    for k, v in hf.state_dict().items():
        if k.endswith("mlp.experts.gate_up_proj"):
            I = v.shape[1] // 2
            for j in range(v.shape[0]):
                sd[k.replace("gate_up_proj", f"{j}.gate_proj.weight")] = v[j, :I].clone()
                sd[k.replace("gate_up_proj", f"{j}.up_proj.weight")] = v[j, I:].clone()
        elif k.endswith("mlp.experts.down_proj"):
            for j in range(v.shape[0]): sd[k.replace("down_proj", f"{j}.down_proj.weight")] = v[j].clone()
        elif k != "lm_head.weight": sd[k] = v.clone()
    save_hf(ours, tmp_path / "split")
    save_file(sd, tmp_path / "split/model.safetensors", metadata={"format": "pt"})
    with torch.no_grad(): assert (load_hf(tmp_path / "split")(ids).logits - ref).abs().max() <= 1e-4

    # transformers v5's stacked (in-memory) names
    save_hf(ours, tmp_path / "fused")
    save_file({k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"},
              tmp_path / "fused/model.safetensors", metadata={"format": "pt"})
    with torch.no_grad(): assert (load_hf(tmp_path / "fused")(ids).logits - ref).abs().max() <= 1e-4

    # save_hf writes per-expert keys, sharded, and transformers loads them into the same function
    save_hf(ours, tmp_path / "ours", max_shard_size="100KB")
    back = Qwen3MoeForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    with torch.no_grad(): assert (back(ids).logits - ref).abs().max() <= 1e-4
    assert back.config.num_experts == 6 and back.config.decoder_sparse_step == 2 and not back.config.norm_topk_prob

    # a checkpoint with an expert missing names it
    sd.pop("model.layers.1.mlp.experts.2.up_proj.weight")
    save_file(sd, tmp_path / "split/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"experts\.2\.up_proj"): load_hf(tmp_path / "split")


def block(seed=0, **kw):
    cfg = ModelConfig(hidden_size=48, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, vocab_size=97,
                      num_hidden_layers=2, **kw)
    torch.manual_seed(seed)
    b = SparseMoeBlock(cfg)
    b.gate.init_weights(); b.experts.init_weights()
    with torch.no_grad(): b.gate.weight.mul_(20)
    return b


def x_for(n=123, d=48, seed=2):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_grouped_equals_loop():
    if not hasattr(torch, "_grouped_mm"): pytest.skip("torch._grouped_mm not available")
    b, x = block(), x_for()
    res = {}
    for grouped in (False, True):
        b.grouped = grouped
        b.zero_grad()
        xg = x.clone().requires_grad_()
        out, _ = b(xg)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)))
        res[grouped] = (out, xg.grad, *(p.grad.clone() for p in b.parameters()))
    for a, c in zip(res[False], res[True]): torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)


def test_dropping_off_equals_no_capacity_and_drop_count():
    x = x_for(431)
    plain, st = block()(x)
    assert st.dropped == 0 and st.drop_rate == 0
    loose, st_loose = block(moe_drop_tokens=True, moe_capacity_factor=8.0)(x)  # capacity >= every load
    torch.testing.assert_close(loose, plain, atol=1e-6, rtol=1e-6)
    assert st_loose.dropped == 0
    for factor in (0.5, 1.0, 1.25):
        _, s = block(moe_drop_tokens=True, moe_capacity_factor=factor)(x)
        cap = expert_capacity(431, 2, 8, factor)
        assert int(s.dropped) == int((st.load - cap).clamp(min=0).sum())
        assert torch.equal(s.load, st.load.clamp(max=cap))
        assert abs(s.drop_rate - s.dropped / (431 * 2)) < 1e-7


def test_fake_all_reduce_two_ranks_equals_full_batch():
    cfg = ModelConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    torch.manual_seed(0)
    m = Qwen3Model(cfg)
    ids = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(1))

    def router_grads(loss):
        m.zero_grad(); loss.backward()
        return torch.cat([l.mlp.gate.weight.grad.flatten() for l in m.layers])

    full = m(ids).aux_loss
    g_full = router_grads(full)
    with torch.no_grad(): sa, sb = m(ids[:2]).router_stats, m(ids[2:]).router_stats
    va, vb = pack_router_stats(sa), pack_router_stats(sb)
    m.moe_all_reduce = lambda v: v + vb  # rank 0 holds ids[:2] and receives rank 1's sums
    la = m(ids[:2]).aux_loss
    ga = router_grads(la)
    m.moe_all_reduce = lambda v: v + va
    lb = m(ids[2:]).aux_loss
    gb = router_grads(lb)
    torch.testing.assert_close(la, full, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lb, full, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ga + gb, g_full, atol=1e-6, rtol=1e-5)  # the ranks' gradients add up to the full batch's
    m.moe_all_reduce = None
    assert abs(m(ids[:2]).aux_loss - load_balancing_loss(sa, 4)) < 1e-6  # single process: no reduction


def test_debug_moe_trains_on_cpu():
    cfg = ModelConfig.from_preset("debug_moe", vocab_size=512, num_hidden_layers=2, kernels="torch",
                                  gradient_checkpointing=True)
    torch.manual_seed(0)
    m = Qwen3Model(cfg).train()
    ids = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        out = m(ids[:, :-1], labels=ids[:, 1:])
        opt.zero_grad(); out.loss.backward(); opt.step()
        losses.append(out.loss.item())
    assert out.aux_loss is not None and out.expert_load.shape == (2, 8)
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("name", ["debug_moe", "large"])
def test_moe_presets_meta_param_count(name):
    cfg = ModelConfig.from_preset(name)
    with torch.device("meta"): m = Qwen3Model(cfg)
    assert sum(p.numel() for p in m.parameters()) == cfg.total_params_estimate()


@pytest.mark.parametrize("drop", [False, True])
def test_triton_dispatch_combine_in_the_block(drop):
    pytest.importorskip("triton")
    from qwen3_scratch.kernels.utils import interpreting
    if not (torch.cuda.is_available() or interpreting()): pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    res = {}
    for kernels in ("torch", "triton"):
        b = block(moe_drop_tokens=drop, moe_capacity_factor=1.0, kernels=kernels).to(dev)
        x = x_for(42).to(dev).requires_grad_()
        out, st = b(x)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dev))
        res[kernels] = (out, x.grad, *(p.grad for p in b.parameters()), st.load, st.dropped)
    for a, c in zip(res["torch"], res["triton"]): torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA bf16 grouped GEMM: needs a GPU")
@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("drop", [False, True])
def test_cuda_bf16_grouped_matches_loop(kernels, drop):
    "The GPU path (torch._grouped_mm in bf16; Triton or torch permutation) against the per-expert loop on the same input."
    if kernels == "triton": pytest.importorskip("triton")
    from qwen3_scratch.model.moe import can_group
    cfg = dict(moe_drop_tokens=drop, moe_capacity_factor=1.0, kernels=kernels)
    x0 = torch.randn(2048, 48, generator=torch.Generator().manual_seed(5)).cuda().bfloat16()
    dy = torch.randn(2048, 48, generator=torch.Generator().manual_seed(6)).cuda().bfloat16()
    assert can_group(x0, 48, 32), "a bf16 CUDA input should take the grouped path"
    outs = {}
    for grouped in (False, True):  # same weights (same seed), same bf16 routing: only the expert GEMMs differ
        m = block(**cfg).cuda().to(torch.bfloat16)
        m.grouped = grouped
        x = x0.clone().requires_grad_()
        out, st = m(x)
        out.backward(dy)
        outs[grouped] = (out, x.grad, *(p.grad for p in m.parameters()), st.load, st.dropped)
    for a, c in zip(outs[True][:5], outs[False][:5]):
        assert ((a.float() - c.float()).norm() / c.float().norm()).item() < 1e-2
    torch.testing.assert_close(outs[True][5], outs[False][5])  # expert loads
    assert outs[True][6].item() == outs[False][6].item() and (drop or outs[True][6].item() == 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA bf16 grouped GEMM: needs a GPU")
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_cuda_autocast_takes_grouped_path(kernels, monkeypatch):
    "float32 weights under bf16 autocast (how scripts/train.py trains) equal the bf16 block, on the grouped GEMMs."
    if kernels == "triton": pytest.importorskip("triton")
    from qwen3_scratch.model.moe import Experts
    x0 = torch.randn(2048, 48, generator=torch.Generator().manual_seed(5)).cuda()
    dy = torch.randn(2048, 48, generator=torch.Generator().manual_seed(6)).cuda().bfloat16()
    m32 = block(kernels=kernels).cuda()
    m16 = block(kernels=kernels).cuda().to(torch.bfloat16)  # same seed: the same weights, rounded to bf16
    def no_loop(*a): raise AssertionError("the per-expert loop ran: its counts.tolist() stalls the GPU every layer")
    monkeypatch.setattr(Experts, "_loop", no_loop)
    outs = []
    for m, x, amp in ((m32, x0.clone().requires_grad_(), True), (m16, x0.bfloat16().requires_grad_(), False)):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out, _ = m(x)
        out.backward(dy)
        outs.append((out, x.grad, *(q.grad for q in m.parameters())))
    assert outs[0][0].dtype == torch.bfloat16
    for a, c in zip(*outs):
        assert ((a.float() - c.float()).norm() / c.float().norm()).item() < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 HF parity on the GPU")
def test_cuda_bf16_model_matches_hf():
    "Qwen3MoeForCausalLM (grouped_mm experts) and ours on the same weights in bf16 on a GPU: same logits and loss."
    hf = make_hf("top2-norm-step1").cuda().to(torch.bfloat16)
    from qwen3_scratch.model.hf import config_from_hf
    cfg = config_from_hf(hf.config.to_dict()).replace(kernels="auto")
    with torch.device("meta"): ours = Qwen3Model(cfg)
    sd = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    ours.load_state_dict(sd, assign=True, strict=True)
    ours.rotary_emb.inv_freq = torch.empty(cfg.head_dim // 2, device="cuda")
    ours.rotary_emb.reset_parameters()
    ids = torch.randint(0, cfg.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        lh = hf(ids).logits.float()
        lo = ours(ids).logits.float()
    assert ((lo - lh).norm() / lh.norm()).item() < 3e-2
