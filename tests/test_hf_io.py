"""load_hf on damaged checkpoints (every file: truncated, empty, garbage, wrong JSON), and save_hf's file modes.

Each bad file must raise one CheckpointError that names the file and the fix, never the raw SafetensorError,
JSONDecodeError or KeyError of the libraries underneath. Tiny models, no transformers: runs in a few seconds.
"""
import json
import os
import shutil
import stat

import pytest
import torch
from safetensors import SafetensorError

from qwen3_scratch.errors import CheckpointError
from qwen3_scratch.model.config import ModelConfig
from qwen3_scratch.model.hf import _read, build_model, load_hf, save_hf

TINY = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=8, tie_word_embeddings=False)
RAW = (SafetensorError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(TINY)
    m.init_weights()
    return m


@pytest.fixture(scope="module")
def ckpts(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    single, sharded = save_hf(model, d / "single"), save_hf(model, d / "sharded", max_shard_size="4KB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    return {"single": single, "sharded": sharded}


def damaged(ckpts, tmp_path, kind, name, data):
    "A copy of checkpoint `kind` whose file `name` holds `data` (bytes, str, or a function of the good bytes)."
    d = shutil.copytree(ckpts[kind], tmp_path / kind)
    f = d / name
    if callable(data): data = data(f.read_bytes())
    f.write_bytes(data if isinstance(data, bytes) else data.encode())
    return d, f


def assert_names_file(d, f, *contains):
    with pytest.raises(CheckpointError) as ei: load_hf(d)
    e, msg = ei.value, str(ei.value)
    assert not isinstance(e, RAW), type(e).__mro__
    assert str(f) in msg, msg
    for c in contains: assert c in msg, msg
    return e


def first_shard(ckpts): return sorted(ckpts["sharded"].glob("model-*.safetensors"))[0].name


SAFETENSORS_DAMAGE = {  # name: (how the file is damaged, what safetensors says)
    "truncated": (lambda b: b[:len(b) // 2], "file not fully covered"),
    "truncated-header": (lambda b: b[:20], "invalid header length"),
    "length-only": (lambda b: b[:4], "header too small"),
    "empty": (b"", "header too small"),
    "garbage": (lambda b: bytes(range(256)) * 8, "header"),
    "html-error-page": (b"<html><body>404 Not Found</body></html>", "header too large"),
    "trailing-bytes": (lambda b: b + b"\0" * 16, "file not fully covered"),
}


@pytest.mark.parametrize("how", SAFETENSORS_DAMAGE)
@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_damaged_safetensors(ckpts, tmp_path, kind, how):
    data, says = SAFETENSORS_DAMAGE[how]
    name = "model.safetensors" if kind == "single" else first_shard(ckpts)
    d, f = damaged(ckpts, tmp_path, kind, name, data)
    e = assert_names_file(d, f, "is corrupt or incomplete", "re-download it", says)
    assert isinstance(e.__cause__, SafetensorError)  # the library's error stays attached as the cause


def test_read_after_the_headers(ckpts, tmp_path):
    d, f = damaged(ckpts, tmp_path, "single", "model.safetensors", lambda b: b[:-3])  # damaged after load_hf read the header
    with pytest.raises(CheckpointError, match="reading model.norm.weight failed") as ei: _read(f, "model.norm.weight")
    assert str(f) in str(ei.value) and not isinstance(ei.value, RAW)


INDEX_DAMAGE = {  # name: (file content, what the message says)
    "truncated": (lambda b: b[:len(b) // 2], "not valid JSON"),
    "empty": ("", "the file is empty"),
    "binary": (b"\xff\xfe\x00\x01garbage", "not UTF-8 text"),
    "a-list": ("[1, 2]", "it holds a JSON list, not an object"),
    "no-weight-map": ('{"metadata": {"total_size": 1}}', "no weight_map object"),
    "empty-weight-map": ('{"weight_map": {}}', "no weight_map object"),
    "weight-map-list": ('{"weight_map": ["model-00001-of-00002.safetensors"]}', "no weight_map object"),
    "weight-map-numbers": ('{"weight_map": {"model.norm.weight": 1}}', "weight_map values must be shard file names"),
}


@pytest.mark.parametrize("how", INDEX_DAMAGE)
def test_damaged_index(ckpts, tmp_path, how):
    data, says = INDEX_DAMAGE[how]
    d, f = damaged(ckpts, tmp_path, "sharded", "model.safetensors.index.json", data)
    assert_names_file(d, f, "is corrupt or incomplete", "re-download it", says)


def good_config(ckpts): return json.loads((ckpts["single"] / "config.json").read_text())


CONFIG_DAMAGE = {  # name: (config.json content, or a function of the good dict; what the message says)
    "truncated": (lambda c: json.dumps(c)[:60], "not valid JSON"),
    "empty": ("", "the file is empty"),
    "whitespace": ("\n  \n", "the file is empty"),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8 text"),
    "a-list": ("[]", "it holds a JSON list, not an object"),
    "a-string": ('"qwen3"', "it holds a JSON str, not an object"),
    "no-model-type": (lambda c: {k: v for k, v in c.items() if k != "model_type"}, "it has no model_type"),
    "no-hidden-size": (lambda c: {k: v for k, v in c.items() if k != "hidden_size"}, "lacks the required hidden_size"),
    "no-heads": (lambda c: {k: v for k, v in c.items() if k != "num_attention_heads"},
                 "lacks the required num_attention_heads"),
    "only-model-type": ('{"model_type": "qwen3"}', "lacks the required hidden_size, num_attention_heads"),
    "vl-without-text-config": ('{"model_type": "qwen3_vl"}', "needs a text_config object"),
    "hidden-size-string": (lambda c: {**c, "hidden_size": "16"}, "a value has the wrong type"),
    "rope-scaling-list": (lambda c: {**c, "rope_scaling": [1]}, "a value has the wrong type"),
}


@pytest.mark.parametrize("how", CONFIG_DAMAGE)
def test_damaged_config(ckpts, tmp_path, how):
    data, says = CONFIG_DAMAGE[how]
    if callable(data): data = data(good_config(ckpts))
    if isinstance(data, dict): data = json.dumps(data)
    d, f = damaged(ckpts, tmp_path, "single", "config.json", data)
    assert_names_file(d, f, "is corrupt or incomplete", "re-download it", says)


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_config_of_another_model(ckpts, tmp_path, kind):
    d, f = damaged(ckpts, tmp_path, kind, "config.json", json.dumps({**good_config(ckpts), "model_type": "llama"}))
    assert_names_file(d, f, "model_type='llama'; load_hf reads", "point it at a Qwen3 checkpoint")


def test_config_values_load_hf_refuses(ckpts, tmp_path):
    "config_from_hf's own refusals keep their message, now with the file's name in front."
    d, f = damaged(ckpts, tmp_path, "single", "config.json", json.dumps({**good_config(ckpts), "use_sliding_window": True}))
    assert_names_file(d, f, "use_sliding_window=true")
    f.write_text(json.dumps({**good_config(ckpts), "torch_dtype": "float33"}))
    assert_names_file(d, f, "unknown dtype 'float33'")


def test_existing_errors_unchanged(ckpts, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json: not a HF checkpoint directory"): load_hf(tmp_path / "nowhere")
    d = shutil.copytree(ckpts["sharded"], tmp_path / "partial")
    (d / first_shard(ckpts)).unlink()  # a download that stopped before this shard
    with pytest.raises(FileNotFoundError, match=f"the index lists shards that are not there: \\['{first_shard(ckpts)}'\\]"):
        load_hf(d)


def test_good_checkpoints_still_load(model, ckpts):
    for d in ckpts.values():
        for (k, a), b in zip(model.state_dict().items(), load_hf(d).state_dict().values()): assert torch.equal(a, b), k


def mode(p): return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("umask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640), (0o077, 0o700, 0o600)])
def test_save_hf_modes_follow_umask(model, tmp_path, umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        for out in (save_hf(model, tmp_path / "single"), save_hf(model, tmp_path / "sharded", max_shard_size="4KB"),
                    save_hf(model, tmp_path / "single", dtype="bfloat16", overwrite=True)):
            assert mode(out) == dir_mode, (out, oct(mode(out)))
            files = list(out.iterdir())
            assert "config.json" in {f.name for f in files} and any(f.suffix == ".safetensors" for f in files)
            assert {f.name: oct(mode(f)) for f in files} == {f.name: oct(file_mode) for f in files}
        assert os.umask(umask) == umask  # save_hf left the umask as it found it
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded", "single"]  # no temporary directory left behind
