"""MIL model zoo: shapes, padding invariance, gradients, heads, and the model-specific mechanics."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fedslide.common.config.base import ConfigError, load_config
from fedslide.common.config.model import MODEL_NAMES, ModelConfig
from fedslide.common.models import CKAHead, MILModel, build_model
from fedslide.common.models.longmil import LongMIL, dense_attention, grid_cells, morton_order, windowed_attention
from fedslide.common.models.mambamil import reference_scan, selective_scan, stride_order
from fedslide.common.models.s4mil import S4D
from fedslide.common.models.transmil import NystromAttention, iterative_pinv

D = 12
PATCH = 256.0


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


SMALL_OPTIONS: dict[str, dict[str, object]] = {  # tiny sizes that still exercise every code path
    "mean": {},
    "max": {},
    "abmil": {"attention_dim": 8},
    "abmil_gated": {"attention_dim": 8},
    "transmil": {"num_heads": 2, "landmarks": 4},  # Nystrom landmarks
    "dsmil": {},
    "clam_sb": {"attention_dim": 8, "k_sample": 2},
    "acmil": {"attention_dim": 8, "top_k": 3, "branches": 3},
    "longmil": {"attention_dim": 8, "num_heads": 2, "window": 4},  # windows
    "s4mil": {"attention_dim": 8, "state_dim": 8},
    "mambamil": {"attention_dim": 8, "chunk": 4, "sr_rate": 3},  # scan chunks, sequence reordering
}


def small_config(name: str, num_classes: int = 2, head: str = "linear", **extra: object) -> ModelConfig:
    """Tiny shared sizes and the architecture's own small options; `extra` overrides either."""
    values = dict(name=name, in_dim=D, num_classes=num_classes, hidden_dim=16, head=head, dropout=0.1)
    values.update(SMALL_OPTIONS[name])
    values.update(extra)
    return ModelConfig(**values)


def make_model(name: str, seed: int = 0, **kwargs: object) -> MILModel:
    torch.manual_seed(seed)
    return build_model(small_config(name, **kwargs))


def grid_coords(n: int, cols: int = 4, origin: tuple[float, float] = (1024.0, 512.0)) -> torch.Tensor:
    """Level-0 top-left coords of n patches laid on a grid, `cols` per row."""
    idx = torch.arange(n)
    return torch.stack([origin[0] + (idx % cols) * PATCH, origin[1] + (idx // cols) * PATCH], dim=1).float()


def padded_batch(
    bag: torch.Tensor, coords: torch.Tensor, other: torch.Tensor, other_coords: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch of 2: `bag` scattered to `positions` of row 0 (garbage elsewhere), `other` filling row 1."""
    n = other.shape[0]
    features = torch.randn(2, n, D) * 100.0
    features[0, -1, 0] = float("nan")  # padded rows must not leak even when they are not finite
    batch_coords = torch.rand(2, n, 2) * 1e5
    mask = torch.zeros(2, n, dtype=torch.bool)
    features[0, positions], batch_coords[0, positions], mask[0, positions] = bag, coords, True
    features[1], batch_coords[1], mask[1] = other, other_coords, True
    return features, mask, batch_coords


def expected_attention_shape(name: str, batch: int, n: int, cfg: ModelConfig) -> tuple[int, ...] | None:
    if name in ("mean", "max"):
        return None
    if name == "dsmil":
        return (batch, cfg.num_classes, n)
    if name == "acmil":
        return (batch, cfg.options.branches, n)
    return (batch, n)


# ---------------------------------------------------------------- every model


@pytest.mark.parametrize("head", ["linear", "cka"])
@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_shapes(name: str, num_classes: int, head: str) -> None:
    cfg = small_config(name, num_classes, head)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    features, mask = torch.randn(3, 11, D), torch.ones(3, 11, dtype=torch.bool)
    mask[1, 6:] = False
    out = model(features, mask, grid_coords(11).expand(3, -1, -1))
    assert out.logits.shape == (3, num_classes)
    assert out.embedding.dim() == 2 and out.embedding.shape[0] == 3
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.embedding).all()
    assert out.aux_loss is None  # eval mode
    shape = expected_attention_shape(name, 3, 11, cfg)
    if shape is None:
        assert out.attention is None
    else:
        assert out.attention is not None and out.attention.shape == shape
        assert (out.attention[1, ..., 6:] == 0).all()  # padded positions get no attention
        torch.testing.assert_close(out.attention.sum(-1), torch.ones(shape[:-1]), atol=1e-5, rtol=0)
    if head == "cka":
        assert isinstance(model.head, CKAHead)
    again = model(features, mask, grid_coords(11).expand(3, -1, -1))
    assert torch.equal(again.logits, out.logits)  # deterministic in eval


@pytest.mark.parametrize("layout", ["trailing", "interleaved"])
@pytest.mark.parametrize("head", ["linear", "cka"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_padding_does_not_change_outputs(name: str, head: str, layout: str) -> None:
    model = make_model(name, head=head, num_classes=3).eval()
    torch.manual_seed(1)
    bag, other = torch.randn(7, D), torch.randn(13, D)
    coords, other_coords = grid_coords(7), grid_coords(13, cols=5)
    positions = torch.arange(7) if layout == "trailing" else torch.tensor([0, 2, 3, 5, 8, 9, 11])
    features, mask, batch_coords = padded_batch(bag, coords, other, other_coords, positions)
    with torch.no_grad():
        alone = model(bag[None], None, coords[None])
        batched = model(features, mask, batch_coords)
        other_alone = model(other[None], None, other_coords[None])
    torch.testing.assert_close(batched.logits[0], alone.logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched.embedding[0], alone.embedding[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched.logits[1], other_alone.logits[0], atol=1e-5, rtol=1e-5)
    if alone.attention is not None:
        torch.testing.assert_close(batched.attention[0][..., positions], alone.attention[0], atol=1e-5, rtol=1e-5)
        padded = torch.ones(13, dtype=torch.bool)
        padded[positions] = False
        assert (batched.attention[0][..., padded] == 0).all()


@pytest.mark.parametrize("head", ["linear", "cka"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_gradients_reach_every_parameter(name: str, head: str) -> None:
    model = make_model(name, head=head).train()
    torch.manual_seed(2)
    features, mask = torch.randn(2, 20, D), torch.ones(2, 20, dtype=torch.bool)
    mask[0, 15:] = False
    labels = torch.tensor([0, 1])
    kwargs = {"labels": labels} if model.accepts_labels else {}
    out = model(features, mask, grid_coords(20).expand(2, -1, -1), **kwargs)
    loss = F.cross_entropy(out.logits, labels)
    if out.aux_loss is not None:
        assert out.aux_loss.dim() == 0
        loss = loss + out.aux_loss
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"
        if pname.endswith("score.bias"):  # an attention score's bias shifts every instance alike: the softmax
            continue  # ignores it, so its gradient is 0 up to rounding (exactly 0 on some CPUs)
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_input_errors_are_clear(name: str) -> None:
    model = make_model(name).eval()
    with pytest.raises(ValueError, match="in-dim"):
        model(torch.randn(1, 5, D + 1))
    with pytest.raises(ValueError, match="at least one real instance"):
        model(torch.randn(2, 5, D), torch.tensor([[True] * 5, [False] * 5]))


def test_single_instance_bags() -> None:
    for name in MODEL_NAMES:
        out = make_model(name).eval()(torch.randn(2, 1, D), None, grid_coords(1).expand(2, -1, -1))
        assert torch.isfinite(out.logits).all(), name


# ---------------------------------------------------------------- CKA head


def test_cka_basis_is_chebyshev() -> None:
    torch.manual_seed(0)
    head = CKAHead(5, 3, degree=6, normalize=False)
    x = torch.randn(4, 5) * 2
    t = torch.tanh(x).double().clamp(-1 + 1e-7, 1 - 1e-7)
    expected = torch.stack([torch.cos(k * torch.arccos(t)) for k in range(7)], dim=-1)
    torch.testing.assert_close(head.basis(x).double(), expected, atol=1e-5, rtol=0)
    y = head(x)
    manual = torch.einsum("bik,iok->bo", expected.float(), head.coeffs) + head.bias
    torch.testing.assert_close(y, manual, atol=1e-5, rtol=0)
    assert head.coeffs.shape == (5, 3, 7)


# ---------------------------------------------------------------- ACMIL


def test_acmil_topk_masking_only_in_training() -> None:
    model = make_model("acmil", dropout=0.0, top_k=4, mask_drop=0.5)
    features = torch.randn(1, 30, D)
    model.eval()
    first, second = model(features), model(features)
    assert torch.equal(first.logits, second.logits) and first.aux_loss is None
    model.train()
    torch.manual_seed(10)
    runs = [model(features) for _ in range(6)]
    assert all(r.aux_loss is not None and r.aux_loss.dim() == 0 for r in runs)
    assert any(not torch.allclose(runs[0].logits, r.logits) for r in runs[1:])  # the random mask changes outputs
    # each branch hides exactly int(K * mask_drop) = 2 of its top-4 instances, nothing else
    scores = model.scorer(model.encoder(features))
    for r in runs:
        hidden = r.attention[0] == 0  # [M, N]
        assert (hidden.sum(-1) == 2).all()
        top4 = scores[0].topk(4, dim=-1).indices
        assert torch.gather(hidden, 1, top4).sum(-1).eq(2).all()


def test_acmil_labels_add_branch_losses() -> None:
    model = make_model("acmil", dropout=0.0, mask_drop=0.0).train()
    features = torch.randn(2, 9, D)
    without = model(features).aux_loss
    with_labels = model(features, labels=torch.tensor([0, 1])).aux_loss
    assert with_labels > without  # cross-entropy of the branch classifiers is added


# ---------------------------------------------------------------- CLAM


def test_clam_instance_loss_only_in_training() -> None:
    model = make_model("clam_sb", dropout=0.0)
    features = torch.randn(2, 12, D)
    model.train()
    assert model(features).aux_loss > 0
    assert model(features, labels=torch.tensor([1, 0])).aux_loss > 0
    model.eval()
    out = model(features)
    assert out.aux_loss is None
    model.k_sample = 0
    torch.testing.assert_close(model(features).logits, out.logits)


# ---------------------------------------------------------------- LongMIL


@pytest.mark.parametrize("with_positions", [False, True])
def test_windowed_attention_with_large_window_is_full_attention(with_positions: bool) -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 3, 37, 8).unbind(0)
    positions = grid_cells(grid_coords(37, cols=6)) if with_positions else None
    slopes = torch.tensor([0.5, 0.1, 0.01])
    full = dense_attention(q, k, v, positions, slopes)
    for window in (37, 64, None):
        torch.testing.assert_close(windowed_attention(q, k, v, window, 0, positions, slopes), full)
        torch.testing.assert_close(windowed_attention(q, k, v, window, 5, positions, slopes), full)


@pytest.mark.parametrize("shift", [0, 3])
def test_windowed_attention_is_block_local(shift: int) -> None:
    torch.manual_seed(0)
    n, window = 23, 8
    q, k, v = torch.randn(3, 2, n, 4).unbind(0)
    positions = grid_cells(grid_coords(n))
    slopes = torch.tensor([0.3, 0.05])
    block = (torch.arange(n) + shift) // window
    scores = q @ k.transpose(-1, -2) / 2.0 - slopes.view(-1, 1, 1) * torch.cdist(positions.float(), positions.float())
    scores = scores.masked_fill(block[:, None] != block[None, :], float("-inf"))
    expected = torch.softmax(scores, dim=-1) @ v
    torch.testing.assert_close(windowed_attention(q, k, v, window, shift, positions, slopes), expected)


def test_longmil_window_at_least_bag_size_equals_dense_model() -> None:
    torch.manual_seed(0)
    model = LongMIL(D, 3, hidden_dim=16, heads=2, layers=2, window=64, attention_dim=8, dropout=0.0).eval()
    features, coords = torch.randn(1, 50, D), grid_coords(50, cols=7)[None]
    with torch.no_grad():
        windowed = model(features, None, coords)
        model.window = None  # explicit n x n attention
        dense = model(features, None, coords)
        model.window = 8
        local = model(features, None, coords)
    torch.testing.assert_close(windowed.logits, dense.logits)
    torch.testing.assert_close(windowed.attention, dense.attention)
    assert not torch.allclose(local.logits, dense.logits, atol=1e-4)  # small windows really restrict attention


def test_morton_order_follows_the_grid() -> None:
    coords = grid_coords(16, cols=4)
    cells = grid_cells(coords)
    assert cells.tolist()[:5] == [[0, 0], [1, 0], [2, 0], [3, 0], [0, 1]]
    order = morton_order(cells)
    assert cells[order[:4]].tolist() == [[0, 0], [1, 0], [0, 1], [1, 1]]  # first Z block is a 2x2 square
    assert cells[order[4:8]].tolist() == [[2, 0], [3, 0], [2, 1], [3, 1]]


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.largest = max(self.largest, leaf.numel())
        return out


def test_longmil_memory_is_linear_in_bag_size() -> None:
    n, window = 20_000, 64
    torch.manual_seed(0)
    model = LongMIL(8, 2, hidden_dim=16, heads=2, layers=2, window=window, attention_dim=8, dropout=0.0)
    features = torch.randn(1, n, 8)
    coords = torch.stack(torch.meshgrid(torch.arange(200), torch.arange(100), indexing="ij"), -1).reshape(1, n, 2)
    with _LargestTensor() as probe:
        out = model(features, None, coords.float() * PATCH)
        out.logits.sum().backward()
    assert probe.largest < n * n / 100, f"a tensor of {probe.largest} elements (n^2 = {n * n})"
    assert probe.largest <= 2 * n * window * 8  # O(n * window * heads)


# ---------------------------------------------------------------- MambaMIL


def _scan_inputs(dt_scale: float, n: int = 70) -> list[torch.Tensor]:
    torch.manual_seed(0)
    b, e, s = 2, 6, 4
    x = torch.randn(b, n, e, dtype=torch.float64)
    dt = torch.rand(b, n, e, dtype=torch.float64) * dt_scale
    a = -torch.rand(e, s, dtype=torch.float64) * 16
    bm, cm = torch.randn(2, b, n, s, dtype=torch.float64).unbind(0)
    return [x, dt, a, bm, cm, torch.randn(e, dtype=torch.float64)]


@pytest.mark.parametrize("dt_scale", [0.05, 3.0])
@pytest.mark.parametrize("chunk", [1, 5, 64, 300])
def test_selective_scan_matches_step_by_step(dt_scale: float, chunk: int) -> None:
    inputs = _scan_inputs(dt_scale)
    expected = reference_scan(*inputs)
    torch.testing.assert_close(selective_scan(*inputs, chunk=chunk), expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_selective_scan_gradients_match_autograd(chunk: int) -> None:
    grads = []
    for scan in (reference_scan, lambda *t: selective_scan(*t, chunk=chunk)):
        leaves = [t.clone().requires_grad_() for t in _scan_inputs(0.5, n=30)]
        weights = torch.linspace(-1, 1, 30 * 6, dtype=torch.float64).view(1, 30, 6)
        (scan(*leaves) * weights).sum().backward()
        grads.append([t.grad for t in leaves])
    for g_ref, g_fast in zip(*grads, strict=True):
        torch.testing.assert_close(g_fast, g_ref, atol=1e-9, rtol=1e-9)


def test_stride_order_reorders_only_real_instances() -> None:
    order = stride_order(torch.tensor([7, 4]), 9, 3)
    assert order[0].tolist() == [0, 3, 6, 1, 4, 2, 5, 7, 8]
    assert order[1].tolist() == [0, 3, 1, 2, 4, 5, 6, 7, 8]


@pytest.mark.slow
def test_mambamil_trains_on_a_few_thousand_instances() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mambamil", in_dim=32, hidden_dim=64, attention_dim=16)).train()
    out = model(torch.randn(1, 3000, 32))
    F.cross_entropy(out.logits, torch.tensor([1])).backward()
    assert torch.isfinite(out.logits).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------- S4MIL and TransMIL


def test_s4d_convolution_matches_recurrence() -> None:
    torch.manual_seed(0)
    layer = S4D(3, state_dim=8).double()
    u = torch.randn(2, 23, 3, dtype=torch.float64)  # not a square: exercises the blocked kernel
    dt = layer.log_dt.exp()[:, None]
    a = torch.complex(-layer.log_a_real.exp(), layer.a_imag)
    decay, gain = torch.exp(a * dt), (torch.exp(a * dt) - 1) / a
    c = torch.view_as_complex(layer.c.contiguous())
    h = torch.zeros(2, 3, 4, dtype=torch.complex128)
    ys = []
    for t in range(23):
        h = decay * h + gain * u[:, t, :, None]
        ys.append(2 * (c * h).sum(-1).real + layer.d * u[:, t])
    torch.testing.assert_close(layer(u), torch.stack(ys, dim=1))


def test_nystrom_pinv_and_exact_path() -> None:
    torch.manual_seed(0)
    matrix = torch.softmax(torch.randn(2, 6, 6), dim=-1)
    torch.testing.assert_close(iterative_pinv(matrix, 20), torch.linalg.pinv(matrix), atol=1e-3, rtol=1e-3)
    attn = NystromAttention(8, heads=2, landmarks=16, dropout=0.0).eval()
    x = torch.randn(1, 10, 8)
    out, first_row = attn(x)
    q, k, v = attn.qkv(x).view(10, 3, 2, 4).permute(1, 2, 0, 3)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
    expected = weights @ v + attn.res_conv(v[None])[0]
    torch.testing.assert_close(out, attn.out(expected.transpose(0, 1).reshape(1, 10, 8)))
    torch.testing.assert_close(first_row, weights[:, 0])


def test_transmil_nystrom_path_is_close_to_exact_on_smooth_inputs() -> None:
    torch.manual_seed(0)
    attn = NystromAttention(8, heads=2, landmarks=8, pinv_iterations=20, dropout=0.0).eval()
    x = torch.randn(1, 64, 8) * 0.1  # near-uniform attention: the Nystrom approximation is accurate
    approx, _ = attn(x)
    attn.landmarks = 64
    exact, _ = attn(x)
    torch.testing.assert_close(approx, exact, atol=1e-3, rtol=1e-2)


# ---------------------------------------------------------------- config and registry


def test_every_model_builds_from_defaults() -> None:
    for name in MODEL_NAMES:
        model = build_model(ModelConfig(name=name, in_dim=64))
        assert isinstance(model, MILModel)
        assert sum(p.numel() for p in model.parameters()) > 0


def test_config_errors_name_the_key() -> None:
    cases = [
        ({"num_classes": 1}, "num-classes"),
        ({"name": "transmil", "num_heads": 3}, "num-heads"),
        ({"name": "s4mil", "state_dim": 7}, "state-dim"),
        ({"name": "acmil", "mask_drop": 1.0}, "mask-drop"),
        ({"head": "mlp"}, "head"),
        ({"cka_degree": 0}, "cka-degree"),
    ]
    for values, key in cases:
        with pytest.raises(ConfigError, match=key):
            load_config(ModelConfig, values=values)
    with pytest.raises(ConfigError, match="unknown key 'windw' for model 'longmil'; allowed keys here: .*window"):
        load_config(ModelConfig, values={"name": "longmil", "windw": 3})
    with pytest.raises(ConfigError) as err:
        load_config(ModelConfig, values={"name": "clam_mb"})
    assert "name" in str(err.value) and "mambamil" in str(err.value) and "transmil" in str(err.value)


def test_an_option_of_another_architecture_is_refused_naming_key_model_and_allowed_keys() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(ModelConfig, section="model", values={"name": "abmil", "window": 64})
    text = str(err.value)
    assert "unknown key 'model.window' for model 'abmil'" in text
    assert "attention-dim" in text and "hidden-dim" in text and "layers" not in text


def test_each_architecture_reads_only_its_own_options() -> None:
    for name, options in SMALL_OPTIONS.items():
        cfg = small_config(name)
        assert set(cfg.options.model_dump()) == set(ModelConfig.model_validate({"name": name}).options.model_dump())
        assert all(getattr(cfg.options, key) == value for key, value in options.items())
        assert ModelConfig.model_validate(cfg.model_dump()) == cfg  # flat dump, as bundles store it, round-trips
    assert small_config("transmil").to_toml_dict()["landmarks"] == 4
    assert "attention-dim" not in small_config("transmil").to_toml_dict()


def test_a_stored_config_of_the_old_flat_layout_still_loads() -> None:
    old = {
        "name": "longmil",
        "in_dim": D,
        "hidden_dim": 16,
        "attention_dim": 8,
        "num_heads": 2,
        "dsmil_query_dim": 128,
        "longmil_window": 4,
        "longmil_alibi": False,
        "mamba_chunk": 3,
        "transmil_landmarks": None,
    }
    cfg = ModelConfig.model_validate(old)
    assert cfg.options == ModelConfig(name="longmil", attention_dim=8, num_heads=2, window=4, alibi=False).options
    assert isinstance(build_model(cfg), LongMIL)


def test_config_reads_kebab_toml(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "model.toml"
    path.write_text('[model]\nname = "longmil"\nin-dim = 1024\nwindow = 128\nhead = "cka"\n')
    cfg = load_config(ModelConfig, path, section="model")
    assert (cfg.name, cfg.in_dim, cfg.options.window, cfg.head) == ("longmil", 1024, 128, "cka")
    assert cfg.to_toml_dict()["window"] == 128


def test_build_model_rejects_unknown_names() -> None:
    cfg = ModelConfig.model_construct(**{**ModelConfig().model_dump(), "name": "nope"})
    with pytest.raises(ValueError, match="available: .*abmil.*mambamil"):
        build_model(cfg)


def test_registry_matches_config_names() -> None:
    expected = {"mean", "max", "abmil", "abmil_gated", "transmil", "dsmil", "clam_sb", "acmil", "longmil"}
    assert set(MODEL_NAMES) == expected | {"s4mil", "mambamil"} and len(MODEL_NAMES) == 11


@pytest.mark.parametrize("shift", [0, 2])
def test_longmil_grouped_layer_equals_whole_sequence(shift: int) -> None:
    torch.manual_seed(0)
    layer = LongMIL(D, 2, hidden_dim=16, heads=2, window=4, dropout=0.0).layers[0]
    x = torch.randn(45, 16, requires_grad=True)
    positions = grid_cells(grid_coords(45, cols=6))
    grouped = layer(x, 4, shift, positions, group=8)  # 5 groups of 2 windows, checkpointed
    whole = layer(x, 4, shift, positions, group=10**6)
    torch.testing.assert_close(grouped, whole)
    (g_grouped,) = torch.autograd.grad(grouped.square().sum(), x)
    (g_whole,) = torch.autograd.grad(whole.square().sum(), x)
    torch.testing.assert_close(g_grouped, g_whole)


def test_mambamil_layer_checkpointing_keeps_outputs_and_gradients() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mambamil", in_dim=8, hidden_dim=16, attention_dim=8, dropout=0.0))
    features = torch.randn(1, 300, 8)
    results = []
    for threshold in (10**12, 0):  # never / always checkpointed
        model.zero_grad()
        model.checkpoint_above = threshold
        out = model(features)
        out.logits.sum().backward()
        results.append((out.logits.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for g_plain, g_checkpointed in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(g_plain, g_checkpointed)
