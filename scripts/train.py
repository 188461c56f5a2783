#!/usr/bin/env python
"""qwen3_scratch's training CLI: one subcommand per stage of the recipe.

pretrain: the three-stage pretraining of nbs/35_pretrain from a YAML config (qwen3_scratch/configs/training/) with
dotted key=value overrides (every key: `train.py pretrain --show-keys`). The other stages are planned: each
subcommand (sft, grpo, dpo, rm, eval, generate, chat, pipeline) says so in one line until its notebook lands.

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

Exit codes: 0 done; 2 a config, data or checkpoint problem, or a planned subcommand (the message says what to do);
3 the run stopped after train.max_bad_steps non-finite losses in a row (a checkpoint was saved first).
"""
import argparse
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# subcommands of the recipe that are not built yet, and where they will come from
PLANNED = {"sft": "SFT: long-CoT cold start and thinking-mode fusion (nbs/40_sft)",
           "grpo": "GRPO with verifiable rewards (nbs/54_grpo)", "dpo": "DPO (nbs/56_dpo)",
           "rm": "the reward model (nbs/55_reward_model)", "eval": "evaluation (nbs/60_evaluate)",
           "generate": "generation (nbs/36_generate)", "chat": "chat (nbs/36_generate)",
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


def planned(name: str) -> int:
    print(f"error: `train.py {name}` is planned but not built yet: {PLANNED[name]} comes in a later version; "
          f"today `train.py pretrain` is what runs", file=sys.stderr)
    return 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True, metavar="{pretrain," + ",".join(PLANNED) + "}")
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
        print("interrupted: resume with --resume latest", file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            if ok: dist.barrier()                       # every rank is done before the group goes away
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
