"""Pixel-level LRMIL stage 1: the loss by hand, layer access, what trains, fine-tuning a site and re-encoding."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from fedslide.client.encoders import PatchEncoder, build_encoder
from fedslide.client.encoders.base import sha256_file
from fedslide.client import lowres_finetune
from fedslide.client.encoders.vit import VisionTransformer, ViTGeometry
from fedslide.client.lowres_finetune import (
    Stage1Trainer,
    collect_patches,
    finetune_site,
    finetuned_feature_path,
    reencode_site,
)
from fedslide.client.stain_augment import hed_jitter
from fedslide.client.synth.slide import write_slide
from fedslide.common.config.base import ConfigError
from fedslide.common.config.finetune import FinetuneConfig
from fedslide.common.config.preprocess import EncoderConfig
from fedslide.common.distillation.pixel_stage1_loss import (
    attention_weighted_loss,
    layer_alignment_loss,
    pixel_stage1_loss,
)
from fedslide.common.features import feature_path, read_feature_file
from fedslide.deploy.cli import main

pytestmark = pytest.mark.usefixtures("two_threads")

ENC = "efficientnet_lite0"


def _cfg(**kw: object) -> FinetuneConfig:
    base: dict = {"progress": False, "epochs": 1, "batch_size": 2, "encoder": {"device": "cpu", "batch_size": 16}}
    base.update(kw)
    return FinetuneConfig.model_validate(base)


# ---------------------------------------------------------------- the loss against a hand computation


def test_layer_alignment_matches_hand_computation() -> None:
    gen = torch.Generator().manual_seed(0)
    ratio = 2
    maps = {0: torch.randn(2, 3, 4, 4, generator=gen), 5: torch.randn(2, 2, 2, 2, generator=gen)}
    targets = {0: torch.randn(2, 4, 3, generator=gen), 5: torch.randn(2, 4, 2, generator=gen)}
    mask = torch.tensor([[True, False, True, True], [False, False, False, False]])
    # patch 1 has no child: only patch 0 counts; its children are slots 0 (row 0, col 0), 2 (row 1, col 0), 3
    expected_layers = []
    for layer, fmap in maps.items():
        cell = fmap.shape[-1] // ratio
        errs = []
        for slot in (0, 2, 3):
            r, c = divmod(slot, ratio)
            block = fmap[0, :, r * cell : (r + 1) * cell, c * cell : (c + 1) * cell]
            mean = block.reshape(block.shape[0], -1).mean(dim=1)
            errs.append(float(((mean - targets[layer][0, slot]) ** 2).mean()))
        expected_layers.append(sum(errs) / len(errs))
    expected = sum(expected_layers) / len(expected_layers)
    got = layer_alignment_loss(maps, targets, mask)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # moving one absent child's target changes nothing; moving a present one does
    moved = {k: v.clone() for k, v in targets.items()}
    moved[0][0, 1] += 10.0
    assert float(layer_alignment_loss(maps, moved, mask)) == pytest.approx(expected, rel=1e-5)
    moved[0][0, 2] += 10.0
    assert float(layer_alignment_loss(maps, moved, mask)) > expected + 1.0


def test_layer_alignment_averages_patches_that_have_children() -> None:
    maps = {0: torch.zeros(3, 1, 2, 2)}
    targets = {0: torch.tensor([[[1.0], [1.0], [1.0], [1.0]], [[2.0], [0.0], [0.0], [0.0]], [[5.0]] * 4])}
    mask = torch.tensor([[True] * 4, [True, False, False, False], [False] * 4])
    # patch 0: mean err 1; patch 1: err 4 on its one child; patch 2 ignored
    assert float(layer_alignment_loss(maps, targets, mask)) == pytest.approx(2.5)


def test_attention_weighting_matches_hand_computation() -> None:
    student = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    teacher = torch.tensor(
        [
            [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [9.0, 9.0]],
            [[1.0, 3.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]],
        ]
    )
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    attention = torch.tensor([[0.1, 0.3, 0.0, 5.0], [0.0, 0.0, 0.7, 0.3]])
    # patch 0: weights over present children 0.1, 0.3, 0 -> 0.25, 0.75, 0 (the absent child's 5.0 is ignored)
    p0 = 0.25 * 1.0 + 0.75 * 4.0
    # patch 1: present children have zero attention -> uniform over them
    p1 = 0.5 * (0.0 + 4.0) / 2 + 0.5 * 0.0
    got = attention_weighted_loss(student, teacher, mask, attention)
    assert float(got) == pytest.approx((p0 + p1) / 2)
    uniform = attention_weighted_loss(student, teacher, mask, None)
    assert float(uniform) == pytest.approx(((1 + 4 + 9) / 3 + p1) / 2)


def test_total_weights_the_terms_and_switches_attention_off() -> None:
    maps = {0: torch.ones(1, 2, 2, 2)}
    children = {0: torch.zeros(1, 4, 2)}
    final = torch.full((1, 4, 3), 2.0)
    student_final = torch.zeros(1, 3)
    mask = torch.ones(1, 4, dtype=torch.bool)
    on = pixel_stage1_loss(
        maps, student_final, children, final, mask, attention=None, use_attention_term=True, lambda_layer=0.5
    )
    assert float(on.layer) == pytest.approx(1.0) and float(on.attention) == pytest.approx(4.0)
    assert float(on.total) == pytest.approx(0.5 * 1.0 + 4.0)
    off = pixel_stage1_loss(maps, student_final, children, final, mask, attention=None, use_attention_term=False)
    assert float(off.attention) == 0.0 and float(off.total) == pytest.approx(1.0)


# ---------------------------------------------------------------- encoder layers


def test_effnet_layers_come_from_the_same_pass(effnet: PatchEncoder) -> None:
    x = effnet.normalize(torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8))
    assert effnet.num_layers == 17 and effnet.resolve_layers(["early", "middle", "last"]) == [4, 8, 16]
    assert effnet.resolve_layers([-1, 0, "last"]) == [0, 16]
    with pytest.raises(ValueError, match="out of range"):
        effnet.resolve_layers([17])
    with torch.no_grad():
        out = effnet.forward_layers(x, [4, 16])
        torch.testing.assert_close(out.embedding, effnet(x))
        torch.testing.assert_close(out.maps[16], effnet.forward_features(x))
    assert out.maps[4].shape == (2, 40, 16, 16) and out.summaries[4].shape == (2, 40)


def _tiny_vit() -> VisionTransformer:
    geo = ViTGeometry(
        embed_dim=32,
        depth=3,
        patch_size=16,
        mlp_hidden=64,
        glu_mlp=False,
        qkv_bias=True,
        layerscale=False,
        has_cls=True,
        num_reg=0,
        pos_prefix=1,
        pos_grid=8,
        final_norm=True,
        fc_norm=False,
        ln_eps=1e-6,
    )
    torch.manual_seed(0)
    vit = VisionTransformer(
        name="vit", geometry=geo, heads=2, pooling="cls", weights_hash="x", mean=(0.5,) * 3, std=(0.5,) * 3
    )
    for p in vit.parameters():
        nn.init.normal_(p, std=0.05)
    return vit.eval()


def test_vit_layers_are_patch_token_maps() -> None:
    vit = _tiny_vit()
    x = vit.normalize(torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8))
    with torch.no_grad():
        out = vit.forward_layers(x, [0, 2])
        torch.testing.assert_close(out.embedding, vit(x))
        tokens = vit.blocks[0](vit._embed_tokens(x)[0])
    assert out.maps[0].shape == (2, 32, 8, 8)
    torch.testing.assert_close(out.maps[0][:, :, 1, 2], tokens[:, 1 + 1 * 8 + 2])  # row 1, col 2
    torch.testing.assert_close(out.summaries[0], tokens[:, 0])  # the class token at that layer


# ---------------------------------------------------------------- what trains


def _batch(encoder: PatchEncoder, layers: list[int], n: int = 2, size: int = 128) -> dict:
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    with torch.no_grad():
        out = encoder.forward_layers(encoder.normalize(x), layers)
    children = {layer: torch.randn(n, 16, out.summaries[layer].shape[1]).half() for layer in layers}
    return {
        "pixels": x,
        "children": children,
        "final": torch.randn(n, 16, encoder.dim).half(),
        "mask": torch.ones(n, 16, dtype=torch.bool),
        "attention": torch.rand(n, 16),
    }


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_last_n_trains_only_the_last_layers_and_keeps_bn_stats(effnet: PatchEncoder) -> None:
    cfg = _cfg(trainable="last-n", last_n=2, layers=["early", "last"], attention="uniform", lr=1e-2)
    trainer = Stage1Trainer(effnet, cfg, torch.device("cpu"))
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    trainer.step(**_batch(effnet, trainer.layers))
    after = trainer.student.state_dict()
    changed = _changed(before, after)
    assert changed and all(k.startswith(("_blocks.15.", "_conv_head.", "_bn1.")) for k in changed), changed
    assert not any("running" in k for k in changed)  # BN statistics are kept by default
    assert {k for k in changed} == {k for k in trainer.trainable}  # every trainable parameter moved
    # the teacher is untouched
    assert all(torch.equal(v, before[k]) for k, v in effnet.state_dict().items())


def test_all_trains_the_stem_too(effnet: PatchEncoder) -> None:
    cfg = _cfg(trainable="all", layers=["early"], attention="off", stain={"enabled": False})
    trainer = Stage1Trainer(effnet, cfg, torch.device("cpu"))
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    trainer.step(**_batch(effnet, trainer.layers))
    changed = _changed(before, trainer.student.state_dict())
    assert "_conv_stem.weight" in changed and "_blocks.0._depthwise_conv.weight" in changed
    assert "_blocks.4._project_conv.weight" in changed
    assert not any(k.startswith(("_blocks.5.", "_conv_head")) for k in changed)  # past the last aligned layer
    with pytest.raises(ConfigError, match="last-n = 18"):
        Stage1Trainer(effnet, _cfg(trainable="last-n", last_n=18), torch.device("cpu"))


def test_activation_checkpointing_gives_the_same_step(effnet: PatchEncoder) -> None:
    batch = _batch(effnet, [4, 16])
    states = []
    for on in (True, False):
        cfg = _cfg(layers=["early", "last"], checkpoint_activations=on, attention="uniform", stain={"enabled": False})
        trainer = Stage1Trainer(effnet, cfg, torch.device("cpu"))
        assert trainer.student.checkpoint_layers is on and not effnet.checkpoint_layers
        loss = trainer.step(**batch)
        states.append((float(loss.total), trainer.student.state_dict()))
    assert states[0][0] == pytest.approx(states[1][0], rel=1e-6)
    for key, value in states[0][1].items():
        torch.testing.assert_close(value, states[1][1][key], rtol=1e-4, atol=1e-6)


def test_vit_last_block_and_lora() -> None:
    vit = _tiny_vit()
    trainer = Stage1Trainer(vit, _cfg(trainable="last-n", last_n=1, layers=[1, 2], lr=1e-2), torch.device("cpu"))
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    trainer.step(**_batch(vit, trainer.layers))
    changed = _changed(before, trainer.student.state_dict())
    assert changed and all(k.startswith(("blocks.2.", "norm.")) for k in changed), changed
    pytest.importorskip("peft")
    from fedslide.client.lowres_finetune import merged_state

    lora = Stage1Trainer(vit, _cfg(trainable="lora", layers=[1, 2], lr=1e-2), torch.device("cpu"))
    assert lora.trainable and all("lora_" in name for name in lora.trainable)
    lora.step(**_batch(vit, lora.layers))
    merged = merged_state(lora.student)
    assert set(merged) == set(vit.state_dict())
    assert not torch.equal(merged["blocks.2.attn.qkv.weight"], vit.state_dict()["blocks.2.attn.qkv.weight"])
    assert torch.equal(merged["patch_embed.proj.weight"], vit.state_dict()["patch_embed.proj.weight"])


def test_hed_jitter_is_seeded_and_bounded() -> None:
    x = torch.randint(60, 230, (2, 3, 16, 16), dtype=torch.uint8)
    assert hed_jitter(x, np.random.default_rng(0), 0.0, 0.0) is x
    a = hed_jitter(x, np.random.default_rng(1), 0.1, 0.05)
    b = hed_jitter(x, np.random.default_rng(1), 0.1, 0.05)
    assert a.dtype == torch.uint8 and a.shape == x.shape and torch.equal(a, b)
    assert (a.int() - x.int()).abs().float().mean() > 0.5


# ---------------------------------------------------------------- a site: fine-tune, re-encode, resume


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small synthetic slides (2 and 1 patches at 5×), preprocessed."""
    site = tmp_path_factory.mktemp("ftsite")
    (site / "slides").mkdir()
    write_slide(site / "slides" / "s1.tif", 2000, 1000, 0.5, "generic", seed=3, tumor=True, tumor_fraction=0.4)
    write_slide(site / "slides" / "s2.tif", 1000, 1000, 0.5, "generic", seed=4)
    code = main(["preprocess", "--site", str(site), "--no-progress", "--batch-size", "16", "--workers", "0"])
    assert code == 0
    return site


@pytest.mark.slow
def test_patch_set_aligns_children_and_attention(
    site: Path, effnet: PatchEncoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    monkeypatch.setattr(lowres_finetune, "_READ_CHUNK", 1)  # each 5× patch its own teacher chunk
    high = read_feature_file(feature_path(site, ENC, "high", "s1"))
    high2 = read_feature_file(feature_path(site, ENC, "high", "s2"))
    assert high.parent is not None and high.child is not None
    attention = {"s1": torch.arange(len(high), dtype=torch.float32), "s2": torch.ones(len(high2))}
    torch.save(attention, tmp_path / "att.pt")
    cfg = _cfg(teacher_attention=tmp_path / "att.pt", max_patches_per_slide=2)
    patches = collect_patches(site, cfg, effnet, [16], torch.device("cpu"))
    assert patches.slides == ["s1", "s1", "s2", "s2"] and patches.attention is not None
    assert patches.pixels.shape == (4, 3, 256, 256) and patches.final.shape == (4, 16, 1280)
    # each sampled s1 patch matches exactly one parent: the mask and attention of that parent's children
    parent_rows = {int(p): np.flatnonzero(high.parent == p) for p in np.unique(high.parent)}
    found = []
    for i in range(2):
        matches = []
        for k, rows in parent_rows.items():
            mask = np.zeros(16, bool)
            mask[high.child[rows]] = True
            att = np.zeros(16, np.float32)
            att[high.child[rows]] = rows
            if np.array_equal(mask, patches.mask[i].numpy()) and np.allclose(att, patches.attention[i].numpy()):
                matches.append(k)
        assert len(matches) == 1
        found.append(matches[0])
        # the teacher's final embedding of a child equals the preprocessed 20× feature of that child
        row = parent_rows[matches[0]][0]
        np.testing.assert_allclose(
            patches.final[i, high.child[row]].float().numpy(), high.features[row], atol=0.02, rtol=0.02
        )
    assert found[0] != found[1]
    torch.testing.assert_close(patches.attention[2:], patches.mask[2:].float())  # s2's attention is all ones
    torch.save({"s1": attention["s1"]}, tmp_path / "att1.pt")
    with pytest.raises(ConfigError, match="no entry for slide\\(s\\) 's2'"):
        collect_patches(site, _cfg(teacher_attention=tmp_path / "att1.pt"), effnet, [16], torch.device("cpu"))


@pytest.mark.slow
def test_finetune_then_reencode_is_resumable(site: Path, effnet: PatchEncoder, tmp_path: Path) -> None:
    out = tmp_path / "ft"
    code = main(
        ["finetune", str(site), "--no-progress", "--epochs", "1", "--batch-size", "2", "--max-patches", "3",
         "--layers", "early,last", "--trainable", "last-n", "--device", "cpu", "--set", f"output={out}",
         "--set", "lr=0.01"]
    )  # fmt: skip
    assert code == 0
    weights = out / f"{ENC}.pt"
    manifest = json.loads((out / f"{ENC}.json").read_text())
    assert manifest["weights_hash"] == sha256_file(weights) and manifest["patches"] == 3
    tuned = build_encoder(EncoderConfig(weights=weights))
    assert tuned.weights_hash == manifest["weights_hash"] != effnet.weights_hash
    diff = {k for k, v in tuned.state_dict().items() if not torch.equal(v, effnet.state_dict()[k])}
    assert diff and all(k.startswith(("_blocks.15.", "_conv_head.", "_bn1.")) for k in diff)

    targets = {s: finetuned_feature_path(site, ENC, manifest["weights_hash"], s) for s in ("s1", "s2")}
    assert targets["s1"].parent.parent.name == f"{ENC}-ft-{manifest['weights_hash'][:12]}"
    frozen = read_feature_file(feature_path(site, ENC, "low", "s1"), load_tokens=True)
    new = read_feature_file(targets["s1"], load_tokens=True)
    assert new.attrs["encoder_weights_hash"] == manifest["weights_hash"]
    assert new.attrs["finetuned_from_weights_hash"] == effnet.weights_hash
    assert new.coords is not None and frozen.coords is not None
    np.testing.assert_array_equal(new.coords, frozen.coords)
    assert new.tokens is not None and new.tokens.shape == frozen.tokens.shape  # type: ignore[union-attr]
    assert not np.allclose(new.features, frozen.features, atol=1e-3)

    # a rerun with the same settings reuses the weights and skips every slide
    cfg = _cfg(output=out, layers=["early", "last"], trainable="last-n", max_patches=3, lr=0.01)
    mtimes = {s: p.stat().st_mtime_ns for s, p in targets.items()}
    again = finetune_site(site, cfg)
    assert again.skipped and again.weights_hash == manifest["weights_hash"]
    summary = reencode_site(site, cfg, weights)
    assert summary.skipped == ["s1", "s2"] and not summary.done
    # a missing slide file (e.g. a killed run) is redone alone
    targets["s2"].unlink()
    assert reencode_site(site, cfg, weights).done == ["s2"]
    assert targets["s1"].stat().st_mtime_ns == mtimes["s1"]

    # changed weights (another hash) force a redo of every slide, into a folder of their own
    state = torch.load(weights, weights_only=True)
    state["_conv_head.weight"] = state["_conv_head.weight"] * 1.01
    other = tmp_path / "other.pt"
    torch.save(state, other)
    redo = reencode_site(site, cfg, other)
    assert redo.done == ["s1", "s2"] and redo.weights_hash == sha256_file(other)
    assert redo.features == f"{ENC}-ft-{redo.weights_hash[:12]}" != summary.features
    with h5py.File(finetuned_feature_path(site, ENC, redo.weights_hash, "s1"), "r") as f:
        assert f.attrs["encoder_weights_hash"] == sha256_file(other)
    # the first weights' files are untouched (another run, e.g. an earlier LOSO fold, still reads them)
    mtimes["s2"] = targets["s2"].stat().st_mtime_ns
    assert reencode_site(site, cfg, weights).skipped == ["s1", "s2"]
    assert {s: p.stat().st_mtime_ns for s, p in targets.items()} == mtimes
    with h5py.File(targets["s1"], "r") as f:
        assert f.attrs["encoder_weights_hash"] == manifest["weights_hash"]


def test_finetune_without_features_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "slides").mkdir()
    assert main(["finetune", str(tmp_path), "--no-progress", "--device", "cpu"]) == 2
    with pytest.raises(Exception, match="teacher-attention"):
        FinetuneConfig(attention="teacher")


def test_stage1_samples_no_test_slide_by_default(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from fedslide.client.lowres_finetune import _sampled_files, _SlideFiles
    from fedslide.common.features import FeatureFileError

    files = [_SlideFiles(s, tmp_path / f"{s}.tif", tmp_path / "l.h5", tmp_path / "h.h5") for s in ("a", "b", "c")]
    (tmp_path / "labels.csv").write_text("slide_id,label,split\na,normal,train\nb,tumor,test\nc,tumor,val\n")
    assert [f.slide_id for f in _sampled_files(tmp_path, _cfg(), files)] == ["a", "c"]
    assert [f.slide_id for f in _sampled_files(tmp_path, _cfg(sample_test_slides=True), files)] == ["a", "b", "c"]
    with pytest.raises(FeatureFileError, match="every slide with feature files is a test slide"):
        _sampled_files(tmp_path, _cfg(), files[1:2])
    (tmp_path / "labels.csv").unlink()
    assert len(_sampled_files(tmp_path, _cfg(), files)) == 3  # no recorded splits: every slide, with a warning
    assert "no recorded splits" in caplog.text
