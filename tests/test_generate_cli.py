"""`scripts/train.py generate` and `chat` end to end on CPU: greedy output equals `TextGenerator.generate` in-process, the
--json fields, seeded samples repeat, a piped chat carries the first turn into the second prompt, a pretraining run's
DCP checkpoint, its run directory and its hf/ export give the same text, and bad input is one line with exit code 2."""
import dataclasses, importlib.util, io, json, os, subprocess, sys, warnings
from pathlib import Path

import pytest
import torch

from qwen3_scratch.data.tokenizer import QWEN3_EMBED_SIZE, QWEN3_VOCAB_SIZE, Tokenizer
from qwen3_scratch.eval.generate import GenerationOutput, TextGenerator, split_thinking
from qwen3_scratch.model.config import ModelConfig
from qwen3_scratch.model.hf import load_hf, save_hf
from qwen3_scratch.model.transformer import Qwen3Model

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "scripts" / "train.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
PAD = list(range(QWEN3_VOCAB_SIZE, QWEN3_EMBED_SIZE))   # ids without text: the CLI ends a completion on one, as here
NEW = 12

spec = importlib.util.spec_from_file_location("train_cli", TRAIN)
train = importlib.util.module_from_spec(spec); spec.loader.exec_module(train)


@pytest.fixture(scope="module")
def tok(): return Tokenizer()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    "A tiny Qwen3 with Qwen3's vocabulary, weights large enough that greedy choices are clear, written by save_hf."
    config = ModelConfig.from_preset("debug").replace(num_hidden_layers=2, hidden_size=64, intermediate_size=128, kernels="torch")
    torch.manual_seed(0)
    model = Qwen3Model(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters(): p.normal_(1.0 if "norm" in n else 0.0, 0.1 if "norm" in n else 0.15, generator=g)
        model.embed_tokens.weight[QWEN3_VOCAB_SIZE:] = 0               # the padding rows, as an untrained embedding leaves them
    return save_hf(model, tmp_path_factory.mktemp("tiny") / "hf")


@pytest.fixture(scope="module")
def ref(hf_dir, tok):
    "The engine in-process on the same weights, loaded as the CLI loads them (fp32 on the CPU)."
    return TextGenerator(load_hf(hf_dir, dtype=torch.float32), tok)


@pytest.fixture
def cli(monkeypatch, capsys):
    "Run `train.py ARGS` in this process: (exit code, stdout, stderr)."
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)   # main() makes warnings one line; undo after
    def run(*argv, stdin=None):
        if stdin is not None: monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = train.main([str(a) for a in argv])
        out = capsys.readouterr()
        return code, out.out, out.err
    return run


def test_generate_greedy_equals_engine(cli, hf_dir, ref):
    prompt = "The quick brown fox"
    code, out, err = cli("generate", "--hf", hf_dir, "--prompt", prompt, "--max-new-tokens", NEW, "--device", "cpu")
    assert code == 0, err
    want = ref.generate(prompt, NEW, stop_token_ids=PAD)
    assert want and out == want + "\n"
    assert f"{NEW} tokens" in err and "Traceback" not in err
    code, out, err = cli("generate", "--hf", hf_dir, "--prompt", prompt, "--max-new-tokens", NEW, "--thinking")
    o = ref.generate(prompt, NEW, thinking=True, return_details=True, stop_token_ids=PAD)
    thinking = o.thinking if o.thinking is not None else "(no <think> block)"
    assert code == 0 and out == f"[thinking]\n{thinking}\n[answer]\n{o.text}\n", (out, o)
    code, out, err = cli("generate", "--hf", hf_dir, "--prompt", prompt, "--max-new-tokens", NEW, "--no-thinking")
    assert code == 0 and out == ref.generate(prompt, NEW, thinking=False, return_details=True, stop_token_ids=PAD).text + "\n"


def test_generate_json_fields(cli, hf_dir, ref):
    prompts = ["Once upon a time", "2 + 2 ="]
    code, out, err = cli("generate", "--hf", hf_dir, *[a for p in prompts for a in ("--prompt", p)], "--max-new-tokens", NEW, "--json")
    assert code == 0, err
    rows = [json.loads(l) for l in out.splitlines()]
    assert len(rows) == 2 and [r["prompt"] for r in rows] == [0, 1] and [r["sample"] for r in rows] == [0, 0]
    fields = {f.name for f in dataclasses.fields(GenerationOutput)}
    for r, p in zip(rows, prompts):
        assert set(r) == fields | {"prompt", "sample"}
        want = ref.generate(p, NEW, return_logprobs=True, stop_token_ids=PAD)
        assert r["token_ids"] == want.token_ids and r["raw_text"] == want.raw_text and r["text"] == want.text
        assert len(r["logprobs"]) == len(r["model_logprobs"]) == len(r["token_ids"]) == NEW
        assert r["finish_reason"] == "length" and r["thinking"] is None


def test_generate_seeded_samples_repeat(cli, hf_dir, ref):
    argv = ("generate", "--hf", hf_dir, "--prompt", "Hello", "--max-new-tokens", NEW, "--n", 2, "--temperature", 1, "--seed", 0, "--json")
    code, a, err = cli(*argv); assert code == 0, err
    code, b, err = cli(*argv); assert code == 0, err
    assert a == b
    rows = [json.loads(l) for l in a.splitlines()]
    assert [(r["prompt"], r["sample"]) for r in rows] == [(0, 0), (0, 1)]
    want = ref.generate("Hello", NEW, n=2, temperature=1.0, seed=0, stop_token_ids=PAD)
    assert [r["token_ids"] for r in rows] == [o.token_ids for o in want]
    code, out, err = cli(*argv[:-1])                                   # plain text: each sample labelled
    assert code == 0 and out.count("=== prompt 1, sample") == 2


def test_chat_piped_carries_the_history(hf_dir, ref):
    turns = ["Hi, who are you?", "Tell me more."]
    r = subprocess.run([sys.executable, str(TRAIN), "chat", "--hf", str(hf_dir), "--max-new-tokens", str(NEW)],
                       input="\n".join(turns) + "\n/exit\nnever read\n", cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    history, want = [], []
    for t in turns:                                # the second prompt is the templated first turn, its answer, the second
        history.append({"role": "user", "content": t})
        raw = ref.generate(history, NEW, stop_token_ids=PAD)
        want.append(raw)
        history.append({"role": "assistant", "content": split_thinking(raw)[1]})
    assert r.stdout == "".join(w + "\n" for w in want)
    first_turn = ref.tokenizer.apply_chat_template(history[:1], tokenize=True)
    assert ref.encode(history[:3])[:len(first_turn)] == first_turn       # the first turn opens the second prompt


def test_chat_commands(cli, hf_dir, ref):
    "/no_think switches thinking off, /reset forgets the conversation: the same question twice, the same answer."
    code, out, err = cli("chat", "--hf", hf_dir, "--max-new-tokens", NEW, stdin="/no_think\nWhy?\n/reset\n\nWhy?\n/bogus\n")
    assert code == 0, err
    want = ref.generate([{"role": "user", "content": "Why?"}], NEW, thinking=False, stop_token_ids=PAD)
    assert out == f"{want}\n{want}\n"
    assert "(thinking off)" in err and "(a new conversation)" in err and "unknown command /bogus" in err
    assert train._show("<think>\nhm\n</think>\n\nyes", tty=True) == "\x1b[2m\nhm\n\x1b[0m\n\nyes"
    assert train._show("<think>a</think>b", tty=False) == "<think>a</think>b"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    "A real pretraining run of the tiny model: 2 steps, a DCP checkpoint at step 2 and the hf/ export."
    d = tmp_path_factory.mktemp("pretrain")
    words = [f"The {a} {b} sat on the {c}." for a in ("old", "red", "lazy") for b in ("cat", "dog") for c in ("mat", "hill")]
    (d / "a.txt").write_text("\n".join(words * 40) + "\n")
    tiny = ("model.overrides={hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, "
            "head_dim: 16, intermediate_size: 128, kernels: torch}")
    r = subprocess.run([sys.executable, str(TRAIN), "pretrain", "--config", "pretrain_debug", "train.device=cpu", tiny,
                        f"out_dir={d / 'run'}", f"data.files={d / 'a.txt'}", "pretrain.run_stages=[s1]", "pretrain.stages.s1.steps=2",
                        "pretrain.stages.s1.seq_len=32", "train.micro_batch_size=2", "train.grad_accum=1", "checkpoint.every=2",
                        "train.val_every=2", "train.val_batches=1", "schedule.warmup_steps=1", "log.progress=false",
                        "log.tensorboard=false", "log.plot=false"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return d / "run"


def test_generate_from_a_pretraining_checkpoint(cli, run_dir, tok):
    step = run_dir / "checkpoints" / "step_000002"
    assert (step / "COMPLETE").is_file() and (run_dir / "hf" / "config.json").is_file()
    outs = []
    for where in (run_dir, step, run_dir / "hf"):
        code, out, err = cli("generate", "--checkpoint", where, "--prompt", "The red cat", "--max-new-tokens", 8)
        assert code == 0, err
        outs.append(out)
    want = TextGenerator(load_hf(run_dir / "hf", dtype=torch.float32), tok).generate("The red cat", 8, stop_token_ids=PAD)
    assert outs == [want + "\n"] * 3


def test_checkpoint_without_model_config(cli, tmp_path):
    "A DCP checkpoint that does not say which model it holds (not written by the pretrainer): one line, the fix."
    from qwen3_scratch.training.checkpoint import save_checkpoint
    model = Qwen3Model(ModelConfig.from_preset("debug").replace(vocab_size=256, hidden_size=32, num_hidden_layers=1,
                                                                 intermediate_size=64, kernels="torch"))
    path = save_checkpoint(tmp_path / "checkpoints", 1, model)
    code, out, err = cli("generate", "--checkpoint", path, "--prompt", "x")
    assert code == 2 and err.count("\n") == 1 and "does not record its model config" in err and "hf/ export" in err


def _bad_dirs(tmp_path):
    (tmp_path / "llama").mkdir(); (tmp_path / "empty").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4}))
    (tmp_path / "run" / "checkpoints" / "step_000004.tmp").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step_000004.tmp" / "trainer_rank0.pt").write_bytes(b"")


@pytest.mark.parametrize("case", ["neither", "both", "missing", "not_a_checkpoint", "not_hf", "llama_hf", "llama_ckpt",
                                  "interrupted_run", "interrupted_step", "prompt_too_long", "no_prompt"])
def test_bad_input_is_one_line_exit_2(cli, hf_dir, tmp_path, case):
    _bad_dirs(tmp_path)
    model, wants = {
        "neither": ([], "pass the model to load: --checkpoint DIR"),
        "both": (["--hf", hf_dir, "--checkpoint", hf_dir], "not both"),
        "missing": (["--checkpoint", tmp_path / "nope"], "does not exist"),
        "not_a_checkpoint": (["--checkpoint", tmp_path / "empty"], "is not a checkpoint"),
        "not_hf": (["--hf", tmp_path / "empty"], "has no config.json"),
        "llama_hf": (["--hf", tmp_path / "llama"], "model_type='llama'; load_hf reads ['qwen3', 'qwen3_moe', 'qwen3_vl'"),
        "llama_ckpt": (["--checkpoint", tmp_path / "llama"], "model_type='llama'"),
        "interrupted_run": (["--checkpoint", tmp_path / "run"], "no complete, intact checkpoint"),
        "interrupted_step": (["--checkpoint", tmp_path / "run" / "checkpoints" / "step_000004.tmp"], "save was interrupted"),
        "prompt_too_long": (["--hf", hf_dir, "--max-new-tokens", 200], "exceeds the model's context of 4096 tokens"),
        "no_prompt": (["--hf", hf_dir], "pass at least one --prompt"),
    }[case]
    prompt = [] if case == "no_prompt" else ["--prompt", "word " * 4000 if case == "prompt_too_long" else "hello"]
    code, out, err = cli("generate", *model, *prompt)
    assert code == 2 and out == "", (code, out, err)
    assert err.count("\n") == 1 and err.startswith("error: ") and wants in err, err


def test_bad_input_as_a_process(tmp_path):
    "Run as a user runs it: no traceback, one line, exit 2; chat shares the loading and its errors."
    for cmd in (["generate", "--prompt", "hi"], ["chat"]):
        r = subprocess.run([sys.executable, str(TRAIN), *cmd, "--hf", str(tmp_path / "nope")], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr, r.stderr
