"""Our Qwen3Model against transformers' Qwen3ForCausalLM: logits, loss, gradients, save/load both ways, KV cache.

CPU runs in float32 (max |Δlogits| <= 1e-4). With CUDA present the same checks run in bfloat16 on the GPU.
"""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402

from qwen3_scratch.model.attention import KVCache  # noqa: E402
from qwen3_scratch.model.hf import config_from_hf, load_hf, save_hf  # noqa: E402

CONFIGS = {  # name: HF Qwen3Config kwargs
    "tied-mha": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16, tie_word_embeddings=True),
    "untied-gqa2-hd32": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, head_dim=32,
                             tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "tied-gqa4-yarn": dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True,
                           rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                            "rope_theta": 1e6}),
    "untied-gqa4-bias-yarn-beta": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=64,
                                       attention_bias=True, tie_word_embeddings=False,
                                       rope_parameters={"rope_type": "yarn", "factor": 2.0, "beta_fast": 16, "beta_slow": 2,
                                                        "original_max_position_embeddings": 96, "rope_theta": 5e5}),
}
DEVICES = [("cpu", torch.float32)] + ([("cuda", torch.bfloat16)] if torch.cuda.is_available() else [])
SEQ = 150  # longer than the YaRN configs' original context, so the interpolated planes are exercised


def make_hf(name, seed=0, dtype=torch.float32, device="cpu"):
    kw = dict(vocab_size=503, intermediate_size=96, num_hidden_layers=3, max_position_embeddings=512, **CONFIGS[name])
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**kw))
    with torch.no_grad():  # norm gains and biases away from their init, so every parameter matters
        for n, p in model.named_parameters():
            if "norm" in n: p.normal_(1.0, 0.2)
            elif n.endswith(".bias"): p.normal_(0.0, 0.1)
    return model.to(device=device, dtype=dtype).eval()


def ids_for(batch=2, seq=SEQ, vocab=503, seed=1, device="cpu"):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)


def shifted(ids):
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)


def tol(dtype):
    return 1e-4 if dtype == torch.float32 else 3e-2  # bf16: relative error of the logits as a whole


def check_close(ours, ref, dtype):
    ours, ref = ours.float(), ref.float()
    if dtype == torch.float32: assert (ours - ref).abs().max() <= tol(dtype), (ours - ref).abs().max()
    else: assert ((ours - ref).norm() / ref.norm()) <= tol(dtype), ((ours - ref).norm() / ref.norm())


@pytest.fixture
def checkpoint(tmp_path, request):
    name, (device, dtype) = request.param
    hf = make_hf(name)
    hf.save_pretrained(tmp_path / "hf")
    return name, device, dtype, tmp_path / "hf", hf.to(device=device, dtype=dtype)


PARAMS = [(n, d) for n in CONFIGS for d in DEVICES]
IDS = [f"{n}-{d[0]}" for n, d in PARAMS]


@pytest.mark.parametrize("checkpoint", PARAMS, ids=IDS, indirect=True)
def test_logits_loss_and_grads_match(checkpoint):
    name, device, dtype, path, hf = checkpoint
    ours = load_hf(path, dtype=dtype, device=device).eval()
    ids = ids_for(device=device)
    out = ours(ids, labels=shifted(ids))  # on a GPU (kernels="auto") the fused loss returns no logits
    ref = hf(ids, labels=ids)  # HF shifts inside the model
    with torch.no_grad(): check_close(ours(ids).logits, ref.logits, dtype)
    assert abs(out.loss.item() - ref.loss.item()) <= (1e-5 if dtype == torch.float32 else 2e-2)

    out.loss.backward(); ref.loss.backward()
    ours_params = dict(ours.named_parameters())
    hf_grads = {k: p.grad for k, p in hf.named_parameters()}
    if dtype != torch.float32:  # bf16: both implementations against the float32 gradients, all weights together
        ref32 = make_hf(name, device=device)
        ref32(ids, labels=ids).loss.backward()
        g32 = {k: p.grad for k, p in ref32.named_parameters()}
    names, checked = [], 0
    for k, g_ref in hf_grads.items():
        ok = k.removeprefix("model.")
        if ok == "lm_head.weight" and ours.lm_head is None: continue  # tied: same tensor as the embedding in both
        g = ours_params[ok].grad
        assert g is not None, k
        if dtype == torch.float32: torch.testing.assert_close(g, g_ref, atol=2e-6, rtol=1e-4, msg=k)
        else: assert (g.float() - g32[k]).norm() <= 0.25 * g32[k].norm() + 1e-6, k  # no weight far off
        names.append(k); checked += 1
    assert checked == len(ours_params)
    if dtype != torch.float32:
        flat = lambda gs: torch.cat([gs[k].float().flatten() for k in names])
        ref_flat = torch.cat([g32[k].flatten() for k in names])
        e_ours = ((torch.cat([ours_params[k.removeprefix("model.")].grad.float().flatten() for k in names]) - ref_flat).norm()
                  / ref_flat.norm()).item()
        e_hf = ((flat(hf_grads) - ref_flat).norm() / ref_flat.norm()).item()
        assert e_ours <= 1.5 * e_hf + 1e-3, (e_ours, e_hf)  # no further from float32 than transformers in bf16


@pytest.mark.parametrize("checkpoint", PARAMS, ids=IDS, indirect=True)
def test_save_hf_loads_in_transformers(checkpoint, tmp_path):
    name, device, dtype, path, hf = checkpoint
    ours = load_hf(path, dtype=dtype, device=device).eval()
    save_hf(ours, tmp_path / "ours")
    back = Qwen3ForCausalLM.from_pretrained(tmp_path / "ours", dtype=dtype).to(device).eval()
    ids = ids_for(device=device)
    with torch.no_grad():
        check_close(back(ids).logits, ours(ids).logits, dtype)
    again = load_hf(tmp_path / "ours", device=device)
    assert again.state_dict().keys() == ours.state_dict().keys()
    for k, v in ours.state_dict().items(): assert torch.equal(again.state_dict()[k], v), k
    assert json.loads((tmp_path / "ours/config.json").read_text())["torch_dtype"] == str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("checkpoint", PARAMS, ids=IDS, indirect=True)
def test_kv_cache_decoding_equals_full_forward(checkpoint):
    name, device, dtype, path, hf = checkpoint
    ours = load_hf(path, dtype=dtype, device=device).eval()
    ids = ids_for(seq=60, device=device)
    with torch.no_grad():
        full = ours(ids).logits
        cache = KVCache.from_config(ours.config, batch_size=2, max_seq_len=64, dtype=dtype, device=device)
        steps = [ours(ids[:, :25], kv_cache=cache).logits]
        steps += [ours(ids[:, t:t + 1], kv_cache=cache).logits for t in range(25, 60)]
        check_close(torch.cat(steps, 1), full, dtype)
        check_close(full, hf(ids).logits, dtype)


@pytest.mark.parametrize("checkpoint", [("tied-gqa4-yarn", DEVICES[0])], indirect=True)
def test_padding_mask_matches_hf(checkpoint):
    _, device, dtype, path, hf = checkpoint
    ours = load_hf(path).eval()
    ids = ids_for(seq=40)
    mask = torch.ones_like(ids); mask[0, :7] = 0; mask[1, 33:] = 0  # left padding in row 0, right padding in row 1
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert (a[keep] - b[keep]).abs().max() <= 1e-4


def test_sharded_hf_checkpoint(tmp_path):
    hf = make_hf("untied-gqa2-hd32")
    hf.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = load_hf(tmp_path).eval()
    ids = ids_for()
    with torch.no_grad(): assert (ours(ids).logits - hf(ids).logits).abs().max() <= 1e-4


def test_dtype_choice(tmp_path):
    hf = make_hf("tied-mha", dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path)
    assert next(load_hf(tmp_path).parameters()).dtype == torch.bfloat16  # from the checkpoint
    assert next(load_hf(tmp_path, dtype="float32").parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="unknown dtype"): load_hf(tmp_path, dtype="float33")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"): load_hf(tmp_path)
    hf = make_hf("tied-mha")
    hf.save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a/config.json").read_text())
    # pickles only: refused, never torch.load-ed
    (tmp_path / "p").mkdir(); (tmp_path / "p/config.json").write_text(json.dumps(cfg))
    torch.save(hf.state_dict(), tmp_path / "p/pytorch_model.bin")
    with pytest.raises(ValueError, match="pickled weights"): load_hf(tmp_path / "p")
    # a config that does not belong to the weights
    (tmp_path / "a/config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 4, "intermediate_size": 100}))
    with pytest.raises(ValueError, match=r"missing \(11\).*\n.*wrong shape \(9\)"): load_hf(tmp_path / "a")
    with pytest.raises(ValueError, match="model_type='llama'"): config_from_hf({**cfg, "model_type": "llama"})
    with pytest.raises(ValueError, match="use_sliding_window"): config_from_hf({**cfg, "use_sliding_window": True})
    with pytest.raises(ValueError, match="divisible"): config_from_hf({**cfg, "num_key_value_heads": 3})


def test_save_hf_never_clobbers(tmp_path):
    hf = make_hf("tied-mha"); hf.save_pretrained(tmp_path / "a")
    ours = load_hf(tmp_path / "a")
    (tmp_path / "b").mkdir(); (tmp_path / "b/notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"): save_hf(ours, tmp_path / "b")
    assert (tmp_path / "b/notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="max_shard_size"): save_hf(ours, tmp_path / "c", max_shard_size="lots")
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".c.*"))  # nothing half-written left behind
