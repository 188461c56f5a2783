#!/usr/bin/env python
"""qwen3_scratch's training CLI: one subcommand per stage of the recipe.

pretrain: the three-stage pretraining of nbs/35_pretrain from a YAML config (qwen3_scratch/configs/training/) with
dotted key=value overrides (every key: `train.py pretrain --show-keys`).
generate: completions of --prompt texts with nbs/36_generate's TextGenerator, from a training run (--checkpoint: the run
directory, one of its step_N checkpoints, or its hf/ export) or a Hugging Face Qwen3 / Qwen3-MoE / Qwen3-VL directory (--hf).
chat: the same models in a terminal conversation (stdin may be piped: one user turn a line).
The other stages are planned: each subcommand (sft, grpo, dpo, rm, eval, pipeline) says so in one line until its
notebook lands.

    # the README's main job: the debug model through S1 -> S2 -> S3 on the embedded corpus (CPU, about two minutes)
    python scripts/train.py pretrain --config pretrain_debug

    # one GPU, Qwen3-1.7B shape, stage 1 only, some overrides
    python scripts/train.py pretrain model.preset=small pretrain.run_stages=[s1] optim.lr=3e-4 train.compile=true

    # resume the newest intact checkpoint of the run directory (or --resume runs/pretrain/checkpoints/step_001000)
    python scripts/train.py pretrain --resume latest

    # 8 GPUs of one node (data parallel; FSDP2 with distributed.fsdp_enabled=true)
    torchrun --standalone --nproc_per_node 8 scripts/train.py pretrain model.preset=small
    # 8 GPUs as FSDP 2 x TP 2 x PP 2 (any degrees in the YAML's distributed: section, nbs/29_parallelize)
    torchrun --standalone --nproc_per_node 8 scripts/train.py pretrain model.preset=small distributed.fsdp_enabled=true \
        distributed.tp_size=2 distributed.pp_size=2
    # or scripts/pretrain.sh, which also launches several nodes

    # plan a layout before renting it: Qwen3-235B-A22B on 64 GPUs (one process, no GPU, a few seconds)
    python scripts/train.py pretrain --dry-run --world-size 64 model.preset=large distributed.fsdp_enabled=true \
        distributed.pp_size=4 distributed.ep_size=16 train.activation_checkpointing=full train.micro_batch_size=8 \
        train.grad_accum=1 pretrain.run_stages=[s1]

    # sample from what you trained: greedy by default; --thinking / --no-thinking wrap the prompt in Qwen3's chat template
    python scripts/train.py generate --checkpoint runs/pretrain_debug --prompt "The cat sat on" --max-new-tokens 64
    python scripts/train.py generate --hf path/to/Qwen3-0.6B --prompt "What is 17 * 23?" --thinking \
        --temperature 0.6 --top-p 0.95 --top-k 20 --n 4 --seed 0 --json
    # a conversation (/think, /no_think, /reset, /exit); stdin may be piped, a user turn a line
    python scripts/train.py chat --hf path/to/Qwen3-0.6B --temperature 0.6 --top-p 0.95 --top-k 20

Exit codes: 0 done; 2 a config, data or checkpoint problem, a bad prompt, or a planned subcommand (the message says what to do);
3 the run stopped after train.max_bad_steps non-finite losses in a row (a checkpoint was saved first).
"""
import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# subcommands of the recipe that are not built yet, and where they will come from
PLANNED = {"sft": "SFT: long-CoT cold start and thinking-mode fusion (nbs/40_sft)",
           "grpo": "GRPO with verifiable rewards (nbs/54_grpo)", "dpo": "DPO (nbs/56_dpo)",
           "rm": "the reward model (nbs/55_reward_model)", "eval": "evaluation (nbs/60_evaluate)",
           "pipeline": "the whole pipeline with its report card"}


def pretrain(args, callbacks=()) -> int:
    from qwen3_scratch.training.config import config_reference, load_train_config
    if args.show_keys:
        for key, tp, default, why in config_reference(): print(f"{key:38} {tp:34} {default:16} {why}")
        return 0
    cfg = load_train_config(args.config, args.overrides, stage="pretrain")
    if args.print_config:
        import dataclasses, yaml
        print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)); return 0
    if args.dry_run: return dry_run(cfg, args)
    from qwen3_scratch.training.pretrain import Pretrainer
    res = Pretrainer(cfg, callbacks=callbacks).run(resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        val = f"{res['val_loss']:.4f}" if res.get("val_loss") is not None else "n/a"
        print(f"done: {res['step']} steps, {res['tokens_seen']:,} tokens, final validation loss {val}; "
              f"checkpoints in {res['checkpoint']}, metrics in {res['metrics']}"
              + (f", plot {res['plot']}" if res.get("plot") else "") + (f", HF weights in {res['hf']}" if res.get("hf") else ""))
    return 0


def dry_run(cfg, args) -> int:
    "Plan the config's layout on a fake process group of --world-size ranks (nbs/29a_dry_run) and print it."
    from qwen3_scratch.distributed.dry_run import dry_run as plan, format_dry_run
    from qwen3_scratch.distributed.parallel import ParallelDims
    from qwen3_scratch.errors import ConfigError
    from qwen3_scratch.model.config import ModelConfig
    d, train = cfg.distributed, cfg.train
    world = args.world_size
    if world is None:
        if d.dp_size == -1: raise ConfigError("--dry-run needs the number of GPUs: pass --world-size N (or set distributed.dp_size)")
        world = d.dp_size * d.tp_size * d.pp_size * d.cp_size
    try: config = ModelConfig.from_preset(cfg.model.preset, **cfg.model.overrides)
    except (ValueError, FileNotFoundError, TypeError) as e: raise ConfigError(f"model config: {e}") from None
    seq_len = max(cfg.pretrain.stages[s].seq_len for s in cfg.pretrain.run_stages)
    compute = 4 if train.dtype in ("float32", "fp32") else 2
    res = plan(config, ParallelDims.from_section(d, world), micro_batch=train.micro_batch_size, seq_len=seq_len,
               grad_accum=train.grad_accum, activation_checkpointing=train.activation_checkpointing, compute_bytes=compute,
               sequence_parallel=d.tp_sequence_parallel, pp_schedule=d.pp_schedule, pp_microbatches=d.pp_microbatches,
               pp_stages_per_rank=d.pp_stages_per_rank, reshard_after_forward=d.fsdp_reshard_after_forward)
    print(f"model {cfg.model.preset}: {config.num_hidden_layers} layers, hidden {config.hidden_size}"
          + (f", {config.num_experts} experts (top {config.num_experts_per_tok})" if config.num_experts else ""))
    print(format_dry_run(res, gpu_memory_gb=args.gpu_memory_gb))
    return 0


# ---- generate / chat: load a trained or downloaded Qwen3, then nbs/36_generate's TextGenerator -------------------------
_WHERE = ("a run directory (runs/NAME), one of its checkpoints (runs/NAME/checkpoints/step_N) or its hf/ export")


def _one_line(e: Exception) -> str:
    return "; ".join(l.strip() for l in str(e).splitlines() if l.strip())


def _device_and_dtype(args):
    "The torch device and dtype of --device / --dtype (auto: bfloat16 on a GPU that has it, float32 otherwise)."
    import torch
    from qwen3_scratch.errors import ConfigError
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but torch sees no CUDA GPU: pass --device cpu (or leave --device out)")
    device = torch.device(name)
    if args.dtype == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return device, torch.bfloat16 if bf16 else torch.float32
    return device, {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]


def _latest_intact(ckpt_dir: Path) -> Path | None:
    "The newest complete checkpoint under `ckpt_dir` whose files match its COMPLETE marker (damaged ones warned and skipped)."
    from qwen3_scratch.training.checkpoint import complete_checkpoints, verify_checkpoint
    for p in reversed(complete_checkpoints(ckpt_dir)):
        problems = verify_checkpoint(p)
        if not problems: return p
        warnings.warn(f"checkpoint {p} is damaged ({'; '.join(problems[:2])}): taking an older one")
    return None


def find_checkpoint(path) -> tuple[str, Path]:
    "('hf' | 'dcp', directory) that --checkpoint `path` names: a HF directory, a step_N checkpoint, or a run's newest one."
    from qwen3_scratch.errors import CheckpointError
    from qwen3_scratch.training.checkpoint import MARKER, verify_checkpoint
    p = Path(path)
    if not p.exists(): raise CheckpointError(f"--checkpoint {p} does not exist: pass {_WHERE}")
    if not p.is_dir(): raise CheckpointError(f"--checkpoint {p} is a file: pass {_WHERE}")
    if (p / "config.json").is_file(): return "hf", p
    if (p / "trainer_rank0.pt").is_file() or p.name.startswith("step_"):
        if not (p / MARKER).is_file():
            raise CheckpointError(f"checkpoint {p} has no {MARKER} marker: its save was interrupted; pass the run directory "
                                  f"(or another step_N) to take the newest complete checkpoint")
        problems = verify_checkpoint(p)
        if problems: raise CheckpointError(f"checkpoint {p} is damaged ({'; '.join(problems[:3])}): pass another step_N, "
                                           f"or the run directory to take the newest intact one")
        return "dcp", p
    for ckpts in (p / "checkpoints", p):                      # a run directory, or its checkpoints/ directory
        if ckpts.is_dir() and any(c.name.startswith("step_") for c in ckpts.iterdir()):
            found = _latest_intact(ckpts)
            if found is not None: return "dcp", found
            if (p / "hf" / "config.json").is_file(): return "hf", p / "hf"
            names = sorted(c.name for c in ckpts.iterdir())
            raise CheckpointError(f"{ckpts} holds no complete, intact checkpoint (found: {', '.join(names)}): '.tmp' "
                                  f"directories and ones without {MARKER} are interrupted saves; pass another run or checkpoint")
    if (p / "hf" / "config.json").is_file(): return "hf", p / "hf"
    raise CheckpointError(f"--checkpoint {p} is not a checkpoint: it holds no config.json (a HF export), no trainer_rank0.pt "
                          f"(a step_N checkpoint) and no checkpoints/ (a run directory); pass {_WHERE}, or --hf DIR")


def load_hf_dir(path, device, dtype, flag="--hf"):
    "Our model (Qwen3, Qwen3-MoE or Qwen3-VL) from a HF checkpoint directory; one-line errors for a bad one."
    from qwen3_scratch.errors import CheckpointError, Qwen3Error
    from qwen3_scratch.model.hf import load_hf
    p = Path(path)
    if not p.is_dir(): raise CheckpointError(f"{flag} {p} does not exist or is not a directory: pass a Hugging Face Qwen3 "
                                             f"directory (config.json + *.safetensors)")
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{flag} {p} has no config.json, so it is not a Hugging Face checkpoint directory: pass one "
                              f"(save_hf, save_pretrained or a Hub download){', or --checkpoint for a training run' if flag == '--hf' else ''}")
    try: return load_hf(p, dtype=dtype, device=device)
    except Qwen3Error: raise
    except (ValueError, OSError, KeyError) as e: raise CheckpointError(f"{flag} {p}: {_one_line(e)}") from None


def load_dcp(path: Path, device, dtype):
    "Our model from a training checkpoint (DCP step_N): its architecture from the model_config the trainer saved beside it."
    import torch
    from qwen3_scratch.errors import CheckpointError
    from qwen3_scratch.model.config import ModelConfig
    from qwen3_scratch.model.hf import build_model
    from qwen3_scratch.training.checkpoint import checkpoint_meta, load_checkpoint
    saved = (checkpoint_meta(path).get("extra") or {}).get("model_config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {path} does not record its model config (extra['model_config'], which the pretrainer "
                              f"writes): generate from its run's hf/ export, or pass --hf with a config.json for these weights")
    try:  # the kernels and checkpointing it trained with are how it ran there, not what the model is
        config = ModelConfig.from_dict({**saved, "kernels": "auto", "gradient_checkpointing": False}, source=f"{path} model_config")
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: its model config does not fit this version of qwen3_scratch ({_one_line(e)}): "
                              f"export it to HF with the version that wrote it, then pass --hf") from None
    with torch.device("meta"): model = build_model(config)
    model.to_empty(device=device)
    for m in model.modules():                              # non-checkpoint buffers: rebuilt, not loaded
        if hasattr(m, "inv_freq"): m.reset_parameters()
    try: load_checkpoint(path, model, restore_rng=False)
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"could not load the weights of {path} into the model its config describes "
                              f"({type(e).__name__}: {_one_line(e)[:300]}): pass another checkpoint") from None
    return model.to(dtype)                                 # RoPE's frequencies stay float32 (nbs/02_rope)


def load_for_inference(args):
    "(model, where it came from) for --checkpoint DIR or --hf DIR, on --device in --dtype."
    from qwen3_scratch.errors import ConfigError
    if (args.checkpoint is None) == (args.hf is None):
        raise ConfigError(("pass one of --checkpoint and --hf, not both" if args.checkpoint else "pass the model to load") +
                          f": --checkpoint DIR ({_WHERE}) or --hf DIR (a Hugging Face Qwen3 directory)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"`train.py {args.command}` runs in one process: start it with python, not torchrun")
    device, dtype = _device_and_dtype(args)
    if args.hf is not None: return load_hf_dir(args.hf, device, dtype), Path(args.hf)
    kind, path = find_checkpoint(args.checkpoint)
    return (load_hf_dir(path, device, dtype, "--checkpoint") if kind == "hf" else load_dcp(path, device, dtype)), path


def text_generator(args):
    "(TextGenerator over the model of args and Qwen3's tokenizer, where the model came from, the sampling options)."
    from qwen3_scratch.data.tokenizer import Tokenizer
    from qwen3_scratch.errors import ConfigError
    from qwen3_scratch.eval.generate import SamplingParams, TextGenerator
    SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty)  # refuse before loading
    model, where = load_for_inference(args)
    tok = Tokenizer()
    gen = TextGenerator(model, tok)
    V = gen.config.vocab_size
    if V < tok.vocab_size:
        raise ConfigError(f"{where}: the model's vocab_size={V} is smaller than Qwen3's tokenizer ({tok.vocab_size:,} tokens), "
                          f"which generate and chat read and write text with: pass a model with Qwen3's vocabulary (151936)")
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
              repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed)
    return gen, where, kw


def generate(args, callbacks=()) -> int:
    "Print the completions of every --prompt (labelled thinking and answer with --thinking; JSON lines with --json)."
    from qwen3_scratch.errors import ConfigError
    if not args.prompt: raise ConfigError('pass at least one --prompt "TEXT" (repeat --prompt for several)')
    gen, where, kw = text_generator(args)
    t0 = time.perf_counter()
    outs = gen.generate(list(args.prompt), args.max_new_tokens, n=args.n, thinking=args.thinking, return_details=True,
                        return_logprobs=args.json, **kw)
    dt = time.perf_counter() - t0
    rows = [(i, j, o) for i, g in enumerate(outs) for j, o in enumerate(g if isinstance(g, list) else [g])]
    for i, j, o in rows:
        if args.json: print(json.dumps({"prompt": i, "sample": j, **dataclasses.asdict(o)}, ensure_ascii=False)); continue
        if len(rows) > 1: print(f"=== prompt {i + 1}" + (f", sample {j + 1}" if args.n > 1 else "") + " ===")
        if args.thinking:
            print(f"[thinking]\n{o.thinking if o.thinking is not None else '(no <think> block)'}\n[answer]")
        print(o.raw_text if args.thinking is None else o.text)       # a plain prompt: the continuation as written
    n_tok = sum(len(o.token_ids) for *_, o in rows)
    reasons = ", ".join(f"{r} {sum(o.finish_reason == r for *_, o in rows)}" for r in dict.fromkeys(o.finish_reason for *_, o in rows))
    print(f"[{n_tok} tokens in {dt:.1f} s, {n_tok / max(dt, 1e-9):.0f} tokens/s on {gen.device.type}; finished: {reasons}]",
          file=sys.stderr)
    return 0


DIM, UNDIM = "\x1b[2m", "\x1b[0m"
CHAT_HELP = "/think and /no_think switch thinking on and off, /reset starts a new conversation, /exit (or end of input) quits"


def _read_turn(interactive: bool) -> str | None:
    "The next line of stdin (None at its end); interactively with a prompt and line editing."
    if not interactive:
        line = sys.stdin.readline()
        return None if line == "" else line.rstrip("\n")
    try: return input("> ")
    except EOFError: print(); return None


def _show(piece: str, tty: bool) -> str:
    "A streamed piece as the terminal shows it: the think block dimmed (its tags dropped) on a TTY, as written otherwise."
    return piece.replace("<think>", DIM).replace("</think>", UNDIM) if tty else piece


def chat(args, callbacks=()) -> int:
    "A conversation on stdin/stdout: each line a user turn, the reply streamed; the history is kept with answers only."
    from qwen3_scratch.errors import ConfigError
    from qwen3_scratch.eval.generate import split_thinking
    gen, where, kw = text_generator(args)
    interactive, tty = sys.stdin.isatty(), sys.stdout.isatty()
    thinking, history, failed = args.thinking, [], False   # thinking None: Qwen3's default, on unless a turn says /no_think
    if interactive: print(f"chatting with {where} on {gen.device.type}: {CHAT_HELP}", file=sys.stderr)
    while True:
        line = _read_turn(interactive)
        if line is None: break
        cmd = line.strip()
        if not cmd: continue
        if cmd in ("/exit", "/quit"): break
        if cmd in ("/reset", "/think", "/no_think"):
            if cmd == "/reset": history.clear()
            else: thinking = cmd == "/think"
            print({"/reset": "(a new conversation)", "/think": "(thinking on)", "/no_think": "(thinking off)"}[cmd], file=sys.stderr)
            continue
        if cmd.startswith("/") and cmd[1:].isidentifier():
            print(f"(unknown command {cmd}: {CHAT_HELP})", file=sys.stderr); continue
        history.append({"role": "user", "content": line})
        pieces = []
        try:
            for piece in gen.stream(history, args.max_new_tokens, thinking=thinking, **kw):
                pieces.append(piece); sys.stdout.write(_show(piece, tty)); sys.stdout.flush()
        except ConfigError as e:                          # e.g. the conversation outgrew the context: the session goes on
            history.pop(); failed = True
            print(f"error: {e}; /reset starts a new conversation", file=sys.stderr); continue
        except KeyboardInterrupt:
            if not interactive: raise
            history.pop()
            print((UNDIM if tty else "") + "\n(interrupted: that turn is forgotten)", file=sys.stderr); continue
        raw = "".join(pieces)
        sys.stdout.write((UNDIM if tty and "<think>" in raw and "</think>" not in raw else "") + "\n"); sys.stdout.flush()
        history.append({"role": "assistant", "content": split_thinking(raw)[1]})   # Qwen3's template drops past thinking
    return 2 if failed else 0


def _inference_args(p: argparse.ArgumentParser, max_new_tokens: int):
    m = p.add_argument_group("model")
    m.add_argument("--checkpoint", metavar="DIR", help=f"a training run: {_WHERE}")
    m.add_argument("--hf", metavar="DIR", help="a Hugging Face Qwen3, Qwen3-MoE or Qwen3-VL directory (config.json + safetensors)")
    m.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when there is a GPU")
    m.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 on a GPU, fp32 on the CPU")
    s = p.add_argument_group("sampling (default greedy; Qwen3 suggests --temperature 0.6 --top-p 0.95 --top-k 20 when thinking)")
    s.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in Qwen3's chat template with thinking on (--thinking) or off (--no-thinking)")
    s.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    s.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0, help="0: off")
    s.add_argument("--min-p", type=float, default=0.0)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=None, help="seed of the sampling noise (reproducible samples)")
    s.add_argument("--stop", nargs="+", action="extend", default=[], metavar="STR", help="stop strings (cut off exactly)")


def planned(name: str) -> int:
    print(f"error: `train.py {name}` is planned but not built yet: {PLANNED[name]} comes in a later version; "
          f"today `train.py pretrain` is what runs", file=sys.stderr)
    return 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True, metavar="{pretrain,generate,chat," + ",".join(PLANNED) + "}")
    pt = sub.add_parser("pretrain", help="pretrain through the stages of a training config",
                        description="Pretrain a Qwen3 through the stages of a training config (nbs/35_pretrain).")
    pt.add_argument("--config", default="pretrain", help="a packaged training config (pretrain, pretrain_debug) or a YAML path")
    pt.add_argument("--resume", default=None, help="'latest' (newest intact checkpoint under <out_dir>/checkpoints) or a step_N directory")
    pt.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    pt.add_argument("--show-keys", action="store_true", help="print every config key with its type, default and reason, and exit")
    pt.add_argument("--dry-run", action="store_true", help="plan the layout on a fake process group (meta weights): per-rank "
                    "memory and bytes per collective for each pipeline stage, then exit")
    pt.add_argument("--world-size", type=int, default=None, help="with --dry-run: the number of GPUs to plan for")
    pt.add_argument("--gpu-memory-gb", type=float, default=80.0, help="with --dry-run: the memory of one GPU, for the verdict")
    pt.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=3e-4 pretrain.run_stages=[s1]")
    pt.set_defaults(func=pretrain)
    gp = sub.add_parser("generate", help="complete prompts with a trained or downloaded model",
                        description="Complete prompts with nbs/36_generate's TextGenerator: a training run's checkpoint or a HF "
                                    "Qwen3 directory; prints each completion (thinking and answer labelled with --thinking).")
    gp.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt; repeat for a batch")
    gp.add_argument("--n", type=int, default=1, help="samples per prompt (needs --temperature > 0)")
    gp.add_argument("--json", action="store_true", help="one JSON object per completion: every GenerationOutput field "
                    "(text, token_ids, thinking, logprobs, model_logprobs, finish_reason, raw_text) with prompt and sample")
    _inference_args(gp, 256)
    gp.set_defaults(func=generate)
    cp = sub.add_parser("chat", help="talk to a trained or downloaded model",
                        description=f"A conversation with a model, streamed; stdin may be piped (a user turn a line). {CHAT_HELP}.")
    _inference_args(cp, 1024)
    cp.set_defaults(func=chat)
    for name, what in PLANNED.items(): sub.add_parser(name, help=f"planned: {what}", add_help=False)
    return p


def _one_line_warnings(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def main(argv=None, callbacks=()) -> int:
    "Run the CLI on `argv`; `callbacks` (training-loop `Callback`s) go to the run (tests inject faults this way)."
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PLANNED: return planned(argv[0])     # whatever follows: it cannot run yet
    args = parser().parse_args(argv)
    warnings.showwarning = _one_line_warnings
    from qwen3_scratch.errors import Qwen3Error
    import torch.distributed as dist
    ok = False
    try:
        code = args.func(args, callbacks=callbacks); ok = code == 0
        return code
    except Qwen3Error as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted" + (": resume with --resume latest" if args.command == "pretrain" else ""), file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            if ok: dist.barrier()                       # every rank is done before the group goes away
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
