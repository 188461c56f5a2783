#!/usr/bin/env python
"""Check that qwen3_scratch and transformers give the same logits on a Hugging Face Qwen3 checkpoint.

Point it at any Qwen3 checkpoint directory (config.json + safetensors), e.g. a download of Qwen/Qwen3-1.7B:

    python scripts/hf_parity.py --model-dir ~/models/Qwen3-1.7B                          # fp32 on CPU
    python scripts/hf_parity.py --model-dir ~/models/Qwen3-8B --device cuda --dtype bfloat16

It tokenizes --text with our Qwen3 tokenizer (random ids when the checkpoint's vocabulary is smaller), runs both models,
prints max |Δlogits|, the relative error and the top-1 agreement, and exits 1 when they differ by more than the
dtype allows (fp32: max |Δ| <= 1e-4; bf16/fp16: ||Δ|| / ||ref|| <= 2e-2).
"""
import argparse
import json
import sys

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True, help="HF checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--text", default="The capital of France is Paris. 2 + 2 = 4. 你好，世界！")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda asked for but torch sees no GPU; use --device cpu")
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        p.error("transformers is needed for the comparison: pip install transformers")
    from qwen3_scratch.model.hf import load_hf

    dtype = getattr(torch, a.dtype)
    ours = load_hf(a.model_dir, dtype=dtype, device=a.device).eval()
    ref = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=dtype).to(a.device).eval()
    vocab = ours.config.vocab_size
    try:
        from qwen3_scratch.data.tokenizer import Tokenizer
        ids = Tokenizer().encode(a.text)
        if max(ids) >= vocab: raise ValueError("checkpoint vocabulary smaller than the tokenizer's")
        source = "tokenizer"
    except Exception:  # tiny test checkpoints have tiny vocabularies
        ids = torch.randint(0, vocab, (32,), generator=torch.Generator().manual_seed(0)).tolist()
        source = "random ids"
    x = torch.tensor([ids], device=a.device)
    with torch.no_grad():
        lo, lr = ours(x).logits.float(), ref(x).logits.float()
    res = {"tokens": len(ids), "input": source, "dtype": a.dtype, "device": a.device,
           "max_abs_diff": (lo - lr).abs().max().item(), "rel_diff": ((lo - lr).norm() / lr.norm()).item(),
           "top1_agreement": (lo.argmax(-1) == lr.argmax(-1)).float().mean().item()}
    ok = res["max_abs_diff"] <= 1e-4 if dtype == torch.float32 else res["rel_diff"] <= 2e-2
    res["ok"] = ok
    if a.json: print(json.dumps(res))
    else:
        print(f"{a.model_dir}: {res['tokens']} tokens ({source}), {a.dtype} on {a.device}")
        print(f"  max |Δlogits| {res['max_abs_diff']:.3e}   ||Δ||/||ref|| {res['rel_diff']:.3e}   "
              f"top-1 agreement {res['top1_agreement']:.2%}   -> {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
