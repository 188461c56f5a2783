"""CUDA graphs of the decoder layers and of the vision encoder (training/cuda_graphs.py): replay equals eager, through
optimizer steps and under autocast, and every call the graphs cannot take is refused or runs eagerly. Also the trace
arithmetic of benchmarks/profile_launch_gaps.py, on a made-up trace."""
import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen3_scratch.model.config import ModelConfig
from qwen3_scratch.model.transformer import Qwen3Model
from qwen3_scratch.training.cuda_graphs import cuda_graph_layers

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
GAPS = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_launch_gaps.py"


def tiny(**kw) -> ModelConfig:
    base = dict(num_hidden_layers=3, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                num_experts=16, num_experts_per_tok=4, moe_intermediate_size=128, vocab_size=512)
    return ModelConfig.from_preset("debug_moe").replace(**{**base, **kw})


def test_refuses_a_model_off_the_gpu():
    m = Qwen3Model(tiny(kernels="torch", num_hidden_layers=1, hidden_size=64, head_dim=16, moe_intermediate_size=32)).train()
    with pytest.raises(ValueError, match=r"model\.cuda\(\)"): cuda_graph_layers(m, 2, 8)


def _train(model, batches, amp, opt):
    "Losses and final parameters after one AdamW step per batch."
    losses = []
    for ids in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@cuda
@pytest.mark.parametrize("case", ["moe_triton_autocast", "moe_torch_bf16", "dense_triton_bf16"])
def test_graphed_training_equals_eager(case):
    moe, kernels, amp = case.startswith("moe"), case.split("_")[1], case.endswith("autocast")
    cfg = tiny(kernels=kernels) if moe else tiny(kernels=kernels, num_experts=0, mlp_only_layers=[])
    torch.manual_seed(0)
    eager = Qwen3Model(cfg).cuda().train()
    if not amp: eager = eager.to(torch.bfloat16)  # bf16 weights; else float32 master weights under bf16 autocast
    graphed = copy.deepcopy(eager)
    g = cuda_graph_layers(graphed, 2, 128, autocast_dtype=torch.bfloat16 if amp else None)
    batches = [torch.randint(0, cfg.vocab_size, (2, 128), device="cuda") for _ in range(3)]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True) for m in (eager, graphed)]
    le, lg = _train(eager, batches, amp, opts[0]), _train(graphed, batches, amp, opts[1])
    # the replays read the weights the optimizer updated in place: losses agree step after step
    assert lg == pytest.approx(le, rel=2e-3), (le, lg)
    for (n, a), b in zip(eager.named_parameters(), graphed.parameters()):
        assert (a.float() - b.float()).norm() <= 2e-2 * a.float().norm() + 1e-4, n
    assert g.replayed == 3 * cfg.num_hidden_layers and g.eager == 0 and not g.pending
    if amp:  # outside the autocast it was recorded under, a step runs eagerly (and correctly)
        ids = batches[0]
        assert graphed(ids, labels=ids).loss.item() == pytest.approx(eager(ids, labels=ids).loss.item(), rel=2e-3)
        assert g.eager == cfg.num_hidden_layers


@cuda
def test_eval_cache_and_masks_run_eagerly():
    cfg = tiny(kernels="auto")
    torch.manual_seed(0)
    m = Qwen3Model(cfg).cuda().to(torch.bfloat16).train()
    g = cuda_graph_layers(m, 2, 64)
    ids = torch.randint(0, cfg.vocab_size, (2, 64), device="cuda")
    with torch.no_grad():
        ref = m(ids).logits.float()                              # replayed, no gradient: nothing pending
        assert g.replayed == cfg.num_hidden_layers and not g.pending
        mask = torch.ones_like(ids); mask[0, :5] = 0
        m(ids, attention_mask=mask)                              # a padding mask: eager
        m.eval(); out = m(ids).logits.float(); m.train()         # eval mode: eager, same function
    assert g.eager == 2 * cfg.num_hidden_layers
    assert (out - ref).abs().max() <= 5e-2 * ref.abs().max()
    g.remove()
    assert not any("forward" in vars(layer) for layer in m.layers)


@cuda
def test_refusals_name_the_fix():
    cfg = tiny(kernels="auto")
    m = Qwen3Model(cfg).cuda().to(torch.bfloat16)
    with pytest.raises(ValueError, match="model.train"): cuda_graph_layers(m.eval(), 2, 64)
    m.train()
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        cuda_graph_layers(Qwen3Model(cfg.replace(gradient_checkpointing=True)).cuda().train(), 2, 64)
    h = m.layers[1].mlp.register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match="layer 1 has module hooks"): cuda_graph_layers(m, 2, 64)
    h.remove()
    m.layers[0].compile()
    with pytest.raises(ValueError, match="layer 0 is torch.compile'd"): cuda_graph_layers(m, 2, 64)
    m2 = Qwen3Model(cfg).cuda().to(torch.bfloat16).train()
    g = cuda_graph_layers(m2, 2, 64)
    with pytest.raises(ValueError, match="already graphed"): cuda_graph_layers(m2, 2, 64)
    ids = torch.randint(0, cfg.vocab_size, (2, 64), device="cuda")
    out = m2(ids, labels=ids)
    with pytest.raises(RuntimeError, match="before the backward"): m2(ids, labels=ids)
    out.loss.backward()
    m2(ids, labels=ids).loss.backward()                          # after the backward: fine again
    assert g.replayed == 2 * cfg.num_hidden_layers


def test_compile_vision_is_reexported():
    from qwen3_scratch.model.vision import encoder
    from qwen3_scratch.training import cuda_graphs
    assert cuda_graphs.compile_vision is encoder.compile_vision  # it moved to the vision module (nbs/08_vision)
    assert cuda_graphs.VISION_INDUCTOR_OPTIONS is encoder.VISION_INDUCTOR_OPTIONS
    assert {"compile_vision", "VISION_INDUCTOR_OPTIONS", "cuda_graph_layers"} <= set(cuda_graphs.__all__)


def _launch_gaps():
    spec = importlib.util.spec_from_file_location("profile_launch_gaps", GAPS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_launch_gap_trace_arithmetic():
    lg = _launch_gaps()
    X = lambda cat, name, ts, dur: {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}
    events = [X("user_annotation", lg.STEP + "0", 100.0, 100.0), X("user_annotation", lg.STEP + "1", 300.0, 100.0),
              X("kernel", "a", 110.0, 10.0), X("kernel", "b", 115.0, 10.0),      # b overlaps a (another stream)
              X("gpu_memset", "Memset", 150.0, 10.0), X("cpu_op", "aten::mm", 120.0, 50.0),  # host work is no GPU time
              X("kernel", "c", 310.0, 20.0), X("user_annotation", "other", 0.0, 1000.0)]
    steps = lg.step_kernels(events)
    assert [[k[2] for k in s] for s in steps] == [["a", "b", "Memset"], ["c"]]
    st = lg.step_stats(steps[0], show=2)
    # span 110..160 us; busy: 110..125 and 150..160 = 25 us (the overlap once); summed kernel time 30 us
    assert (st["profiled_step_ms"], st["busy_ms"], st["kernel_ms"], st["idle_share"], st["n_kernels"]) == (0.05, 0.025, 0.03, 0.5, 3)
    assert st["intervals"] == [[0.0, 10.0, "a"], [5.0, 10.0, "b"]]
    text = lg.dumps({"modes": {"eager": st}})
    assert '[5.0, 10.0, "b"]' in text and json.loads(text)["modes"]["eager"] == st  # one interval a line, same data
    with pytest.raises(RuntimeError, match="no GPU kernels"): lg.step_kernels(events[:2])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on a machine without CUDA")
def test_launch_gaps_script_needs_cuda(tmp_path):
    out = tmp_path / "gaps.json"
    r = subprocess.run([sys.executable, str(GAPS), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "needs a CUDA GPU" in r.stderr and not out.exists()
