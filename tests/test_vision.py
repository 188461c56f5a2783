"""Qwen3-VL vision side: ImageProcessor against transformers' processor (bit for bit) and its errors; the vision encoder
against transformers' Qwen3VLVisionModel (outputs, DeepStack features, gradients); the Triton path against the PyTorch
path (Triton's interpreter on CPU, the GPU with CUDA); compile_vision against the eager encoder."""
import copy
import io

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL")
transformers = pytest.importorskip("transformers")
from PIL import Image  # noqa: E402
from transformers import Qwen3VLVisionConfig  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel  # noqa: E402

from qwen3_scratch.model.config import ModelConfig  # noqa: E402
from qwen3_scratch.model.vision.encoder import VisionModel  # noqa: E402
from qwen3_scratch.model.vision.processor import ImageProcessor, smart_resize  # noqa: E402

GPU = torch.cuda.is_available()


def image(h, w, mode="RGB", seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def hf_processor(**kw):
    return Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                                    image_std=[0.5] * 3, **kw)


SIZES = [(448, 448), (300, 451), (37, 500), (1000, 90), (31, 33)]
MODES = ["RGB", "RGBA", "L", "P", "LA", "CMYK"]
PIXELS = [dict(min_pixels=32 * 32, max_pixels=256 * 256), dict(min_pixels=256 * 256, max_pixels=640 * 640)]


@pytest.mark.parametrize("kw", PIXELS)
def test_processor_equals_transformers(kw):
    imgs = [image(h, w, MODES[i % len(MODES)], seed=i) for i, (h, w) in enumerate(SIZES)]
    imgs += [image(64, 96, m, seed=7) for m in MODES]
    ours, ref = ImageProcessor(**kw)(imgs), hf_processor(**kw)(imgs, return_tensors="pt")
    assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert ours["pixel_values"].dtype == ref["pixel_values"].dtype == torch.float32
    assert torch.equal(ours["pixel_values"], ref["pixel_values"])  # bit for bit


def test_processor_defaults_are_qwen3_vl():
    p = ImageProcessor()
    assert (p.patch_size, p.temporal_patch_size, p.merge_size, p.min_pixels, p.max_pixels) == (16, 2, 2, 65536, 16777216)
    out = p([image(448, 448), image(896, 896, seed=1)])
    assert out["image_grid_thw"].tolist() == [[1, 28, 28], [1, 56, 56]]
    assert out["pixel_values"].shape == (28 * 28 + 56 * 56, 3 * 2 * 16 * 16)
    assert p.num_image_tokens(448, 448) == 196
    assert ImageProcessor.from_config(ModelConfig(vision_patch_size=14)).factor == 28  # Qwen2-VL's patch 14, as a value
    for h, w in [(5, 5), (123, 4567), (4096, 4096), (9000, 7000)]:
        th, tw = smart_resize(h, w)
        assert th % 32 == 0 and tw % 32 == 0 and 65536 <= th * tw <= 16777216


def test_processor_inputs_and_errors(tmp_path):
    p = ImageProcessor(min_pixels=32 * 32, max_pixels=128 * 128)
    img = image(100, 120)
    ref = p(img)["pixel_values"]
    buf = io.BytesIO(); img.save(buf, format="PNG")
    (tmp_path / "ok.png").write_bytes(buf.getvalue())
    for same in (np.asarray(img), torch.from_numpy(np.array(img)), buf.getvalue(), tmp_path / "ok.png", str(tmp_path / "ok.png")):
        assert torch.equal(p(same)["pixel_values"], ref)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match="cannot decode image.*bad.jpg"): p([img, tmp_path / "bad.jpg"])
    with pytest.raises(ValueError, match="corrupt or not an image"): p(tmp_path / "cut.png")
    with pytest.raises(ValueError, match="cannot decode"): p(b"not an image")
    with pytest.raises(FileNotFoundError, match="does not exist"): p(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="zero size"): p(Image.new("RGB", (0, 7)))
    with pytest.raises(ValueError, match="no pixels"): p(np.zeros((0, 3, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"): p(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="aspect ratio above 200"): p(image(2, 500))
    with pytest.raises(TypeError, match="cannot read an image"): p(3.5)
    with pytest.raises(ValueError, match="no images"): p([])


VCFG = ModelConfig(vision_enabled=True, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, vocab_size=300, vision_hidden_size=32, vision_num_hidden_layers=3, vision_num_attention_heads=2,
                   vision_intermediate_size=64, vision_patch_size=4, vision_image_size=32, vision_deepstack_layers=[0, 2],
                   mrope_section=[4, 2, 2], kernels="torch")
GRID = torch.tensor([[1, 8, 12], [1, 16, 8], [1, 2, 2]])


def hf_pair():
    c = VCFG
    hcfg = Qwen3VLVisionConfig(depth=c.vision_num_hidden_layers, hidden_size=c.vision_hidden_size,
                               intermediate_size=c.vision_intermediate_size, num_heads=c.vision_num_attention_heads,
                               patch_size=c.vision_patch_size, out_hidden_size=c.hidden_size, num_position_embeddings=64,
                               deepstack_visual_indexes=c.vision_deepstack_layers)
    torch.manual_seed(0)
    hf = Qwen3VLVisionModel(hcfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.normal_(1.0 if "norm" in n and n.endswith("weight") else 0.0, 0.2, generator=g)
    ours = VisionModel(c).eval()
    ours.load_state_dict(hf.state_dict())
    return ours, hf


def test_encoder_equals_transformers():
    ours, hf = hf_pair()
    g = torch.Generator().manual_seed(1)
    px = torch.randn(int(GRID.prod(-1).sum()), 96, generator=g)
    tok, ds = ours(px, GRID)
    ref = hf(px, grid_thw=GRID)
    assert (tok - ref.pooler_output).abs().max() < 1e-5
    assert len(ds) == len(ref.deepstack_features) == 2
    for a, b in zip(ds, ref.deepstack_features): assert (a - b).abs().max() < 1e-5
    w = [torch.randn(t.shape, generator=g) for t in [tok, *ds]]
    sum((t * x).sum() for t, x in zip([tok, *ds], w)).backward()
    sum((t * x).sum() for t, x in zip([ref.pooler_output, *ref.deepstack_features], w)).backward()
    hp = dict(hf.named_parameters())
    for n, p in ours.named_parameters():
        assert torch.allclose(p.grad, hp[n].grad, atol=1e-4, rtol=1e-4), n


def test_encoder_input_errors():
    ours, _ = hf_pair()
    px = torch.randn(96 + 128, 96)
    with pytest.raises(ValueError, match="says 96"): ours(px, GRID[:1])
    with pytest.raises(ValueError, match="multiples of the merge size"): ours(px[:96 + 120], torch.tensor([[1, 8, 12], [1, 15, 8]]))
    with pytest.raises(ValueError, match=r"expected \(num_patches, 96\)"): ours(px[:, :90], GRID[:2])


@pytest.mark.skipif(not GPU and not __import__("importlib").util.find_spec("triton"), reason="needs triton")
def test_triton_path_equals_torch_path():
    dev = "cuda" if GPU else "cpu"
    ref, _ = hf_pair()
    ref = ref.to(dev)
    fused = VisionModel(VCFG.replace(kernels="triton")).to(dev)
    fused.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(2)
    grid = torch.tensor([[1, 8, 12], [1, 4, 8]])
    px = torch.randn(int(grid.prod(-1).sum()), 96, generator=g).to(dev)
    (t0, d0), (t1, d1) = ref(px, grid), fused(px, grid)
    tol = 1e-2 if GPU else 1e-4  # on a GPU the kernel's float32 tl.dot may use TF32
    assert (t0 - t1).abs().max() < tol
    for a, b in zip(d0, d1): assert (a - b).abs().max() < tol
    w = torch.randn(t0.shape, generator=g).to(dev)
    (t0 * w).sum().backward(); (t1 * w).sum().backward()
    fp = dict(fused.named_parameters())
    for n, p in ref.named_parameters():
        if p.grad is not None:  # norm-wise: TF32 rounding on a GPU moves single elements of large gradients
            assert ((p.grad - fp[n].grad).norm() / p.grad.norm()).item() < (1e-2 if GPU else 1e-4), n


def test_compile_vision_equals_eager():
    from qwen3_scratch.model.vision.encoder import VISION_INDUCTOR_OPTIONS, _inductor_knows, compile_vision
    assert all(_inductor_knows(k) for k in VISION_INDUCTOR_OPTIONS)  # every option known to the pinned torch
    ours, _ = hf_pair()
    ours.train()
    comp = compile_vision(copy.deepcopy(ours), backend="aot_eager")  # inductor's input graphs, run op by op
    g = torch.Generator().manual_seed(3)
    grid = torch.tensor([[1, 8, 12], [1, 4, 8]])
    px = torch.randn(int(grid.prod(-1).sum()), 96, generator=g)
    try:
        outs = []
        for m in (ours, comp):
            tok, ds = m(px, grid)
            (tok.square().mean() + sum(d.square().mean() for d in ds)).backward()
            outs.append([tok, *ds] + [p.grad for p in m.parameters()])
        for a, b in zip(*outs): assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="already compiled"): compile_vision(comp)
        with pytest.raises(ValueError, match="not both"): compile_vision(ours, mode="max-autotune", options={})
        with pytest.raises(TypeError, match="VisionModel"): compile_vision(torch.nn.Linear(2, 2))
    finally: torch._dynamo.reset()
