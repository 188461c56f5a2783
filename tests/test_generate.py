"""TextGenerator against transformers: greedy tokens equal `generate` on the same weights (written by `save_hf`) for
dense, MoE and Qwen3-VL with an image, 32+ new tokens, batched prompts of different lengths included; the top-k /
top-p / min-p / repetition-penalty filters equal transformers' logits processors on random logits; returned
log-probabilities equal a full forward's; stop tokens end rows and give their finish reason."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from qwen3_scratch.errors import ConfigError  # noqa: E402
from qwen3_scratch.eval.generate import (SamplingParams, TextGenerator, min_p_filter, repetition_penalty,  # noqa: E402
                                         sampling_logits, top_k_filter, top_p_filter)
from qwen3_scratch.model.config import ModelConfig  # noqa: E402
from qwen3_scratch.model.hf import save_hf  # noqa: E402
from qwen3_scratch.model.transformer import Qwen3Model  # noqa: E402

SMALL = dict(vocab_size=320, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, intermediate_size=128, kernels="torch", tie_word_embeddings=False)
CONFIGS = {"dense": ModelConfig.from_preset("debug").replace(**SMALL),
           "moe": ModelConfig.from_preset("debug_moe").replace(**SMALL, num_experts=4, num_experts_per_tok=2,
                                                               moe_intermediate_size=32)}
NEW = 40


def _peaked(model, seed=0):
    "Weights large enough that greedy choices are clear (random init's logits are nearly flat, so ties would decide)."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n: p.normal_(1.0, 0.1, generator=g)
            else: p.normal_(0.0, 0.15, generator=g)
    return model.eval()


def _prompts(seed=1, lengths=(9, 4, 15)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 300, (n,), generator=g).tolist() for n in lengths]


def _hf_greedy(hf, prompt, new=NEW, **kw):
    out = hf.generate(input_ids=torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                      pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    model = _peaked(Qwen3Model(CONFIGS[request.param]))
    path = save_hf(model, tmp_path_factory.mktemp(request.param) / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, hf


def test_greedy_equals_transformers(pair):
    model, hf = pair
    gen = TextGenerator(model)
    prompts = _prompts()
    batch = gen.generate(prompts, NEW, ignore_eos=True, return_details=True)
    for p, o in zip(prompts, batch):
        want = _hf_greedy(hf, p)
        assert o.token_ids == want, (o.token_ids, want)
        assert gen.generate(p, NEW, ignore_eos=True, return_details=True).token_ids == want   # alone == in the batch
        assert o.finish_reason == "length" and len(o.token_ids) == NEW


def test_logprobs_equal_a_full_forward(pair):
    model, _ = pair
    gen = TextGenerator(model)
    p = _prompts()[0]
    outs = gen.generate(p, 24, n=4, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    assert len({tuple(o.token_ids) for o in outs}) > 1
    for o in outs:
        with torch.no_grad(): logits = model(torch.tensor([p + o.token_ids])).logits[0, len(p) - 1:-1].float()
        ids = torch.tensor(o.token_ids)[:, None]
        torch.testing.assert_close(torch.tensor(o.model_logprobs), logits.log_softmax(-1).gather(-1, ids)[:, 0],
                                   rtol=1e-4, atol=1e-4)
        proc = sampling_logits(logits, SamplingParams(temperature=0.8, top_p=0.9))
        torch.testing.assert_close(torch.tensor(o.logprobs), proc.log_softmax(-1).gather(-1, ids)[:, 0], rtol=1e-4, atol=1e-4)
    again = gen.generate(p, 24, n=4, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]


def test_stop_tokens_end_rows(pair):
    model, hf = pair
    gen = TextGenerator(model, sync_every=4)
    p = _prompts()[1]
    free = _hf_greedy(hf, p)
    stop = free[10]                                     # a token greedy decoding produces at step 11 (or earlier)
    o = gen.generate(p, NEW, stop_token_ids=[stop], ignore_eos=True, return_details=True)
    k = free.index(stop) + 1
    assert o.token_ids == free[:k] and o.finish_reason == "eos"
    hf_stop = hf.generate(input_ids=torch.tensor([p]), max_new_tokens=NEW, do_sample=False, eos_token_id=stop, pad_token_id=0)
    assert o.token_ids == hf_stop[0, len(p):].tolist()


def test_filters_equal_transformers_processors():
    from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 200, generator=g) * 4
    ids = torch.randint(0, 200, (6, 12), generator=g)
    for k in (1, 7, 50): torch.testing.assert_close(top_k_filter(z, k), TopKLogitsWarper(k)(ids, z.clone()))
    for p in (0.1, 0.6, 0.95): torch.testing.assert_close(top_p_filter(z, p), TopPLogitsWarper(p)(ids, z.clone()))
    for m in (0.05, 0.3): torch.testing.assert_close(min_p_filter(z, m), MinPLogitsWarper(m)(ids, z.clone()))
    seen = torch.zeros_like(z, dtype=torch.bool).scatter(1, ids, True)
    torch.testing.assert_close(repetition_penalty(z, seen, 1.3), RepetitionPenaltyLogitsProcessor(1.3)(ids, z.clone()))
    params = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.2)
    want = RepetitionPenaltyLogitsProcessor(1.2)(ids, z.clone())
    for w in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(40), TopPLogitsWarper(0.9)): want = w(ids, want)
    torch.testing.assert_close(sampling_logits(z, params, seen), want)


def test_errors():
    model = Qwen3Model(CONFIGS["dense"].replace(max_position_embeddings=64)).eval()
    gen = TextGenerator(model)
    with pytest.raises(ConfigError, match="max_new_tokens <= 54"): gen.generate(list(range(10)), 60)
    with pytest.raises(ConfigError, match="temperature > 0"): gen.generate([1, 2], 4, n=2)
    with pytest.raises(ConfigError, match="text-only"): gen.generate([1, 2], 4, images=[torch.zeros(3, 8, 8)])
    with pytest.raises(ConfigError, match="needs a tokenizer"): gen.generate("hello", 4)
    with pytest.raises(ConfigError, match="top_p"): gen.generate([1, 2], 4, temperature=1.0, top_p=0.0)


def test_vision_language_greedy_equals_transformers(tmp_path):
    "Qwen3-VL with an image in the prompt: the same tokens as transformers' generate (the image features given)."
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from qwen3_scratch.model.hf import config_to_hf
    from qwen3_scratch.model.multimodal import Qwen3VLModel
    IMG, VS, VE = 297, 295, 296
    cfg = ModelConfig(vision_enabled=True, vocab_size=300, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, intermediate_size=96, vision_hidden_size=32,
                      vision_num_hidden_layers=3, vision_num_attention_heads=2, vision_intermediate_size=64,
                      vision_patch_size=4, vision_image_size=32, vision_deepstack_layers=[0, 2], mrope_section=[4, 2, 2],
                      rope_theta=5e6, tie_word_embeddings=False, image_token_id=IMG, vision_start_token_id=VS,
                      vision_end_token_id=VE, kernels="torch")
    torch.manual_seed(0)
    model = _peaked(Qwen3VLModel(cfg))
    hcfg = {k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "model_type")}
    hf = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**hcfg)).eval()
    sd = {("language_model.lm_head.weight" if k == "lm_head.weight" else k.removeprefix("model.")): k
          for k in hf.state_dict()}
    ours = model.state_dict()
    hf.load_state_dict({hk: ours[k] for k, hk in sd.items()})
    grid = torch.tensor([[1, 8, 12]])
    px = torch.randn(int(grid.prod()), 96, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(1)
    head, tail = torch.randint(0, 290, (5,), generator=g).tolist(), torch.randint(0, 290, (4,), generator=g).tolist()
    prompt = head + [VS, IMG, VE] + tail                                     # one placeholder per image
    expanded = torch.tensor([head + [VS] + [IMG] * (int(grid.prod()) // 4) + [VE] + tail])
    with torch.no_grad():
        want = hf.generate(input_ids=expanded, pixel_values=px, image_grid_thw=grid, mm_token_type_ids=(expanded == IMG).int(),
                           max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)[0, expanded.shape[1]:]
    got = TextGenerator(model).generate(prompt, 32, images={"pixel_values": px, "image_grid_thw": grid}, ignore_eos=True,
                                        return_details=True)
    assert got.token_ids == want.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16, the Triton kernels, CUDA graphs)")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_gpu_bf16_greedy_and_cuda_graphs(name, tmp_path):
    "On a GPU in bf16 with our kernels: greedy tokens equal transformers' (the first 4 free-running, and >= 90% of them"
    " when transformers reads our own prefix), and the CUDA-graph step gives the eager step's tokens exactly."
    torch.manual_seed(0)
    model = _peaked(Qwen3Model(CONFIGS[name].replace(kernels="auto")))
    path = save_hf(model, tmp_path / "hf")
    model = model.cuda().to(torch.bfloat16)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    graphed, eager = TextGenerator(model), TextGenerator(model, cuda_graphs=False)
    assert graphed.cuda_graphs
    prompts = _prompts()
    for p in prompts:
        want = hf.generate(input_ids=torch.tensor([p], device="cuda"), max_new_tokens=NEW, min_new_tokens=NEW,
                           do_sample=False, pad_token_id=0)[0, len(p):].tolist()
        got = graphed.generate(p, NEW, ignore_eos=True, return_details=True).token_ids
        assert got[:4] == want[:4], (got, want)     # free-running greedy parts once bf16 rounding flips a near-tie
        with torch.no_grad():                       # (an MoE router's top-k most of all): teacher-forced, every token
            seq = torch.tensor([p + got], device="cuda")
            pred = hf(seq[:, :-1]).logits[0, len(p) - 1:].argmax(-1).tolist()
        assert sum(a == b for a, b in zip(pred, got)) >= 0.9 * NEW, (pred, got)
    for rows in (1, 4, 8, 32):                      # powers of two: the eager step then has the graph's shapes
        ps = (prompts * 12)[:rows]
        a = [o.token_ids for o in graphed.generate(ps, NEW, ignore_eos=True, return_details=True)]
        b = [o.token_ids for o in eager.generate(ps, NEW, ignore_eos=True, return_details=True)]
        assert a == b, rows
