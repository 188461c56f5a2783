#!/usr/bin/env python
"""Qwen3-MoE on one GPU: our SparseMoeBlock and model against transformers', same weights, same run.

    python benchmarks/bench_moe.py                      # block + 12-layer model, writes benchmarks/moe.md
    python benchmarks/bench_moe.py --only block --out /tmp/moe.md
    python benchmarks/bench_moe.py --smoke              # tiny shapes on the CPU: checks the script, times nothing real

Block: one MoE feed-forward, forward + backward, bf16, 64 experts top-8, hidden 1024, moe_intermediate 384, 8192 tokens.
transformers 5.17 has two expert implementations: "eager" (a Python loop over the experts that got tokens, what a
bare `Qwen3MoeSparseMoeBlock` runs) and "grouped_mm" (what `from_config` / `from_pretrained` pick on a GPU); both
are timed. Ours: the same block with PyTorch permutation ops or the Triton dispatch/combine kernels, experts as two
`torch._grouped_mm` calls, and the Triton variant under torch.compile; in the model, also the Triton variant with each
decoder layer's forward and backward replayed as CUDA graphs (`cuda_graph_layers`, nbs/27_cuda_graphs).
Model: a 12-layer model of the same MoE shape (16 Q / 8 KV heads of 128, vocab 151936, untied), one training step
(forward + backward of the LM loss) on B4 x S2048; tokens/s and MFU of the active parameters against the GPU's dense
bf16 datasheet peak. Every number is the median over --rounds interleaved rounds of --reps timed calls (CUDA events,
synchronised, after warm-up). Outputs are compared before timing.
"""
import argparse
import copy
import datetime
import gc
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available(): os.environ.setdefault("TRITON_INTERPRET", "1")  # --smoke: Triton's CPU interpreter
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import PEAK_BF16, flops_per_token, profile_table, timed  # noqa: E402
from qwen3_scratch.model.config import ModelConfig  # noqa: E402
from qwen3_scratch.model.hf import config_to_hf  # noqa: E402
from qwen3_scratch.model.moe import SparseMoeBlock  # noqa: E402
from qwen3_scratch.model.transformer import Qwen3Model  # noqa: E402


def moe_config(a, kernels: str) -> ModelConfig:
    "The benchmark's MoE shape (the issue's): 64 experts top-8, d=1024, moe_intermediate 384."
    c = ModelConfig.from_preset("debug_moe").replace(
        hidden_size=1024, num_hidden_layers=a.layers, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        num_experts=64, num_experts_per_tok=8, moe_intermediate_size=384, intermediate_size=3072,
        max_position_embeddings=max(4096, a.seq), kernels=kernels)
    if a.smoke: c = c.replace(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, vocab_size=512)
    return c


def hf_config(cfg: ModelConfig, experts_impl: str):
    from transformers import Qwen3MoeConfig
    kw = {k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "model_type")}
    hc = Qwen3MoeConfig(**kw, attn_implementation="sdpa")
    hc._experts_implementation = experts_impl
    return hc


def interleave(impls: dict, make, warmup: int, reps: int, rounds: int, device: str) -> tuple[dict, dict]:
    """Median ms of each implementation, rounds interleaved so drift hits all alike, and the GiB its step takes above
    what was resident before it (weights; a graphed model adds its graphs' memory, which stays between steps)."""
    times, mem = {k: [] for k in impls}, {}
    for r in range(rounds):
        for name, m in impls.items():
            gc.collect()
            if device == "cuda": torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
            times[name] += timed(make(m), warmup if r == 0 else 1, reps)
            if device == "cuda":
                peak = (torch.cuda.max_memory_allocated() - base) / 2**30 + getattr(m, "graph_gib", 0.0)
                mem[name] = max(mem.get(name, 0.0), peak)
        print(f"round {r + 1} done", flush=True)
    return {k: statistics.median(v) for k, v in times.items()}, mem


def bench_block(a, device, dtype):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    cfg = moe_config(a, "torch")
    T, d = (a.tokens if not a.smoke else 256), cfg.hidden_size
    torch.manual_seed(0)
    ours_t = SparseMoeBlock(cfg).to(device, dtype)
    ours_t.gate.init_weights(); ours_t.experts.init_weights()
    hf = {}
    for impl in ("eager", "grouped_mm"):
        with torch.device(device): blk = Qwen3MoeSparseMoeBlock(hf_config(cfg, impl)).to(dtype)
        blk.load_state_dict(ours_t.state_dict())  # same names: gate.weight, experts.gate_up_proj, experts.down_proj
        hf[impl] = blk
    impls = {"transformers, eager experts (loop)": hf["eager"], "transformers, grouped_mm experts": hf["grouped_mm"],
             "ours, PyTorch permutation": ours_t}
    if device == "cuda" or a.smoke:
        ours_k = copy.deepcopy(ours_t); ours_k.kernels = "triton"
        impls["ours, Triton dispatch/combine"] = ours_k
        if not a.no_compile and device == "cuda":
            ours_c = copy.deepcopy(ours_k); ours_c.compile(dynamic=False)
            impls["ours, Triton + torch.compile"] = ours_c
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, T, d, device=device, dtype=dtype, generator=g).requires_grad_()
    dy = torch.randn(1, T, d, device=device, dtype=dtype, generator=g)

    def call(m, x):
        out = m(x)
        return out[0] if isinstance(out, tuple) else out  # ours returns (out, MoEStats)
    with torch.no_grad():  # same function: outputs within bf16 noise of each other
        ref = call(impls["transformers, eager experts (loop)"], x).float()
        for name, m in impls.items():
            out = call(m, x).float()
            rel = ((out - ref).norm() / ref.norm()).item()
            print(f"block output vs transformers eager: {name}: rel {rel:.2e}")
            assert rel < 2e-2, f"{name} disagrees with transformers ({rel:.2e})"

    def fwd_bwd(m):
        def f():
            x.grad = None
            call(m, x).backward(dy)
            for p in m.parameters(): p.grad = None
        return f
    t, mem = interleave(impls, fwd_bwd, 3, a.reps, a.rounds, device)
    base = t["transformers, eager experts (loop)"]
    base_g = t["transformers, grouped_mm experts"]
    name = f"MoE block fwd+bwd, {T} tokens, E{cfg.num_experts} top-{cfg.num_experts_per_tok}, d{d}, I{cfg.moe_intermediate_size}"
    # FLOPs: 3 matmuls of T*k rows (gate+up: 2I, down: I), forward 2*(3*d*I) per copy, backward twice that
    flops = 3 * 2 * 3 * d * cfg.moe_intermediate_size * T * cfg.num_experts_per_tok
    rows = [f"| {name} | {k} | {ms:.3f} | {flops / ms / 1e9:.0f} | {base / ms:.2f}x | {base_g / ms:.2f}x | {mem.get(k, 0):.2f} |"
            for k, ms in t.items()]
    if a.profile and "ours, Triton dispatch/combine" in impls:
        rows += ["", "Where the time goes in `ours, Triton dispatch/combine` (torch.profiler, GPU kernels):", ""]
        rows += profile_table(fwd_bwd(impls["ours, Triton dispatch/combine"]))
    return ["| benchmark | implementation | median ms | expert TFLOP/s | vs HF eager | vs HF grouped_mm | step GiB |",
            "|---|---|---:|---:|---:|---:|---:|"] + rows


def bench_model(a, device, dtype, peak):
    from transformers import Qwen3MoeForCausalLM
    cfg = moe_config(a, "torch")
    B, T = (a.batch, a.seq) if not a.smoke else (2, 64)
    torch.manual_seed(0)
    with torch.device(device): hf = Qwen3MoeForCausalLM(hf_config(cfg, "grouped_mm")).to(dtype)
    sd = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}

    def ours(kernels: str, compile_layers: bool = False, graphs: bool = False) -> Qwen3Model:
        with torch.device("meta"): m = Qwen3Model(cfg.replace(kernels=kernels))
        m.load_state_dict(sd, assign=True, strict=True)  # shares HF's storage: identical weights
        m.rotary_emb.inv_freq = torch.empty(cfg.head_dim // 2, device=device)
        m.rotary_emb.reset_parameters()
        if compile_layers:  # fixed training shapes: no symbolic sizes
            for layer in m.layers: layer.compile(dynamic=False)
        m.train()
        if graphs:  # each layer's forward and backward recorded once, replayed with one launch each
            from qwen3_scratch.training.cuda_graphs import cuda_graph_layers
            gc.collect(); torch.cuda.empty_cache()
            r0 = torch.cuda.memory_reserved()
            m.graphs = cuda_graph_layers(m, B, T)
            gc.collect(); torch.cuda.empty_cache()  # what stays reserved is the graphs' own: pool and static tensors
            m.graph_gib = (torch.cuda.memory_reserved() - r0) / 2**30
        return m
    impls = {"transformers (grouped_mm experts, sdpa)": hf.train(), "ours, PyTorch ops": ours("torch")}
    if device == "cuda" or a.smoke: impls["ours, Triton kernels"] = ours("triton")
    if device == "cuda": impls["ours, Triton kernels + CUDA graphs per layer"] = ours("triton", graphs=True)
    if device == "cuda" and not a.no_compile:
        impls["ours, Triton kernels + torch.compile per layer"] = ours("triton", compile_layers=True)
    g = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (B, T), device=device, generator=g)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)  # ours: pre-shifted; HF shifts itself
    with torch.no_grad():
        lh = hf(ids[:, :128], labels=ids[:, :128]).loss.float()
        for name, m in impls.items():
            if m is hf: continue
            lo = m(ids[:, :128], labels=labels[:, :128]).loss.float()
            print(f"model loss: transformers {lh.item():.5f}, {name} {lo.item():.5f}")
            assert abs(lo - lh) < 2e-2 * lh + cfg.router_aux_loss_coef * 4, f"{name}: loss {lo.item()} vs transformers {lh.item()}"
        gm = impls.get("ours, Triton kernels + CUDA graphs per layer")
        if gm is not None:  # the shape above ran eagerly; the recorded shape replays the graphs
            le = impls["ours, Triton kernels"](ids, labels=labels).loss.float()
            lg = gm(ids, labels=labels).loss.float()
            print(f"model loss B{B} x S{T}: eager {le.item():.5f}, graphed {lg.item():.5f} ({gm.graphs.replayed} layer replays)")
            assert gm.graphs.replayed == cfg.num_hidden_layers and abs(lg - le) < 1e-3 * le, (le.item(), lg.item())

    def step(m):
        def f():
            out = m(ids, labels=ids) if m is hf else m(ids, labels=labels)  # ours: loss includes coef * aux_loss
            out.loss.backward()
            for p in m.parameters(): p.grad = None
        return f
    t, mem = interleave(impls, step, 3, a.reps, a.rounds, device)
    base = t["transformers (grouped_mm experts, sdpa)"]
    fpt = flops_per_token(cfg, T)
    rows = []
    for k, ms in t.items():
        tps = B * T / ms * 1e3
        mfu = f"{tps * fpt / peak:.1%}" if peak else "n/a"
        rows.append(f"| train step B{B} x S{T} | {k} | {ms:.1f} | {tps:,.0f} | {mfu} | {base / ms:.2f}x | {mem.get(k, 0):.1f} |")
    if a.profile:
        best = min((k for k in t if k.startswith("ours")), key=t.get)
        rows += ["", f"Where the time goes in `{best}` (torch.profiler, GPU kernels):", ""]
        rows += profile_table(step(impls[best]))
    head = [f"Model: {cfg.num_hidden_layers} layers, d={cfg.hidden_size}, {cfg.num_attention_heads}/{cfg.num_key_value_heads} "
            f"heads of {cfg.head_dim}, E{cfg.num_experts} top-{cfg.num_experts_per_tok}, I={cfg.moe_intermediate_size}, "
            f"vocab {cfg.vocab_size}: {cfg.total_params_estimate() / 1e9:.2f}B parameters, "
            f"{cfg.active_params_estimate() / 1e9:.3f}B active; {fpt / 1e9:.2f} GFLOP per token (6·N_active + attention). "
            "transformers' step is the LM loss only (its balancing loss needs output_router_logits=True); ours includes "
            "the global-batch balancing loss (router_aux_loss_coef · aux).", "",
            "| phase | implementation | median ms | tokens/s | MFU | vs transformers | step GiB |",
            "|---|---|---:|---:|---:|---:|---:|"]
    return head + rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", choices=["block", "model"], default=["block", "model"])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--profile", action="store_true", help="add a torch.profiler table of the fastest of ours")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, runs on the CPU (float32)")
    p.add_argument("--out", default="benchmarks/moe.md")
    a = p.parse_args()
    if a.smoke: a.reps, a.rounds = 2, 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not a.smoke: sys.exit("bench_moe.py needs a CUDA GPU (or --smoke)")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    import transformers
    gpu = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "CPU"
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    lines = ["# Qwen3-MoE: ours vs transformers", "",
             f"- GPU: {gpu}; date: {datetime.date.today()}; torch {torch.__version__}; transformers {transformers.__version__}",
             f"- command: `python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}`".rstrip(),
             f"- {dtype}; same weights everywhere; median of {a.rounds} interleaved rounds x {a.reps} timed calls after warm-up",
             "- step GiB: the GPU memory a step takes above what was resident before it (the shared weights and inputs); "
             "for the CUDA-graph row, plus the graphs' own memory, which stays reserved between steps", ""]
    for part, fn in (("block", lambda: bench_block(a, device, dtype)),
                     ("model", lambda: bench_model(a, device, dtype, peak))):
        if part not in a.only: continue
        try: lines += fn() + [""]
        except Exception as e:  # noqa: BLE001 (a failing part must not hide the other's numbers)
            import traceback; traceback.print_exc()
            lines += [f"**{part}: FAILED** ({str(e).splitlines()[0][:200]})", ""]
        gc.collect()
        if device == "cuda": torch.cuda.empty_cache()
    text = "\n".join(lines)
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
