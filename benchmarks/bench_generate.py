#!/usr/bin/env python
"""Generation on one GPU: our TextGenerator against transformers' `generate`, same weights, same prompts, same run.

    python benchmarks/bench_generate.py                                    # Qwen3-0.6B and 1.7B shapes, batch 1/32/256
    python benchmarks/bench_generate.py --shapes 0.6B --batches 1 32 --out /tmp/generate.md
    python benchmarks/bench_generate.py --shapes 1.7B --continue-from benchmarks/generate.md   # add to an earlier run's tables
    python benchmarks/bench_generate.py --quick --device cpu               # tiny shape on the CPU: checks the script only

Greedy decoding of --new tokens after a --prompt token prompt (random ids), eos ignored, bf16, random weights shared by
both sides (transformers' tensors are loaded into ours). Implementations:
  ours                  TextGenerator: static KV cache, the decode step replayed as a CUDA graph, kernels="auto" (Triton)
  ours, eager           the same with cuda_graphs=False (one Python forward per step)
  transformers static   generate(cache_implementation="static", disable_compile=True): transformers 5.x compiles the
                        decode forward by itself whenever the cache is static on a GPU, so the eager baseline must say so
  transformers compiled generate(cache_implementation="static", compile_config=CompileConfig(fullgraph=True,
                        mode="reduce-overhead")): transformers' own torch.compile of the decode step (prefill stays eager)
Every number is the median of --reps timed calls after one warm-up call (compilation, graph recording, autotuning).
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
from qwen3_scratch.errors import ConfigError  # noqa: E402
from qwen3_scratch.eval.generate import TextGenerator  # noqa: E402
from qwen3_scratch.model.config import ModelConfig  # noqa: E402
from qwen3_scratch.model.hf import config_to_hf  # noqa: E402
from qwen3_scratch.model.transformer import Qwen3Model  # noqa: E402

# the released sizes: Qwen3-1.7B is the `small` preset; Qwen3-0.6B is the same with d=1024 and a 3072-wide SwiGLU
SHAPES = {"0.6B": dict(hidden_size=1024, intermediate_size=3072), "1.7B": {}}
QUICK = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=64, vocab_size=4096, bos_token_id=None, eos_token_id=None)  # Qwen3's ids lie outside a 4096 vocab
ROWS = {"ours": "ours (CUDA graphs, kernels=auto)", "ours-eager": "ours, eager (cuda_graphs=False)",
        "hf": "transformers, static cache", "hf-compile": "transformers, static cache + torch.compile"}
BASE, COMPILED = ROWS["hf"], ROWS["hf-compile"]


def shape_config(name: str, quick: bool) -> ModelConfig:
    "The model shape of `name` (or the tiny --quick one), kernels='auto': Triton on a GPU, PyTorch on the CPU."
    cfg = ModelConfig.from_preset("small", kernels="auto")
    return cfg.replace(**(QUICK if quick else SHAPES[name]))


def peaked_(model: torch.nn.Module, seed: int = 0):
    "Random weights with clear greedy choices (std 0.15, norms near 1): a real init's logits are nearly flat, ties decide."
    g = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():  # tied: the head is the embedding, listed once
            if "norm" in n: p.normal_(1.0, 0.1, generator=g)
            else: p.normal_(0.0, 0.15, generator=g)


def build(cfg: ModelConfig, device: str, dtype):
    "transformers' Qwen3ForCausalLM and our Qwen3Model on the same weight tensors."
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM
    hf_kw = {k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "model_type")}
    with torch.device(device): hf = Qwen3ForCausalLM(Qwen3Config(**hf_kw, attn_implementation="sdpa")).to(dtype)
    peaked_(hf)
    hf.eval()
    hf.generation_config = GenerationConfig(pad_token_id=0, do_sample=False)  # no eos: every call runs to --new
    with torch.device("meta"): ours = Qwen3Model(cfg)
    sd = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    if cfg.tie_word_embeddings: sd.pop("lm_head.weight", None)
    ours.load_state_dict(sd, assign=True, strict=True)  # HF's storage: identical weights, no second copy
    ours.rotary_emb.inv_freq = torch.empty(cfg.head_dim // 2, device=device)
    ours.rotary_emb.reset_parameters()
    return hf, ours.eval()


def clock(fn, device: str):
    "(milliseconds, result) of one call of fn: CUDA events around it on a GPU (synchronised), perf_counter on the CPU."
    if device != "cuda":
        t0 = time.perf_counter(); out = fn()
        return (time.perf_counter() - t0) * 1e3, out
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record(); out = fn(); b.record(); torch.cuda.synchronize()
    return a.elapsed_time(b), out


def copy_bandwidth(device: str, nbytes: int) -> float:
    "Device-to-device copy bandwidth in bytes/s: each copy reads and writes `nbytes`, median of 10 after warm-up."
    x = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    y = torch.empty_like(x)
    for _ in range(3): y.copy_(x)
    ms = statistics.median([clock(lambda: y.copy_(x), device)[0] for _ in range(10)])
    return 2 * nbytes / (ms / 1e3)


def bytes_per_step(cfg: ModelConfig, model: Qwen3Model, ctx: float) -> float:
    "HBM bytes one batch-1 decode step must read: every weight once (the head; one embedding row only) + the K/V of ctx tokens."
    item = next(model.parameters()).element_size()
    weights = sum(p.numel() for p in model.parameters())
    if not cfg.tie_word_embeddings: weights -= cfg.vocab_size * cfg.hidden_size  # untied: the embedding is only gathered
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * ctx
    return (weights + kv) * item


def runners(hf, ours, device: str, rows: list[str]):
    "name -> fn(prompts (B, P) ids, new tokens) -> generated token ids (B lists); each fn runs one whole generate call."
    from transformers import CompileConfig
    out = {}
    if "ours" in rows and device == "cuda": out[ROWS["ours"]] = TextGenerator(ours)
    if "ours-eager" in rows: out[ROWS["ours-eager"]] = TextGenerator(ours, cuda_graphs=False)

    def ours_gen(gen):
        def f(ids, new):  # with tokenizer=None the prompts are token ids; eos ignored, as transformers' runs
            return [o.token_ids for o in gen.generate(ids.tolist(), new, ignore_eos=True, return_details=True)]
        return f
    fns = {name: ours_gen(gen) for name, gen in out.items()}
    compile_cfg = CompileConfig(fullgraph=True, mode="reduce-overhead")  # transformers' defaults, fullgraph required

    def hf_gen(ids, new, **kw):
        seq = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                          cache_implementation="static", **kw)
        if seq.shape[1] != ids.shape[1] + new: raise RuntimeError(f"transformers stopped after {seq.shape[1] - ids.shape[1]} tokens")
        return seq[:, ids.shape[1]:].tolist()
    if "hf" in rows: fns[BASE] = lambda ids, new: hf_gen(ids, new, disable_compile=True)
    if "hf-compile" in rows: fns[COMPILED] = lambda ids, new: hf_gen(ids, new, compile_config=compile_cfg)
    return fns, out


def failure(e: BaseException) -> str:
    "The table's word for a row that did not run."
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in msg.lower(): return "OOM"
    if isinstance(e, ConfigError) and "GiB" in msg: return "OOM (our engine refuses: too little free memory)"
    return f"failed: {type(e).__name__}: {msg[:160].replace('|', '/')}"


def measure(fn, ids, new: int, reps: int, device: str) -> dict:
    "Median ms of the whole generate call and of a max_new_tokens=1 call (prefill + first token), peak GiB, the tokens."
    fn(ids, new); fn(ids, 1)                                       # warm-up: compile, record graphs, autotune
    if device == "cuda": torch.cuda.reset_peak_memory_stats()
    prefill = statistics.median(clock(lambda: fn(ids, 1), device)[0] for _ in range(reps))
    full = []
    for _ in range(reps):
        ms, toks = clock(lambda: fn(ids, new), device)
        full.append(ms)
    total = statistics.median(full)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return dict(total=total, prefill=prefill, step=(total - prefill) / max(new - 1, 1), tokens=toks, peak=peak)


def agree(a: list[int], b: list[int], n: int = 32) -> str:
    "How many of the first n tokens agree, and where the two first part."
    k = min(n, len(a), len(b))
    first = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), None)
    same = sum(x == y for x, y in zip(a[:k], b[:k]))
    return f"{same}/{k} of the first {k} agree" + (f", first difference at token {first}" if first is not None else
                                                   f", all {min(len(a), len(b))} equal")


@torch.no_grad()
def teacher_forced(hf, prompt: torch.Tensor, toks: list[int]) -> float:
    "Share of our tokens that are transformers' argmax given our own prefix (no compounding: one forward of the sequence)."
    seq = torch.cat([prompt[0], torch.tensor(toks, device=prompt.device)])[None]
    pred = hf(seq[:, :-1]).logits[0, prompt.shape[1] - 1:].argmax(-1)
    return (pred == seq[0, prompt.shape[1]:]).float().mean().item()


def bench_shape(name: str, a, device: str, dtype, bw: float | None) -> list[str]:
    cfg = shape_config(name, a.quick)
    t0 = time.perf_counter()
    hf, ours = build(cfg, device, dtype)
    fns, gens = runners(hf, ours, device, a.rows)
    P, new = a.prompt, a.new
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, min(151_643, cfg.vocab_size), (max(a.batches), P), generator=g).to(device)
    res, checks = {}, []
    for B in a.batches:
        ids = prompts[:B]
        for row, fn in fns.items():
            gc.collect()
            if device == "cuda": torch.cuda.empty_cache()
            t = time.perf_counter()
            try: res[(B, row)] = measure(fn, ids, new, a.reps, device)
            except Exception as e:  # noqa: BLE001 (OOM or a failing compile must not hide the other rows)
                res[(B, row)] = failure(e)
                if res[(B, row)].startswith("failed"): import traceback; traceback.print_exc()
            r = res[(B, row)]
            print(f"[{name} B={B}] {row}: " + (f"{B * new / r['total'] * 1e3:,.0f} tok/s, {r['step']:.2f} ms/step, "
                  f"prefill {r['prefill']:.1f} ms" if isinstance(r, dict) else r) + f" ({time.perf_counter() - t:.0f} s)", flush=True)
        for gen in gens.values(): gen.clear()                     # the recorded steps and their caches of this batch
        ok = {row: r for (b, row), r in res.items() if b == B and isinstance(r, dict)}
        if ROWS["ours"] in ok and ROWS["ours-eager"] in ok:
            same = ok[ROWS["ours"]]["tokens"] == ok[ROWS["ours-eager"]]["tokens"]
            checks.append(f"batch {B}: ours with CUDA graphs {'==' if same else '!='} ours eager, all {B} x {new} tokens")
        if B == 1:
            mine = ok.get(ROWS["ours"]) or ok.get(ROWS["ours-eager"])
            mine_name = ROWS["ours"] if ROWS["ours"] in ok else ROWS["ours-eager"]
            if mine and BASE in ok:
                checks.append(f"batch 1, {mine_name} vs {BASE}: {agree(mine['tokens'][0], ok[BASE]['tokens'][0])}")
                try: tf = f"{teacher_forced(hf, ids, mine['tokens'][0]):.1%}"
                except Exception as e: tf = failure(e)  # noqa: BLE001
                checks.append(f"batch 1, teacher-forced: transformers' argmax after our own prefix equals our token at "
                              f"{tf} of the {new} positions")
            if BASE in ok and COMPILED in ok:
                checks.append(f"batch 1, {COMPILED} vs {BASE}: {agree(ok[COMPILED]['tokens'][0], ok[BASE]['tokens'][0])}")
    del fns, gens
    step_bytes = bytes_per_step(cfg, ours, P + new / 2)
    n = cfg.total_params_estimate()
    size = f"{n / 1e9:.2f}B" if n > 1e8 else f"{n / 1e6:.1f}M"
    lines = [f"## {'quick smoke shape' if a.quick else 'Qwen3-' + name} ({cfg.num_hidden_layers} layers, d={cfg.hidden_size}, "
             f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads of {cfg.head_dim}, I={cfg.intermediate_size}, "
             f"vocab {cfg.vocab_size}, {'tied' if cfg.tie_word_embeddings else 'untied'}; {size} parameters)", "",
             f"Prompt {P} tokens + {new} new, greedy. Batch-1 roofline: {step_bytes / 1e9:.3f} GB a step "
             f"(weights + K/V of {P + new // 2} tokens, the mean context)"
             + (f" at {bw / 1e9:,.0f} GB/s measured copy bandwidth = {step_bytes / bw * 1e3:.3f} ms a step." if bw else "."), "",
             "| batch | implementation | tokens/s | ms / decode step | prefill ms | total ms | vs HF static | vs HF compiled | "
             "peak GiB | HBM roofline |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for B in a.batches:
        base, comp = res.get((B, BASE)), res.get((B, COMPILED))
        for row in fns_order(a.rows, device):
            r = res.get((B, row))
            if r is None: continue
            if not isinstance(r, dict):
                lines.append(f"| {B} | {row} | {r} | | | | | | | |"); continue
            vs = lambda ref: f"{ref['total'] / r['total']:.2f}x" if isinstance(ref, dict) else "n/a"
            roof = f"{step_bytes / (r['step'] / 1e3) / bw:.1%}" if (B == 1 and bw) else ""
            peak = f"{r['peak']:.1f}" if r["peak"] is not None else "n/a"
            lines.append(f"| {B} | {row} | {B * new / r['total'] * 1e3:,.0f} | {r['step']:.2f} | {r['prefill']:.1f} | "
                         f"{r['total']:.0f} | {vs(base)} | {vs(comp)} | {peak} | {roof} |")
    lines += ["", "Checks in the same run:", ""] + [f"- {c}" for c in checks] + \
             ["", f"({time.perf_counter() - t0:.0f} s for this shape)", ""]
    del hf, ours
    return lines


def bench_compaction(a, device: str, dtype) -> list[str]:
    "Rows that finish early: sampled decoding (T=1) where 1% of the vocabulary stops a row, compaction on and off."
    cfg = shape_config(a.shapes[0], a.quick)
    _, ours = build(cfg, device, dtype)
    V, B, new = cfg.vocab_size, 32 if not a.quick else 4, a.new
    stops = torch.randperm(V, generator=torch.Generator().manual_seed(3))[: V // 100].tolist()
    ids = torch.randint(0, min(151_643, V), (B, a.prompt), generator=torch.Generator().manual_seed(4)).tolist()
    lines = ["## Rows that finish early: compaction", "",
             f"{'Quick shape' if a.quick else 'Qwen3-' + a.shapes[0]}, batch {B}, prompt {a.prompt} + up to {new} new, "
             "sampled at temperature 1 with a random 1% of the vocabulary as stop tokens (so rows end after ~100 tokens, "
             "at different steps). With compaction the live rows move to a smaller recorded step when at most half "
             "are live; without, finished rows keep their slots.", "",
             "| compaction | generated tokens | ms | generated tokens/s |", "|---|---:|---:|---:|"]
    for compact in (True, False):
        gen = TextGenerator(ours, cuda_graphs=device == "cuda", compact=compact)
        run = lambda: gen.generate(ids, new, temperature=1.0, seed=0, stop_token_ids=stops, ignore_eos=True,
                                    return_details=True)
        run()
        times, outs = [], None
        for _ in range(a.reps):
            ms, outs = clock(run, device); times.append(ms)
        n = sum(len(o.token_ids) for o in outs)
        ms = statistics.median(times)
        lines.append(f"| {'on' if compact else 'off'} | {n:,} | {ms:.0f} | {n / ms * 1e3:,.0f} |")
        print(f"[compaction {'on' if compact else 'off'}] {n} tokens in {ms:.0f} ms", flush=True)
        gen.clear()
    del ours
    return lines + [""]


def fns_order(rows: list[str], device: str) -> list[str]:
    return [ROWS[k] for k in ROWS if k in rows and not (k == "ours" and device != "cuda")]


HOW = ("How measured: each row is one whole `generate` call on the same (B, prompt) random token ids, timed with CUDA "
       "events after a synchronise (perf_counter on the CPU); median of --reps calls after one warm-up call of each "
       "length (compilation, CUDA-graph recording and Triton autotuning happen there). tokens/s = B x new tokens / "
       "total ms of the call, prefill included. prefill ms = the same call with max_new_tokens=1 (prompt forward, cache "
       "set-up, first token: time to first token); ms / decode step = (total - prefill) / (new - 1). vs HF = "
       "transformers' total ms / this row's (> 1: faster than transformers). peak GiB = torch.cuda.max_memory_allocated "
       "over the timed calls (weights included). HBM roofline (batch 1) = the bytes a step must read (every weight once, "
       "the embedding row aside, plus the K/V of the mean context) / measured ms per step / the device-to-device copy "
       "bandwidth measured in this run (2 x bytes / ms of a large copy); both engines read their whole static cache, "
       "so the bound counts only the K/V that is needed. Weights are random (std 0.15, norms near 1, so greedy choices "
       "are clear); bf16 rounding differs between the engines, so free-running greedy tokens may part after a while: "
       "the teacher-forced check (transformers' argmax after our own prefix) does not compound.")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="*", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--batches", nargs="*", type=int, default=None, help="default 1 32 256 (--quick: 1 4)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rows", nargs="*", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--no-compile", action="store_true", help="leave out the transformers + torch.compile row")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="one tiny shape, prompt 16 + 32 new (runs on the CPU)")
    p.add_argument("--continue-from", default=None, help="an earlier output file whose shape tables are kept before this run's")
    p.add_argument("--out", default="benchmarks/generate.md")
    p.add_argument("--compaction", action="store_true", help="also time rows that finish early, compaction on and off")
    a = p.parse_args()
    if a.reps < 1: sys.exit("--reps must be at least 1")
    if a.no_compile: a.rows = [r for r in a.rows if r != "hf-compile"]
    if a.quick: a.shapes, a.prompt, a.new = ["quick"], 16, 32
    a.batches = a.batches or ([1, 4] if a.quick else [1, 32, 256])
    if a.device == "cuda" and not torch.cuda.is_available(): sys.exit("bench_generate.py: no CUDA GPU here; use --quick --device cpu")
    if a.device == "cpu" and not a.quick: sys.exit("bench_generate.py needs a CUDA GPU (or --quick --device cpu for a smoke run)")
    device, dtype = a.device, torch.bfloat16 if a.device == "cuda" else torch.float32
    if device == "cpu": torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    import transformers
    try: import triton; tv = triton.__version__
    except ImportError: tv = "not installed"
    t0 = time.perf_counter()
    bw = copy_bandwidth(device, 2**31 if device == "cuda" else 2**26)
    gpu = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or "CPU") + " (CPU run)"
    print(f"{gpu}: device-to-device copy {bw / 1e9:,.0f} GB/s", flush=True)
    head = ["# Generation: ours vs transformers", "",
            f"- GPU: {gpu}; date: {datetime.date.today()}; torch {torch.__version__}; transformers {transformers.__version__}; "
            f"triton {tv}; python {platform.python_version()}",
            f"- command: `python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}`".rstrip(),
            f"- {dtype}, greedy, eos ignored, median of {a.reps} timed calls; measured device-to-device copy bandwidth "
            f"{bw / 1e9:,.0f} GB/s",
            "- transformers static = `generate(cache_implementation=\"static\", disable_compile=True)` (5.x compiles a static "
            "cache's decode step by itself unless told not to); compiled = the same with `compile_config=CompileConfig("
            "fullgraph=True, mode=\"reduce-overhead\")` (decode step compiled, prefill eager)", "", HOW, ""]
    if device == "cpu":
        head += ["CPU smoke run: no CUDA graphs (our graphed row is left out) and transformers does not compile off-GPU, "
                 "so its 'compiled' row runs eagerly; the numbers check the script, not the engines.", ""]
    sections = []
    if a.continue_from:
        prev = Path(a.continue_from).read_text()
        cmd = next((l for l in prev.splitlines() if l.startswith("- command:")), "- command: (unknown)")
        head.insert(4, cmd.replace("- command:", "- earlier tables from:", 1))
        sections.append(prev[prev.index("\n## ") + 1:] if "\n## " in prev else "")
    for name in a.shapes:
        try: sections.append("\n".join(bench_shape(name, a, device, dtype, bw)))
        except Exception as e:  # noqa: BLE001 (a failing shape must not hide the other's numbers)
            import traceback; traceback.print_exc()
            sections.append(f"## Qwen3-{name}: FAILED ({failure(e)})\n")
        gc.collect()
        if device == "cuda": torch.cuda.empty_cache()
    if a.compaction:
        try: sections.append("\n".join(bench_compaction(a, device, dtype)))
        except Exception as e:  # noqa: BLE001
            import traceback; traceback.print_exc(); sections.append(f"## Compaction: FAILED ({failure(e)})\n")
    text = "\n".join(head) + "\n" + "\n".join(s.rstrip("\n") + "\n" for s in sections)
    print(text)
    print(f"bench_generate.py: {time.perf_counter() - t0:.0f} s in all", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
