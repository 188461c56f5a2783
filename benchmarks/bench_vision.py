"""Qwen3-VL vision encoder, forward + backward, images/s: ours (PyTorch ops; Triton kernels) vs transformers'
Qwen3VLVisionModel with the same weights, in bf16, at 448x448 and 896x896 (several images packed per step, cu_seqlens).

GPU (writes benchmarks/vision.md):   python benchmarks/bench_vision.py
CPU smoke test (< 1 min, no file):    python benchmarks/bench_vision.py --smoke
"""
import argparse
import datetime
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qwen3_scratch.model.config import ModelConfig  # noqa: E402
from qwen3_scratch.model.vision.encoder import VisionModel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import profile_table  # noqa: E402

# transformers' Qwen3VLVisionConfig defaults = Qwen3-VL-8B's vision tower (out_hidden_size = the 8B LM width, 4096)
REAL = dict(vision_hidden_size=1152, vision_num_hidden_layers=27, vision_num_attention_heads=16, vision_intermediate_size=4304,
            vision_patch_size=16, vision_temporal_patch_size=2, vision_image_size=768, vision_deepstack_layers=[8, 16, 24],
            hidden_size=4096)
SMOKE = dict(vision_hidden_size=64, vision_num_hidden_layers=3, vision_num_attention_heads=2, vision_intermediate_size=128,
             vision_patch_size=16, vision_temporal_patch_size=2, vision_image_size=256, vision_deepstack_layers=[0, 2],
             hidden_size=96)


def hf_config(c: ModelConfig):
    from transformers import Qwen3VLVisionConfig
    return Qwen3VLVisionConfig(depth=c.vision_num_hidden_layers, hidden_size=c.vision_hidden_size,
                               intermediate_size=c.vision_intermediate_size, num_heads=c.vision_num_attention_heads,
                               patch_size=c.vision_patch_size, temporal_patch_size=c.vision_temporal_patch_size,
                               spatial_merge_size=c.vision_merger_spatial_factor, out_hidden_size=c.hidden_size,
                               num_position_embeddings=(c.vision_image_size // c.vision_patch_size) ** 2,
                               deepstack_visual_indexes=c.vision_deepstack_layers)


def graph_runner():
    "Run a model through CUDA graphs of its forward and backward, recorded on the first call of each image grid."
    from qwen3_scratch.training.cuda_graphs import cuda_graph_vision
    graphs = {}
    def run(m, px, g):
        key = str(torch.as_tensor(g).tolist())
        if key not in graphs: graphs[key] = cuda_graph_vision(m, g)
        return graphs[key](px, g)
    return run


def build(cfg: ModelConfig, dev, dtype, with_triton: bool, compile_blocks: bool = False, graphs: bool = False,
          compile_mode: str | None = None):
    "HF model(s) and ours, all with the same weights: {name: (model, runner)}."
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel
    hcfg = hf_config(cfg)
    torch.manual_seed(0)
    models = {}
    impls = ["sdpa"] + (["flash_attention_2"] if dev == "cuda" and importlib.util.find_spec("flash_attn") else [])
    ref = None
    for impl in impls:
        hcfg._attn_implementation = impl
        hf = Qwen3VLVisionModel(hcfg).to(dev, dtype).train()
        if ref is None: ref = hf.state_dict()
        else: hf.load_state_dict(ref)
        models[f"transformers ({impl})"] = (hf, lambda m, px, g: (lambda o: (o.pooler_output, o.deepstack_features))(m(px, grid_thw=g)))
    kinds = ([("torch", False, False)] + ([("triton", False, False)] if with_triton else []) +
             ([("torch", True, False)] if compile_blocks else []) + ([("torch", compile_blocks, True)] if graphs else []))
    for k, comp, graph in kinds:
        ours = VisionModel(cfg.replace(kernels=k)).to(dev, dtype).train()
        ours.load_state_dict(ref)
        if comp:  # each ViT block and merger compiled (fixed shapes): LayerNorm, GELU, RoPE, residuals fused around GEMMs
            from qwen3_scratch.model.vision.encoder import compile_vision
            compile_vision(ours, mode=compile_mode)
        label = ("PyTorch ops" if k == "torch" else "Triton kernels") + (" + torch.compile per block" if comp else "")
        label += " + CUDA graph" if graph else ""
        models[f"ours ({label})"] = (ours, graph_runner() if graph else lambda m, px, g: m(px, g))
    return models


def step(model, run, px, grid, weights):
    "One forward + backward; returns the outputs (detached)."
    tok, ds = run(model, px, grid)
    loss = sum((o.float() * w).sum() for o, w in zip([tok, *ds], weights))
    loss.backward()
    return [tok.detach(), *[d.detach() for d in ds]]


def timeit(fn, warmup, iters, dev):
    for _ in range(warmup): fn()
    times = []
    for _ in range(iters):
        if dev == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record(); torch.cuda.synchronize(); times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny config on CPU, fp32, no file written (< 1 min)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="leave out torch.compile (the graph row then records eager blocks)")
    ap.add_argument("--no-graph", action="store_true", help="leave out the CUDA-graph row")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode of the blocks instead of compile_vision's options, e.g. max-autotune-no-cudagraphs")
    ap.add_argument("--only-896", action="store_true", help="time 896x896 only")
    ap.add_argument("--profile", action="store_true", help="add a torch.profiler table of the fastest of ours per resolution")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--batch-448", type=int, default=16, help="images of 448x448 per step (784 patches each)")
    ap.add_argument("--batch-896", type=int, default=4, help="images of 896x896 per step (3136 patches each)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("vision.md")))
    args = ap.parse_args()

    dev = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if dev == "cpu" and not args.smoke:
        sys.exit("bench_vision.py needs a CUDA GPU; run with --smoke for the CPU smoke test")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    cfg = ModelConfig(vision_enabled=True, num_hidden_layers=3, **(SMOKE if args.smoke else REAL))
    P = cfg.vision_patch_size
    cases = [(64, 2), (128, 1)] if args.smoke else [(448, args.batch_448), (896, args.batch_896)]
    if args.only_896: cases = cases[1:]
    if args.smoke: args.warmup, args.iters = 1, 2
    models = build(cfg, dev, dtype, with_triton=dev == "cuda", compile_blocks=dev == "cuda" and not args.no_compile,
                   graphs=dev == "cuda" and not args.no_graph, compile_mode=args.compile_mode)

    rows, profiles, g = [], [], torch.Generator().manual_seed(0)
    for res, n in cases:
        side = res // P
        grid = torch.tensor([[1, side, side]] * n, device=dev)  # as the processor's output after .to(device)
        px = torch.randn(n * side * side, 3 * 2 * P * P, generator=g).to(dev, dtype)
        ntok = n * side * side // 4
        weights = [torch.randn(ntok, cfg.hidden_size, generator=g).to(dev) for _ in range(1 + len(cfg.vision_deepstack_layers))]
        outs, res_row = {}, {}
        for name, (m, run) in models.items():
            def fn(m=m, run=run): m.zero_grad(set_to_none=True); return step(m, run, px, grid, weights)
            if dev == "cuda": torch.cuda.reset_peak_memory_stats()  # from the first call: a CUDA graph's memory is taken there
            outs[name] = fn()
            t = timeit(fn, args.warmup, args.iters, dev)
            mem = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
            res_row[name] = (t, mem)
            print(f"{res}x{res} x{n}: {name:32s} {t * 1e3:9.2f} ms  {n / t:9.1f} img/s  peak {mem:.2f} GiB", flush=True)
        ref = outs["transformers (sdpa)"]
        errs = {name: max(float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(o, ref)) for name, o in outs.items()}
        rows.append((res, n, n * side * side, res_row, errs))
        if args.profile:
            best = min((k for k in res_row if k.startswith("ours")), key=lambda k: res_row[k][0])
            m, run = models[best]
            profiles.append(f"Where the time goes in `{best}` at {res}×{res} (torch.profiler, GPU kernels per step):\n\n" +
                            "\n".join(profile_table(lambda: (m.zero_grad(set_to_none=True), step(m, run, px, grid, weights)))))

    base = "transformers (sdpa)"
    names = list(models)
    lines = [f"| resolution | images / step | patches / step | " + " | ".join(f"{k} img/s" for k in names) +
             " | best ours / HF sdpa | peak GiB (" + ", ".join(names) + ") | rel. diff of outputs vs HF sdpa |",
             "|---" * (6 + len(names)) + "|"]
    for res, n, npatch, rr, errs in rows:
        ips = {k: n / rr[k][0] for k in names}
        best = max(v for k, v in ips.items() if k.startswith("ours"))
        lines.append(f"| {res}×{res} | {n} | {npatch} | " + " | ".join(f"{ips[k]:.1f}" for k in names) +
                     f" | **{best / ips[base]:.2f}×** | " + ", ".join(f"{rr[k][1]:.2f}" for k in names) + " | " +
                     ", ".join(f"{errs[k]:.1e}" for k in names if k != base) + " |")
    table = "\n".join(lines)
    print(table)
    if args.smoke: return
    import transformers, triton  # noqa: E401
    gpu = torch.cuda.get_device_name()
    compiled_with = (f"mode {args.compile_mode!r}" if args.compile_mode else
                     "inductor options `VISION_INDUCTOR_OPTIONS`: coordinate-descent tuning, multi-kernel reductions, "
                     "no mix-order reduction; `nbs/08_vision`")
    text = f"""# Vision encoder benchmark: forward + backward

Qwen3-VL-8B's vision tower (transformers' `Qwen3VLVisionConfig` defaults: 27 blocks, width 1152, 16 heads of 72,
MLP 4304, patch 16, temporal patch 2, DeepStack at blocks 8/16/24, output width 4096), random weights shared by all
rows, bf16, one step = forward of a batch of equal images packed into one sequence (`cu_seqlens`) + backward of a
random projection of the merged tokens and the three DeepStack features. Median of {args.iters} steps after
{args.warmup} warm-up steps.

- transformers (sdpa): `Qwen3VLVisionModel`, which runs SDPA once per image (a Python loop over `cu_seqlens`){"; flash_attention_2: the varlen flash-attn kernel" if any("flash" in k for k in names) else ""}.
- ours (PyTorch ops): `VisionModel` with `kernels="torch"` — SDPA batched over equal-size images, the patch
  embedding as one GEMM.
- ours (Triton kernels): `kernels="triton"` — our FlashAttention-2 with `causal=False` and `cu_seqlens` over all images in
  one launch, reading q/k/v as strided views of the qkv projection, after our fused RoPE kernel.
- ours (PyTorch ops + torch.compile per block): the PyTorch-ops model with each ViT block and merger `torch.compile`d
  by `compile_vision` ({compiled_with}).
- ours (... + CUDA graph): that model's whole forward and backward recorded once per image grid and replayed
  (`cuda_graph_vision`, `nbs/27_cuda_graphs`); its peak memory counts the recording.

{gpu}, {datetime.date.today()}, torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}.
Command: `python benchmarks/bench_vision.py{" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""}`.

{table}
""" + "".join(f"\n{p}\n" for p in profiles)
    Path(args.out).write_text(text)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
