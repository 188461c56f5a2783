#!/usr/bin/env python
"""Dense Qwen3 on one GPU: our Qwen3Model against transformers' Qwen3ForCausalLM, same weights, same run.

    python benchmarks/bench_model.py                               # Qwen3-1.7B shape, B2 x T2048, bf16
    python benchmarks/bench_model.py --preset medium --layers 8    # Qwen3-8B width, 8 layers
    python benchmarks/bench_model.py --out benchmarks/model.md

Phases, each timed with CUDA events after warm-up, median over --reps repetitions in --rounds interleaved rounds:
  train    forward + backward of the LM loss on B x T tokens (bf16 weights, fp32 loss)
  prefill  forward without gradients on B x T tokens
  decode   one token per step for --decode-steps steps after a --decode-prompt token prompt, batch 1
Implementations: transformers (SDPA attention, its default), ours eager, ours with torch.compile per decoder layer
(train and prefill only: our cache position is a Python int, so compiled decoding would recompile at every step).
The two models share their weights (HF's are loaded into ours), and the logits are compared before timing.
"""
import argparse
import datetime
import gc
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qwen3_scratch.model.attention import KVCache  # noqa: E402
from qwen3_scratch.model.config import ModelConfig  # noqa: E402
from qwen3_scratch.model.hf import config_to_hf  # noqa: E402
from qwen3_scratch.model.transformer import Qwen3Model  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 datasheet rates


def timed(fn, warmup: int, reps: int) -> list[float]:
    "Milliseconds of `reps` calls of fn after `warmup` calls: CUDA events on a GPU, perf_counter on the CPU (smoke runs)."
    for _ in range(warmup): fn()
    out = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record(); torch.cuda.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter(); fn(); out.append((time.perf_counter() - t0) * 1e3)
    return out


def profile_table(fn, rows: int = 15, steps: int = 3) -> list[str]:
    "Markdown rows of the top GPU kernels (device time) over `steps` calls of fn; on the CPU, the top ops' CPU time."
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    fn()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps): fn()
        if cuda: torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    # kernels only on a GPU: an op's time also counts its kernels', so mixing them would count time twice
    ev = [e for e in prof.key_averages() if getattr(e, key, 0) > 0 and (not cuda or e.device_type.name == "CUDA")]
    ev.sort(key=lambda e: -getattr(e, key))
    total = sum(getattr(e, key) for e in ev) or 1
    out = ["| kernel | calls / step | ms / step | share |", "|---|---:|---:|---:|"]
    for e in ev[:rows]:
        t = getattr(e, key)
        out.append(f"| `{e.key[:90].replace('|', '/')}` | {e.count / steps:.0f} | {t / steps / 1e3:.2f} | {t / total:.1%} |")
    return out


def build(cfg: ModelConfig, dtype):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    hf_kw = {k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    with torch.device("cuda"): hf = Qwen3ForCausalLM(Qwen3Config(**hf_kw, attn_implementation="sdpa")).to(dtype)
    with torch.device("meta"): ours = Qwen3Model(cfg)
    sd = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    if cfg.tie_word_embeddings: sd.pop("lm_head.weight", None)
    ours.load_state_dict(sd, assign=True, strict=True)  # same storage as HF's weights: identical functions
    ours.rotary_emb.inv_freq = torch.empty(cfg.head_dim // 2, device="cuda")
    ours.rotary_emb.reset_parameters()
    return hf, ours


def flops_per_token(cfg: ModelConfig, seq: int) -> float:
    "Training FLOPs per token: 6 N (active matmul weights, LM head included, embedding excluded) + causal attention."
    # the embedding lookup does no matmul, the LM head does: untied, drop one V x d; tied, the one copy is the head
    # MoE: a token passes through its top-k experts only, so N counts the active parameters (= all of a dense model)
    n = cfg.active_params_estimate() - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq  # 12·L·H·D·T/2 (causal) fwd+bwd
    return 6 * n + attn


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--decode-prompt", type=int, default=512)
    p.add_argument("--decode-steps", type=int, default=128)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", default="benchmarks/model.md")
    a = p.parse_args()
    if not torch.cuda.is_available(): sys.exit("bench_model.py needs a CUDA GPU")
    import transformers

    dtype = torch.bfloat16
    cfg = ModelConfig.from_preset(a.preset, max_position_embeddings=max(40960, a.seq), kernels="torch")
    if a.layers: cfg = cfg.replace(num_hidden_layers=a.layers)
    hf, ours = build(cfg, dtype)
    B, T = a.batch, a.seq
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, 151_643, (B, T), device="cuda", generator=g)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)

    # bf16 vs bf16 differs by kernel choices compounding over layers; what matters is the distance to float32
    with torch.no_grad():
        lo, lh = ours(ids[:, :256]).logits.float(), hf(ids[:, :256]).logits.float()
        with torch.device("meta"): ref32 = Qwen3Model(cfg)
        ref32.load_state_dict({k: v.float() for k, v in ours.state_dict().items()}, assign=True)
        ref32.rotary_emb.inv_freq = ours.rotary_emb.inv_freq.float()
        lr = ref32(ids[:, :256]).logits.float()
        del ref32
    rel = lambda x, y: ((x - y).norm() / y.norm()).item()
    err_ours, err_hf, rel_pair = rel(lo, lr), rel(lh, lr), rel(lo, lh)
    print(f"bf16 logits vs float32: ours {err_ours:.2e}, transformers {err_hf:.2e}; ours vs transformers {rel_pair:.2e}")
    assert err_ours <= 1.25 * err_hf + 1e-3, "ours is further from float32 than transformers"

    def variant(kernels: str) -> Qwen3Model:  # the same weights under another kernels setting
        with torch.device("meta"): m = Qwen3Model(cfg.replace(kernels=kernels))
        m.load_state_dict(ours.state_dict(), assign=True)
        m.rotary_emb.inv_freq = ours.rotary_emb.inv_freq
        m.rotary_emb.attention_scaling = ours.rotary_emb.attention_scaling
        return m.train(ours.training)

    eager_torch, triton_k = variant("torch"), variant("triton")
    impls = {"transformers (sdpa)": hf, "ours, PyTorch ops": eager_torch, "ours, Triton kernels": triton_k}
    compiled = None
    if not a.no_compile:
        compiled = variant("torch")
        for layer in compiled.layers: layer.compile(dynamic=False)  # fixed shapes: no symbolic sizes
        impls["ours, PyTorch ops + torch.compile"] = compiled
    with torch.no_grad():
        lt = triton_k(ids[:, :256]).logits.float()
    err_triton = rel(lt, lr)
    print(f"Triton-kernel model vs float32: {err_triton:.2e}")
    assert err_triton <= 1.25 * err_hf + 1e-3, "the Triton-kernel model is further from float32 than transformers"

    def train_step(m):
        def f():
            loss = m(ids, labels=labels).loss if m is not hf else m(ids, labels=ids).loss
            loss.backward()
            for q in m.parameters(): q.grad = None
        return f

    def prefill(m):
        def f():
            with torch.no_grad(): m(ids)
        return f

    def decode(m):
        prompt = ids[:1, : a.decode_prompt]
        def f():
            with torch.no_grad():
                if m is hf:
                    out = m(prompt, use_cache=True); pkv = out.past_key_values
                    tok = out.logits[:, -1:].argmax(-1)
                    for _ in range(a.decode_steps):
                        out = m(tok, past_key_values=pkv, use_cache=True); pkv = out.past_key_values
                        tok = out.logits[:, -1:].argmax(-1)
                else:
                    cache = KVCache.from_config(cfg, 1, a.decode_prompt + a.decode_steps + 1, dtype=dtype, device="cuda")
                    tok = m(prompt, kv_cache=cache, logits_to_keep=1).logits.argmax(-1)
                    for _ in range(a.decode_steps): tok = m(tok, kv_cache=cache, logits_to_keep=1).logits.argmax(-1)
        return f

    phases = {"train": (train_step, B * T), "prefill": (prefill, B * T), "decode": (decode, a.decode_steps)}
    times = {(ph, name): [] for ph in phases for name in impls}
    mem = {}
    for r in range(a.rounds):
        for ph, (make, _) in phases.items():
            for name, m in impls.items():
                if ph == "decode" and m is compiled: continue  # a Python-int cache position recompiles every step
                gc.collect(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
                reps = max(2, a.reps // 3) if ph == "decode" else a.reps
                times[(ph, name)] += timed(make(m), warmup=2 if r else 3, reps=reps)
                mem[(ph, name)] = max(mem.get((ph, name), 0), torch.cuda.max_memory_allocated() / 2**30)
            print(f"round {r + 1} {ph} done", flush=True)

    gpu = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    fpt = flops_per_token(cfg, T)
    lines = ["# Dense Qwen3: ours vs transformers", "",
             f"- GPU: {gpu}; date: {datetime.date.today()}; torch {torch.__version__}; transformers {transformers.__version__}; "
             f"python {platform.python_version()}",
             f"- command: `python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}`".rstrip(),
             f"- model: preset `{a.preset}` ({cfg.num_hidden_layers} layers, d={cfg.hidden_size}, "
             f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, {cfg.total_params_estimate() / 1e9:.2f}B params), bf16 weights; "
             f"train/prefill on B={B} x T={T}; decode {a.decode_steps} tokens after a {a.decode_prompt}-token prompt, batch 1",
             f"- same weights in both; bf16 logits against the float32 model (||Δ||/||ref||, 256 tokens): ours {err_ours:.1e}, "
             f"transformers {err_hf:.1e}, ours with Triton kernels {err_triton:.1e}",
             f"- median of {a.rounds} interleaved rounds x {a.reps} timed repetitions (decode: {max(2, a.reps // 3)}) after warm-up; "
             f"ratio = transformers time / ours (> 1: ours faster)", "",
             "| phase | implementation | median ms | tokens/s | vs transformers | peak GiB |" + (" MFU |" if peak else ""),
             "|---|---|---:|---:|---:|---:|" + ("---:|" if peak else "")]
    for ph, (_, ntok) in phases.items():
        base = statistics.median(times[(ph, "transformers (sdpa)")])
        for name in impls:
            if not times[(ph, name)]: continue
            ms = statistics.median(times[(ph, name)])
            row = f"| {ph} | {name} | {ms:.2f} | {ntok / ms * 1e3:,.0f} | {base / ms:.2f}x | {mem[(ph, name)]:.1f} |"
            if peak: row += f" {ntok / ms * 1e3 * fpt / peak:.1%} |" if ph == "train" else " |"
            lines.append(row)
    lines += ["", "MFU (train rows): (6·N + 6·L·H·D·T) FLOPs per token against the GPU's dense bf16 datasheet peak; "
              "N counts every matmul weight including the LM head."]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
