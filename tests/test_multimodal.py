"""Qwen3VLModel against transformers' Qwen3VLForConditionalGeneration and Qwen3VLMoeForConditionalGeneration: logits
(one image, two images of different sizes, a padded batch), loss and gradients, save_pretrained -> load_hf and save_hf ->
from_pretrained, the Hub's transposed MoE expert layout, cached generation == full forward == HF generate; and the
whole data path (tokenizer, ImageProcessor, MultimodalCollator) feeding the model."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLMoeConfig,  # noqa: E402
                          Qwen3VLMoeForConditionalGeneration)

from qwen3_scratch.model.attention import KVCache  # noqa: E402
from qwen3_scratch.model.config import ModelConfig  # noqa: E402
from qwen3_scratch.model.hf import config_to_hf, load_hf, save_hf  # noqa: E402
from qwen3_scratch.model.multimodal import Qwen3VLModel  # noqa: E402

IMG, VS, VE = 297, 295, 296
BASE = ModelConfig(vision_enabled=True, vocab_size=300, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, intermediate_size=96, vision_hidden_size=32, vision_num_hidden_layers=3,
                   vision_num_attention_heads=2, vision_intermediate_size=64, vision_patch_size=4, vision_image_size=32,
                   vision_deepstack_layers=[0, 2], mrope_section=[4, 2, 2], rope_theta=5e6, tie_word_embeddings=False,
                   image_token_id=IMG, vision_start_token_id=VS, vision_end_token_id=VE, kernels="torch")
CONFIGS = {"dense": BASE, "dense-tied": BASE.replace(tie_word_embeddings=True),
           "moe": BASE.replace(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)}


def make_hf(cfg, seed=0):
    hcfg = {k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "model_type")}
    torch.manual_seed(seed)
    cls, ccls = ((Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeConfig) if cfg.num_experts
                 else (Qwen3VLForConditionalGeneration, Qwen3VLConfig))
    hf = cls(ccls(**hcfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n and n.endswith("weight"): p.normal_(1.0, 0.2, generator=g)
            elif n.endswith("bias"): p.normal_(0.0, 0.1, generator=g)
            elif "experts" in n or n.endswith("mlp.gate.weight"): p.normal_(0.0, 0.05, generator=g)  # HF leaves them empty
    return hf.eval()


def prompt(grids, seed=1):
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randint(0, 290, (5,), generator=g)]
    for t, h, w in grids:
        parts += [torch.tensor([VS]), torch.full((t * h * w // 4,), IMG), torch.tensor([VE]), torch.randint(0, 290, (4,), generator=g)]
    return torch.cat(parts)[None]


def pixels(grids, seed=2):
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, 96, generator=torch.Generator().manual_seed(seed))


def hf_logits(hf, ids, px, grid, **kw):
    return hf(input_ids=ids, pixel_values=px, image_grid_thw=grid, mm_token_type_ids=(ids == IMG).int(), **kw).logits


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    cfg = CONFIGS[request.param]
    hf = make_hf(cfg)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    return request.param, hf, load_hf(d, dtype="float32").eval(), d


@pytest.mark.parametrize("grids", [[[1, 8, 12]], [[1, 8, 12], [1, 16, 8]]], ids=["one-image", "two-images"])
def test_logits_equal_transformers(pair, grids):
    name, hf, model, _ = pair
    assert isinstance(model, Qwen3VLModel) and model.config.tie_word_embeddings == (name == "dense-tied")
    ids, grid = prompt(grids), torch.tensor(grids)
    px = pixels(grids)
    with torch.no_grad():
        ours, ref = model(ids, px, grid).logits, hf_logits(hf, ids, px, grid)
    assert (ours - ref).abs().max() <= 1e-4, (ours - ref).abs().max()


def test_padded_batch_equals_transformers(pair):
    _, hf, model, _ = pair
    a, b = prompt([[1, 8, 12]], seed=3), prompt([[1, 16, 8], [1, 4, 4]], seed=4)
    T = max(a.shape[1], b.shape[1])
    ids = torch.zeros(2, T, dtype=torch.long); am = torch.zeros(2, T, dtype=torch.long)
    ids[0, :a.shape[1]], am[0, :a.shape[1]] = a[0], 1   # right padding, as MultimodalCollator pads
    ids[1, :b.shape[1]], am[1, :b.shape[1]] = b[0], 1
    grid = torch.tensor([[1, 8, 12], [1, 16, 8], [1, 4, 4]])
    px = pixels(grid.tolist())
    with torch.no_grad():
        ours = model(ids, px, grid, attention_mask=am).logits
        ref = hf_logits(hf, ids, px, grid, attention_mask=am)
    m = am.bool()
    assert (ours[m] - ref[m]).abs().max() <= 1e-4


def test_loss_and_gradients_equal_transformers(pair):
    name, hf, model, _ = pair
    grids = [[1, 8, 12], [1, 16, 8]]
    ids, grid, px = prompt(grids), torch.tensor(grids), pixels(grids)
    nxt = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], 1)
    labels = nxt.masked_fill(nxt == IMG, -100)  # ours come shifted; image positions are not predicted
    model.zero_grad(); hf.zero_grad()
    out = model(ids, px, grid, labels=labels)
    ref = hf(input_ids=ids, pixel_values=px, image_grid_thw=grid, mm_token_type_ids=(ids == IMG).int(),
             labels=ids.masked_fill(ids == IMG, -100))
    ce = out.loss - (model.config.router_aux_loss_coef * out.aux_loss if out.aux_loss is not None else 0)
    assert abs(ce.item() - ref.loss.item()) < 1e-5
    ce.backward(); ref.loss.backward()
    hp = dict(hf.named_parameters())
    checked = 0
    for n, p in model.named_parameters():
        hn = "lm_head.weight" if n == "language_model.lm_head.weight" else "model." + n
        if p.grad is None or hn not in hp: continue
        assert torch.allclose(p.grad, hp[hn].grad, atol=1e-5, rtol=1e-3), n
        checked += 1
    assert checked > 40


def test_save_hf_round_trip(pair, tmp_path):
    _, hf, model, _ = pair
    grids = [[1, 8, 12], [1, 16, 8]]
    ids, grid, px = prompt(grids), torch.tensor(grids), pixels(grids)
    save_hf(model, tmp_path / "out")
    cls = type(hf)
    back = cls.from_pretrained(tmp_path / "out").eval()
    again = load_hf(tmp_path / "out").eval()
    with torch.no_grad():
        ref = model(ids, px, grid).logits
        assert (hf_logits(back, ids, px, grid) - ref).abs().max() <= 1e-4
        assert torch.equal(again(ids, px, grid).logits, ref)


def test_hub_moe_expert_layout(tmp_path):
    "Qwen3-VL-MoE checkpoints on the Hub store experts as (E, d, 2I) / (E, I, d); transformers 5 saves (E, 2I, d)."
    cfg = CONFIGS["moe"]
    hf = make_hf(cfg)
    hf.save_pretrained(tmp_path)
    ref = load_hf(tmp_path).eval()
    sd = load_file(tmp_path / "model.safetensors")
    sd = {k: v.transpose(1, 2).contiguous() if ".mlp.experts." in k else v for k, v in sd.items()}
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    hub = load_hf(tmp_path).eval()
    for (n, a), (_, b) in zip(ref.state_dict().items(), hub.state_dict().items()): assert torch.equal(a, b), n


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_cached_generation_equals_full_forward(name):
    cfg = CONFIGS[name]
    hf = make_hf(cfg, seed=5)
    model = Qwen3VLModel(cfg).eval()
    sd = {("language_model.lm_head.weight" if k == "lm_head.weight" else k.removeprefix("model.")): v
          for k, v in hf.state_dict().items()}
    model.load_state_dict(sd)
    grids = [[1, 8, 12], [1, 4, 8]]
    ids, grid, px = prompt(grids, seed=6), torch.tensor(grids), pixels(grids, seed=7)
    cache = KVCache.from_config(cfg, batch_size=1, max_seq_len=ids.shape[1] + 8)
    with torch.no_grad():
        steps = [model(ids, px, grid, kv_cache=cache, logits_to_keep=1).logits[:, -1]]
        seq = ids
        for _ in range(6):
            nxt = steps[-1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            steps.append(model(nxt, kv_cache=cache).logits[:, -1])
        full = model(seq, px, grid).logits
        gen = hf.generate(input_ids=ids, pixel_values=px, image_grid_thw=grid, mm_token_type_ids=(ids == IMG).int(),
                          max_new_tokens=6, do_sample=False)
    for i, s in enumerate(steps): assert (s - full[:, ids.shape[1] - 1 + i]).abs().max() <= 1e-4
    assert torch.equal(gen[:, ids.shape[1]:], seq[:, ids.shape[1]:])


def test_data_path_feeds_the_model():
    "Tokenizer placeholder -> ImageProcessor -> MultimodalCollator -> Qwen3VLModel; token counts agree; batch == alone."
    np = pytest.importorskip("numpy")
    from PIL import Image
    from qwen3_scratch.data.collator import MultimodalCollator
    from qwen3_scratch.data.tokenizer import Tokenizer
    from qwen3_scratch.model.vision.processor import ImageProcessor
    tok = Tokenizer()
    cfg = BASE.replace(vocab_size=151936, image_token_id=151655, vision_start_token_id=151652, vision_end_token_id=151653)
    proc = ImageProcessor.from_config(cfg, min_pixels=16 * 16, max_pixels=64 * 64)
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(40, 72), (64, 30)]]
    mc = MultimodalCollator(merge_size=cfg.vision_merger_spatial_factor)
    samples = []
    for img, text in zip(imgs, ["Describe this.", "What colour is it?"]):
        ids = tok.encode("<|vision_start|><|image_pad|><|vision_end|>" + text)
        samples.append({"input_ids": ids, **proc([img])})
        assert int(mc.image_tokens(samples[-1]["image_grid_thw"])[0]) == proc.num_image_tokens(img.height, img.width)
    batch = mc(samples)
    torch.manual_seed(0)
    model = Qwen3VLModel(cfg).eval()
    with torch.no_grad():
        out = model(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"],
                    attention_mask=batch["attention_mask"], labels=batch["labels"])
        assert torch.isfinite(out.loss)
        for i, s in enumerate(samples):
            one = mc([s])
            alone = model(one["input_ids"], one["pixel_values"], one["image_grid_thw"]).logits[0]
            n = alone.shape[0]
            assert (out.logits[i, :n] - alone).abs().max() <= 1e-4
