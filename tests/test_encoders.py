"""Patch-encoder registry: the packaged EfficientNet-Lite0, ResNet-50 and ViT checkpoints."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data
from torch import Tensor, nn

from fedslide.client.encoders import PatchEncoder, available_encoders, build_encoder
from fedslide.client.encoders.base import load_checkpoint
from fedslide.client.encoders.efficientnet_lite import SameConv2d, default_weights_path, same_padding
from fedslide.client.encoders.resnet import ResNet50
from fedslide.client.encoders.vit import VisionTransformer, ViTGeometry, default_heads, infer_geometry
from fedslide.common.config.preprocess import EncoderConfig

pytestmark = pytest.mark.usefixtures("two_threads")

QUADRANTS = {  # (rows, cols) of the patch, token indices inside it, token indices of the opposite quadrant
    "top-left": (slice(0, 128), slice(0, 128), [0, 1, 4, 5], [10, 11, 14, 15]),
    "top-right": (slice(0, 128), slice(128, 256), [2, 3, 6, 7], [8, 9, 12, 13]),
    "bottom-left": (slice(128, 256), slice(0, 128), [8, 9, 12, 13], [2, 3, 6, 7]),
    "bottom-right": (slice(128, 256), slice(128, 256), [10, 11, 14, 15], [0, 1, 4, 5]),
}


def _patches(n: int, size: int = 256, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- default encoder


def test_default_encoder_metadata(effnet: PatchEncoder) -> None:
    path = default_weights_path()
    assert effnet.name == "efficientnet_lite0"
    assert effnet.dim == 1280
    assert effnet.has_feature_map
    assert effnet.weights_hash == _sha256(path)
    assert effnet.mean == (0.5, 0.5, 0.5) and effnet.std == (0.5, 0.5, 0.5)
    assert not effnet.training
    assert not any(m.split(".")[0] in ("timm", "torchvision") for m in sys.modules)


def test_default_encoder_loads_every_key(effnet: PatchEncoder) -> None:
    shipped = torch.load(default_weights_path(), map_location="cpu", weights_only=True)
    ours = effnet.state_dict()
    assert set(ours) == {k for k in shipped if not k.startswith("_fc.")}
    for key, value in ours.items():
        assert torch.equal(value, shipped[key]), key


def _resize(img: np.ndarray, size: int) -> Tensor:
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8)


def test_default_encoder_recognises_imagenet_photos(effnet: PatchEncoder) -> None:
    """With the shipped classifier on top, the embeddings classify two bundled photos correctly."""
    shipped = load_checkpoint(default_weights_path())
    x = torch.cat([_resize(data.chelsea(), 224), _resize(data.coffee(), 224)])
    with torch.inference_mode():
        emb, _ = effnet.encode(x)
    top1 = (emb @ shipped["_fc.weight"].T + shipped["_fc.bias"]).argmax(dim=1).tolist()
    assert top1[0] in range(281, 286)  # the ImageNet domestic-cat classes
    assert top1[1] in (967, 968)  # espresso, cup


def test_default_encoder_shapes_tokens_and_determinism(effnet: PatchEncoder) -> None:
    x = _patches(2).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        emb, tokens = effnet.encode(x, token_grid=4)
        emb2, tokens2 = effnet.encode(x, token_grid=4)
        fmap = effnet.forward_features(effnet.normalize(x))
        direct = effnet(effnet.normalize(x))
        plain, none = effnet.encode(x.contiguous())
    assert emb.shape == (2, 1280) and emb.dtype == torch.float32
    assert tokens is not None and tokens.shape == (2, 16, 1280)
    assert fmap.shape == (2, 1280, 8, 8)
    assert torch.equal(emb, emb2) and torch.equal(tokens, tokens2)
    torch.testing.assert_close(tokens.mean(dim=1), emb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(direct, emb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, emb, atol=1e-4, rtol=1e-4)
    assert none is None
    # token (row, col) is the mean of the 2×2 block of the 8×8 map at rows 2r.., cols 2c..
    torch.testing.assert_close(tokens[:, 1 * 4 + 2], fmap[:, :, 2:4, 4:6].mean(dim=(2, 3)), atol=1e-5, rtol=1e-5)
    assert not torch.equal(emb[0], emb[1])


def test_tokens_follow_the_changed_quadrant(effnet: PatchEncoder) -> None:
    """Changing one quadrant of the patch moves mostly that quadrant's 2×2 tokens (row = y, col = x)."""
    base = _patches(1, seed=3)
    batch = [base]
    for rows, cols, _, _ in QUADRANTS.values():
        changed = base.clone()
        changed[:, :, rows, cols] = 255 - changed[:, :, rows, cols]
        batch.append(changed)
    with torch.inference_mode():
        _, tokens = effnet.encode(torch.cat(batch), token_grid=4)
    assert tokens is not None
    for i, (name, (_, _, inside, opposite)) in enumerate(QUADRANTS.items()):
        change = (tokens[i + 1] - tokens[0]).norm(dim=-1)
        assert int(change.argmax()) in inside, name
        assert change[inside].mean() > 2 * change[opposite].mean(), name


def test_normalize_values_layout_and_input_checks(effnet: PatchEncoder) -> None:
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4).contiguous()
    out = effnet.normalize(x)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([-1.0, 51 / 255 / 0.5 - 1.0, 1.0]))
    with pytest.raises(ValueError, match="uint8"):
        effnet.normalize(x.float())
    with pytest.raises(ValueError, match="uint8"):
        effnet.normalize(x[:, :2])


def test_mean_std_override_reaches_the_encoder() -> None:
    enc = build_encoder(EncoderConfig(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6)))
    assert enc.mean == (0.1, 0.2, 0.3) and enc.std == (0.4, 0.5, 0.6)
    out = enc.normalize(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.9 / 0.4, 0.8 / 0.5, 0.7 / 0.6]))


# --------------------------------------------------------------------------- SAME padding


def _conv_reference(x: np.ndarray, w: np.ndarray, stride: int, pad: tuple[int, int]) -> np.ndarray:
    """Single-channel cross-correlation over x zero-padded by (before, after) on both axes."""
    xp = np.pad(x, (pad, pad))
    k = w.shape[0]
    n = (xp.shape[0] - k) // stride + 1
    return np.array(
        [[(xp[i * stride : i * stride + k, j * stride : j * stride + k] * w).sum() for j in range(n)] for i in range(n)]
    )


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "pad"),
    [(6, 3, 2, (0, 1)), (6, 5, 2, (1, 2)), (5, 3, 2, (1, 1)), (7, 5, 1, (2, 2)), (7, 3, 2, (1, 1)), (8, 1, 2, (0, 0))],
)
def test_same_conv_matches_tensorflow_padding(size: int, kernel: int, stride: int, pad: tuple[int, int]) -> None:
    """TF "SAME": output ceil(n/s); total padding split with the extra pixel after (pads written out by hand)."""
    assert same_padding(size, kernel, stride) == pad
    conv = SameConv2d(1, 1, kernel, stride=stride)
    g = torch.Generator().manual_seed(size * 10 + kernel)
    x = torch.randn(1, 1, size, size, generator=g, dtype=torch.float64)
    w = torch.randn(1, 1, kernel, kernel, generator=g, dtype=torch.float64)
    conv = conv.double()
    with torch.no_grad():
        conv.weight.copy_(w)
        out = conv(x)[0, 0].numpy()
    expected = _conv_reference(x[0, 0].numpy(), w[0, 0].numpy(), stride, pad)
    assert out.shape == (-(-size // stride),) * 2
    np.testing.assert_allclose(out, expected, atol=1e-10)


def test_efficientnet_stride2_layers_pad_after_for_256px(effnet: PatchEncoder) -> None:
    """At 256 px every stride-2 layer sees an even input, so TF pads more after than before."""
    sizes: list[tuple[int, int, int]] = []

    def record(mod: SameConv2d, args: tuple[Tensor, ...]) -> None:
        sizes.append((args[0].shape[-1], mod.kernel_size[0], mod.stride[0]))

    strided = [m for m in effnet.modules() if isinstance(m, SameConv2d) and m.stride[0] == 2]
    hooks = [m.register_forward_pre_hook(record) for m in strided]
    try:
        with torch.inference_mode():
            effnet.encode(_patches(1))
    finally:
        for h in hooks:
            h.remove()
    assert sizes == [(256, 3, 2), (128, 3, 2), (64, 5, 2), (32, 3, 2), (16, 5, 2)]
    assert all(same_padding(n, k, s)[1] == same_padding(n, k, s)[0] + 1 for n, k, s in sizes)


# --------------------------------------------------------------------------- ResNet-50


@pytest.fixture(scope="module")
def resnet_source() -> ResNet50:
    torch.manual_seed(0)
    model = ResNet50(name="resnet50", weights_hash="", mean=(0.5,) * 3, std=(0.5,) * 3).eval()
    with torch.no_grad():  # non-trivial BN statistics so a loading mistake shows in the outputs
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.1, 0.3)
    return model


@pytest.fixture(scope="module")
def resnet_ckpt(resnet_source: ResNet50, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DataParallel-style training checkpoint: {"state_dict": {"module.<key>": ...}} with a classifier."""
    state = {f"module.{k}": v for k, v in resnet_source.state_dict().items()}
    state["module.fc.weight"] = torch.zeros(1000, 2048)
    state["module.fc.bias"] = torch.zeros(1000)
    path = tmp_path_factory.mktemp("resnet") / "resnet50.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    return path


def test_resnet50_loads_wrapped_checkpoint(resnet_source: ResNet50, resnet_ckpt: Path) -> None:
    enc = build_encoder(EncoderConfig(name="resnet50", weights=resnet_ckpt))
    assert enc.name == "resnet50" and enc.dim == 2048 and enc.has_feature_map
    assert enc.weights_hash == _sha256(resnet_ckpt)
    assert enc.mean == (0.485, 0.456, 0.406) and enc.std == (0.229, 0.224, 0.225)
    assert enc.layer2[0].conv2.stride == (2, 2) and enc.layer2[0].conv1.stride == (1, 1)  # type: ignore[index]
    x = _patches(1, seed=1).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        emb, tokens = enc.encode(x, token_grid=4)
        fmap = enc.forward_features(enc.normalize(x))
        expected = resnet_source(enc.normalize(x))
    assert emb.shape == (1, 2048) and tokens is not None and tokens.shape == (1, 16, 2048)
    assert fmap.shape == (1, 2048, 8, 8)
    torch.testing.assert_close(emb, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tokens.mean(dim=1), emb, atol=1e-5, rtol=1e-4)


def test_resnet50_truncated_by_name_and_by_checkpoint(
    resnet_source: ResNet50, resnet_ckpt: Path, tmp_path: Path
) -> None:
    trunc = build_encoder(EncoderConfig(name="resnet50_trunc", weights=resnet_ckpt))
    assert trunc.dim == 1024 and trunc.name == "resnet50_trunc"
    x = _patches(1, seed=2)
    with torch.inference_mode():
        fmap = trunc.forward_features(trunc.normalize(x))
    assert fmap.shape == (1, 1024, 16, 16)

    no_layer4 = {k: v for k, v in resnet_source.state_dict().items() if not k.startswith("layer4.")}
    path = tmp_path / "trunc.pth"
    torch.save(no_layer4, path)
    auto = build_encoder(EncoderConfig(name="resnet50", weights=path))
    assert auto.dim == 1024 and auto.weights_hash == _sha256(path) != trunc.weights_hash
    with torch.inference_mode():
        torch.testing.assert_close(auto.encode(x)[0], trunc.encode(x)[0])


def test_resnet50_refuses_missing_unexpected_and_misshapen_keys(resnet_source: ResNet50, tmp_path: Path) -> None:
    state = {k: v for k, v in resnet_source.state_dict().items() if not k.startswith("layer4.")}
    missing = dict(state)
    del missing["layer2.1.bn2.running_var"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing keys: layer2\.1\.bn2\.running_var"):
        build_encoder(EncoderConfig(name="resnet50", weights=tmp_path / "missing.pth"))

    extra = dict(state, **{"layer1.0.se.fc.weight": torch.zeros(4)})
    torch.save({"model": extra}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unexpected keys: layer1\.0\.se\.fc\.weight"):
        build_encoder(EncoderConfig(name="resnet50", weights=tmp_path / "extra.pth"))

    wrong = dict(state, **{"conv1.weight": torch.zeros(64, 3, 3, 3)})
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"conv1\.weight"):
        build_encoder(EncoderConfig(name="resnet50", weights=tmp_path / "wrong.pth"))


# --------------------------------------------------------------------------- ViT

TINY = dict(embed_dim=64, depth=2, patch_size=16, mlp_hidden=128, qkv_bias=True, layerscale=True, final_norm=True)


def _geometry(**over: object) -> ViTGeometry:
    args: dict[str, object] = dict(
        TINY, glu_mlp=False, has_cls=True, num_reg=4, pos_prefix=5, pos_grid=14, fc_norm=False, ln_eps=1e-6
    )
    args.update(over)
    return ViTGeometry(**args)  # type: ignore[arg-type]


def _random_vit(geo: ViTGeometry, heads: int = 2, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(
        name="vit", geometry=geo, heads=heads, pooling="cls", weights_hash="", mean=(0.5,) * 3, std=(0.5,) * 3
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.0)
            elif name in ("cls_token", "reg_token", "pos_embed"):
                p.normal_(0.0, 0.5)
    return model.eval()


def _save_vit(model: VisionTransformer, path: Path) -> Path:
    state = dict(model.state_dict())
    state["head.weight"] = torch.zeros(10, model.geometry.embed_dim)
    state["head.bias"] = torch.zeros(10)
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def vit_source() -> VisionTransformer:
    return _random_vit(_geometry())


@pytest.fixture(scope="module")
def vit_ckpt(vit_source: VisionTransformer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_vit(vit_source, tmp_path_factory.mktemp("vit") / "vit_tiny_reg4.pth")


def test_vit_geometry_is_read_from_the_checkpoint(vit_source: VisionTransformer) -> None:
    geo = infer_geometry(vit_source.state_dict())
    assert geo == _geometry()
    assert infer_geometry(_random_vit(_geometry(num_reg=0, pos_prefix=1, layerscale=False)).state_dict()).num_reg == 0
    # timm no_embed_class (UNI2-h) and DINOv2-style (only the class token has a position) layouts
    assert infer_geometry(_random_vit(_geometry(pos_prefix=0)).state_dict()).pos_prefix == 0
    assert infer_geometry(_random_vit(_geometry(pos_prefix=1)).state_dict()).pos_prefix == 1
    glu = infer_geometry(_random_vit(_geometry(glu_mlp=True)).state_dict())
    assert glu.glu_mlp and glu.mlp_hidden == 128
    assert (default_heads(384), default_heads(768), default_heads(1024), default_heads(1280)) == (6, 12, 16, 16)


def test_vit_loads_and_pools(vit_source: VisionTransformer, vit_ckpt: Path) -> None:
    x = _patches(2, size=224, seed=4).contiguous(memory_format=torch.channels_last)
    cfg = EncoderConfig(name="vit", weights=vit_ckpt, vit_num_heads=2)
    cls = build_encoder(cfg)
    both = build_encoder(cfg.model_copy(update={"vit_pooling": "cls+mean"}))
    mean = build_encoder(cfg.model_copy(update={"vit_pooling": "mean"}))
    assert (cls.dim, both.dim, mean.dim) == (64, 128, 64)
    assert not cls.has_feature_map and not cls.training
    assert cls.weights_hash == _sha256(vit_ckpt) and cls.mean == (0.485, 0.456, 0.406)
    with torch.inference_mode():
        e_cls, tokens = cls.encode(x, token_grid=4)
        e_both, _ = both.encode(x)
        e_mean, _ = mean.encode(x)
        all_tokens = cls.forward_tokens(cls.normalize(x))
        reference = vit_source.forward_tokens(cls.normalize(x))
    assert tokens is None
    assert e_cls.shape == (2, 64) and e_both.shape == (2, 128)
    assert all_tokens.shape == (2, 1 + 4 + 196, 64)
    torch.testing.assert_close(all_tokens, reference)
    torch.testing.assert_close(e_cls, all_tokens[:, 0])
    torch.testing.assert_close(e_mean, all_tokens[:, 5:].mean(dim=1))  # registers are not patches
    torch.testing.assert_close(e_both, torch.cat([e_cls, e_mean], dim=1))
    assert cls.fingerprint != both.fingerprint != mean.fingerprint
    assert cls.fingerprint == build_encoder(cfg).fingerprint
    with pytest.raises(NotImplementedError):
        cls.forward_features(cls.normalize(x))


def test_vit_block_matches_torch_multihead_attention(vit_source: VisionTransformer) -> None:
    """One block against an independent computation with nn.MultiheadAttention."""
    block = vit_source.blocks[0]
    mha = nn.MultiheadAttention(64, 2, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(block.attn.qkv.weight)
        mha.in_proj_bias.copy_(block.attn.qkv.bias)
        mha.out_proj.weight.copy_(block.attn.proj.weight)
        mha.out_proj.bias.copy_(block.attn.proj.bias)
        x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(5))
        h = block.norm1(x)
        x1 = x + block.ls1.gamma * mha(h, h, h, need_weights=False)[0]
        mlp = block.mlp.fc2(F.gelu(block.mlp.fc1(block.norm2(x1))))
        expected = x1 + block.ls2.gamma * mlp
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_vit_packed_swiglu_gates_the_first_half() -> None:
    """timm's SwiGLUPacked (Virchow, UNI2-h): fc1 -> SiLU(first half) * second half -> fc2."""
    block = _random_vit(_geometry(glu_mlp=True), heads=2).blocks[0]
    x = torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        gate, value = block.mlp.fc1(x).split(128, dim=-1)
        torch.testing.assert_close(block.mlp(x), block.mlp.fc2(F.silu(gate) * value))


def test_vit_pos_embed_is_resampled_for_larger_inputs(vit_source: VisionTransformer) -> None:
    """A 224-px (14×14) checkpoint on 256-px input: a smooth position field is resampled at cell centres."""
    g0, g1 = 14, 16
    ys, xs = torch.meshgrid(torch.arange(g0, dtype=torch.float64), torch.arange(g0, dtype=torch.float64), indexing="ij")

    def field(y: Tensor, x: Tensor) -> Tensor:  # different along rows and columns, smooth
        return torch.stack([torch.sin(0.3 * y) + 0.1 * x, torch.cos(0.2 * x) - 0.05 * y], dim=-1)

    model = _random_vit(_geometry())
    with torch.no_grad():
        model.pos_embed[:, 5:, :2] = field(ys, xs).reshape(1, g0 * g0, 2).float()
        model.pos_embed[:, 5:, 2:] = 0.7
    resized = model._patch_pos(g1, g1).reshape(g1, g1, 64)
    assert torch.equal(model._patch_pos(g0, g0), model.pos_embed[:, 5:])
    torch.testing.assert_close(resized[..., 2:], torch.full((g1, g1, 62), 0.7), atol=1e-5, rtol=0)
    centres = (torch.arange(g1, dtype=torch.float64) + 0.5) * g0 / g1 - 0.5  # new cell centres in old grid units
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    expected = field(cy, cx).float()
    inner = slice(2, g1 - 2)
    torch.testing.assert_close(resized[inner, inner, :2], expected[inner, inner], atol=2e-3, rtol=0)

    with torch.inference_mode():
        x = _patches(1, size=256, seed=6)
        tokens = vit_source.forward_tokens(vit_source.normalize(x))
    assert tokens.shape == (1, 5 + 256, 64)


def test_vit_other_layouts_run(tmp_path: Path) -> None:
    """UNI2-style (no_embed_class, packed SwiGLU, fc_norm) and DINOv2-style checkpoints load and run."""
    x = _patches(1, size=224, seed=7)
    for i, geo in enumerate(
        [
            _geometry(pos_prefix=0, glu_mlp=True, final_norm=False, fc_norm=True),
            _geometry(pos_prefix=1, num_reg=2, layerscale=False, qkv_bias=False),
        ]
    ):
        source = _random_vit(geo, heads=4, seed=i)
        path = _save_vit(source, tmp_path / f"layout{i}.pth")
        enc = build_encoder(EncoderConfig(name="vit", weights=path, vit_num_heads=4, vit_pooling="cls+mean"))
        assert enc.geometry == geo  # type: ignore[attr-defined]
        with torch.inference_mode():
            emb, _ = enc.encode(x)
        assert emb.shape == (1, 128) and torch.isfinite(emb).all()


def _to_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm ViT keys -> Hugging Face ViTForImageClassification keys (written independently of the loader)."""
    out: dict[str, Tensor] = {
        "vit.embeddings.cls_token": state["cls_token"],
        "vit.embeddings.position_embeddings": state["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "vit.layernorm.weight": state["norm.weight"],
        "vit.layernorm.bias": state["norm.bias"],
        "classifier.weight": torch.zeros(2, 64),
    }
    for i in range(2):
        b, h = f"blocks.{i}.", f"vit.encoder.layer.{i}."
        for leaf in ("weight", "bias"):
            q, k, v = state[b + "attn.qkv." + leaf].chunk(3, dim=0)
            out[h + "attention.attention.query." + leaf] = q
            out[h + "attention.attention.key." + leaf] = k
            out[h + "attention.attention.value." + leaf] = v
            out[h + "attention.output.dense." + leaf] = state[b + "attn.proj." + leaf]
            out[h + "layernorm_before." + leaf] = state[b + "norm1." + leaf]
            out[h + "layernorm_after." + leaf] = state[b + "norm2." + leaf]
            out[h + "intermediate.dense." + leaf] = state[b + "mlp.fc1." + leaf]
            out[h + "output.dense." + leaf] = state[b + "mlp.fc2." + leaf]
    return out


def test_vit_loads_hugging_face_vit_checkpoint(tmp_path: Path) -> None:
    """Phikon ships as a Hugging Face ViTModel: the same weights under HF names give the same embeddings."""
    source = _random_vit(_geometry(num_reg=0, pos_prefix=1, layerscale=False), heads=2, seed=3)
    torch.save(source.state_dict(), tmp_path / "timm.pth")
    torch.save(_to_hf(source.state_dict()), tmp_path / "hf.bin")
    x = _patches(1, size=224, seed=8)
    timm_enc = build_encoder(EncoderConfig(name="vit", weights=tmp_path / "timm.pth", vit_num_heads=2))
    hf_enc = build_encoder(EncoderConfig(name="vit", weights=tmp_path / "hf.bin", vit_num_heads=2))
    with torch.inference_mode():
        torch.testing.assert_close(hf_enc.encode(x)[0], timm_enc.encode(x)[0], atol=1e-3, rtol=1e-3)


def test_vit_hash_follows_file_bytes_and_bad_checkpoints_are_refused(
    vit_source: VisionTransformer, vit_ckpt: Path, tmp_path: Path
) -> None:

    copy = tmp_path / "copy.pth"
    shutil.copyfile(vit_ckpt, copy)
    first = build_encoder(EncoderConfig(name="vit", weights=copy))
    assert first.weights_hash == _sha256(vit_ckpt)

    state = dict(vit_source.state_dict())
    state["blocks.1.mlp.fc2.bias"] = state["blocks.1.mlp.fc2.bias"] + 1.0
    torch.save(state, copy)
    changed = build_encoder(EncoderConfig(name="vit", weights=copy))
    assert changed.weights_hash == _sha256(copy) != first.weights_hash

    del state["blocks.1.ls2.gamma"]
    torch.save(state, copy)
    with pytest.raises(ValueError, match=r"missing keys: blocks\.1\.ls2\.gamma"):
        build_encoder(EncoderConfig(name="vit", weights=copy))

    torch.save({"pos_embed": state["pos_embed"]}, copy)
    with pytest.raises(ValueError, match="patch_embed.proj.weight"):
        build_encoder(EncoderConfig(name="vit", weights=copy))

    torch.save({**vit_source.state_dict(), "epoch": 3}, copy)
    with pytest.raises(ValueError, match="'epoch'"):
        build_encoder(EncoderConfig(name="vit", weights=copy))

    with pytest.raises(ValueError, match="divisible"):
        build_encoder(EncoderConfig(name="vit", weights=vit_ckpt, vit_num_heads=3))


def test_vit_head_count_changes_the_output(vit_ckpt: Path) -> None:
    x = _patches(1, size=224, seed=9)
    one = build_encoder(EncoderConfig(name="vit", weights=vit_ckpt))
    two = build_encoder(EncoderConfig(name="vit", weights=vit_ckpt, vit_num_heads=2))
    assert (one.heads, two.heads) == (1, 2)  # type: ignore[attr-defined]
    with torch.inference_mode():
        assert not torch.allclose(one.encode(x)[0], two.encode(x)[0], atol=1e-4)


# --------------------------------------------------------------------------- registry


def test_registry_names_and_unknown_name() -> None:
    assert available_encoders()[0] == "efficientnet_lite0"
    assert {"efficientnet_lite0", "resnet50", "vit"} <= set(available_encoders())
    with pytest.raises(ValueError, match=r"'densenet'.*efficientnet_lite0, resnet50, resnet50_trunc, vit"):
        build_encoder(EncoderConfig(name="densenet"))


@pytest.mark.parametrize("name", ["resnet50", "vit"])
def test_missing_weights_give_a_clear_error(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"`encoder\.weights`.*nothing is downloaded"):
        build_encoder(EncoderConfig(name=name))
    with pytest.raises(ValueError, match=r"does not exist.*`encoder\.weights`.*nothing is downloaded"):
        build_encoder(EncoderConfig(name=name, weights=tmp_path / "absent.pth"))


def test_default_encoder_accepts_a_replacement_checkpoint(effnet: PatchEncoder, tmp_path: Path) -> None:
    path = tmp_path / "lite0_finetuned.pth"
    state = dict(effnet.state_dict())
    state["_bn1.bias"] = state["_bn1.bias"] + 0.5
    torch.save(state, path)
    enc = build_encoder(EncoderConfig(weights=path))
    assert enc.weights_hash == _sha256(path) != effnet.weights_hash
    with pytest.raises(ValueError, match="does not exist"):
        build_encoder(EncoderConfig(weights=tmp_path / "absent.pth"))
