"""The patch-encoder interface and the checkpoint helpers every encoder shares."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fedslide.common.config.preprocess import EncoderConfig

Triple = tuple[float, float, float]

IMAGENET_MEAN: Triple = (0.485, 0.456, 0.406)
IMAGENET_STD: Triple = (0.229, 0.224, 0.225)

_WRAPPER_KEYS = ("state_dict", "model")
_LIST_LIMIT = 12
LAYER_ALIASES = ("early", "middle", "last")


@dataclass
class LayerOutputs:
    """One forward pass with intermediate layers: the final embedding and, per requested layer, its tokens.

    `maps[i]` is layer i's spatial token map [B, C_i, h_i, w_i] (CNN: the block's output; ViT: the patch
    tokens after block i, before the final norm); `summaries[i]` [B, C_i] is that layer's embedding of the
    whole patch (CNN: the map's mean; ViT: the class token after block i, else the patch tokens' mean).
    """

    embedding: Tensor
    maps: dict[int, Tensor]
    summaries: dict[int, Tensor]


class PatchEncoder(nn.Module):
    """A frozen-by-default network mapping uint8 patches [B, 3, H, W] to embeddings [B, dim].

    `encode` is the entry point: it normalises, runs the network once and, for encoders with
    a spatial feature map, also returns a G×G token grid pooled from that map.
    """

    name: str
    dim: int
    weights_hash: str
    mean: Triple
    std: Triple
    has_feature_map: bool

    def __init__(
        self, *, name: str, dim: int, weights_hash: str, mean: Triple, std: Triple, has_feature_map: bool
    ) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"encoder mean/std must be 3 values with std > 0; got mean={mean}, std={std}")
        self.name = name
        self.dim = dim
        self.weights_hash = weights_hash
        self.mean = tuple(float(m) for m in mean)  # type: ignore[assignment]
        self.std = tuple(float(s) for s in std)  # type: ignore[assignment]
        self.has_feature_map = has_feature_map
        self.checkpoint_layers = False  # forward_layers recomputes each layer in backward (training memory)
        scale = torch.tensor([1.0 / (255.0 * s) for s in self.std]).view(1, 3, 1, 1)
        shift = torch.tensor([m / s for m, s in zip(self.mean, self.std)]).view(1, 3, 1, 1)
        self.register_buffer("_norm_scale", scale, persistent=False)
        self.register_buffer("_norm_shift", shift, persistent=False)

    def normalize(self, x_uint8: Tensor) -> Tensor:
        """(x / 255 - mean) / std as float32 on x's device, in channels_last memory format."""
        if x_uint8.dtype != torch.uint8 or x_uint8.dim() != 4 or x_uint8.shape[1] != 3:
            raise ValueError(
                f"encoder {self.name!r} expects uint8 patches [B, 3, H, W]; got {x_uint8.dtype} {tuple(x_uint8.shape)}"
            )
        x = x_uint8.to(dtype=torch.float32, memory_format=torch.channels_last)
        scale = cast(Tensor, self._norm_scale).to(device=x.device, dtype=torch.float32)
        shift = cast(Tensor, self._norm_shift).to(device=x.device, dtype=torch.float32)
        return (x * scale - shift).contiguous(memory_format=torch.channels_last)

    def forward_features(self, x: Tensor) -> Tensor:
        """The final spatial feature map [B, C, h, w] of a normalised batch."""
        raise NotImplementedError(f"encoder {self.name!r} has no spatial feature map")

    def forward(self, x: Tensor) -> Tensor:
        """The pooled embedding [B, dim] of a normalised batch (global average of the feature map)."""
        return self.forward_features(x).mean(dim=(2, 3))

    def layer_modules(self) -> list[nn.Module]:
        """The network's layers in order (what `forward_layers` indexes and `last N` counts from the end)."""
        raise NotImplementedError(f"encoder {self.name!r} exposes no layers")

    @property
    def num_layers(self) -> int:
        """How many layers `forward_layers` can return."""
        return len(self.layer_modules())

    def resolve_layers(self, spec: Sequence[int | str]) -> list[int]:
        """Layer indices from ints (negative counts from the end) and aliases early (n // 4), middle (n // 2), last."""
        n = self.num_layers
        aliases = {"early": n // 4, "middle": n // 2, "last": n - 1}
        out: list[int] = []
        for item in spec:
            if isinstance(item, str):
                if item not in aliases:
                    raise ValueError(f"layer {item!r} is not an index or one of {', '.join(LAYER_ALIASES)}")
                index = aliases[item]
            else:
                index = item + n if item < 0 else item
                if not 0 <= index < n:
                    raise ValueError(f"layer {item} is out of range for {self.name!r}, which has {n} layers")
            if index not in out:
                out.append(index)
        if not out:
            raise ValueError("at least one layer is needed")
        return sorted(out)

    def forward_layers(self, x: Tensor, layers: Sequence[int]) -> LayerOutputs:
        """The final embedding [B, dim] of a normalised batch and the token maps of `layers` (same pass)."""
        raise NotImplementedError(f"encoder {self.name!r} exposes no layers")

    def run_layer(self, layer: nn.Module, x: Tensor) -> Tensor:
        """layer(x), under activation checkpointing when `checkpoint_layers` is set and gradients are on."""
        if self.checkpoint_layers and torch.is_grad_enabled():
            return cast(Tensor, checkpoint(layer, x, use_reentrant=False))
        return cast(Tensor, layer(x))

    def encode(self, x_uint8: Tensor, token_grid: int = 0) -> tuple[Tensor, Tensor | None]:
        """Embeddings [B, dim] and, when token_grid = G > 0 and a feature map exists, tokens [B, G*G, dim].

        Token g = row * G + col (row along y) is the adaptive average of that cell of the final
        feature map; the embedding is the mean of the whole map, from the same forward pass.
        """
        if token_grid < 0:
            raise ValueError(f"token_grid must be >= 0; got {token_grid}")
        x = self.normalize(x_uint8)
        if not self.has_feature_map:
            return self.forward(x), None
        fmap = self.forward_features(x)
        pooled = fmap.mean(dim=(2, 3))
        if token_grid == 0:
            return pooled, None
        tokens = F.adaptive_avg_pool2d(fmap, token_grid).flatten(2).transpose(1, 2).contiguous()
        return pooled, tokens

    def identity(self) -> dict[str, object]:
        """Everything that determines the embeddings (name, weights hash, dim, normalisation, options)."""
        return {
            "name": self.name,
            "weights_hash": self.weights_hash,
            "dim": self.dim,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @property
    def fingerprint(self) -> str:
        """sha256 of `identity()`: equal fingerprints mean interchangeable features."""
        blob = json.dumps(self.identity(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def normalization(cfg: EncoderConfig, mean: Triple, std: Triple) -> tuple[Triple, Triple]:
    """The encoder's default mean/std, each replaced by the config's override when given."""
    new_mean: Triple = mean if cfg.mean is None else (cfg.mean[0], cfg.mean[1], cfg.mean[2])
    new_std: Triple = std if cfg.std is None else (cfg.std[0], cfg.std[1], cfg.std[2])
    return new_mean, new_std


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def require_weights(cfg: EncoderConfig) -> Path:
    """The local weights file named by `encoder.weights`; a clear error when unset or absent."""
    if cfg.weights is None:
        raise ValueError(
            f"encoder {cfg.name!r} needs local weights: set the config key `encoder.weights` to a local "
            "checkpoint file (nothing is downloaded)"
        )
    path = Path(cfg.weights).expanduser()
    if not path.is_file():
        raise ValueError(
            f"encoder {cfg.name!r}: weights file {str(path)!r} does not exist; the config key "
            "`encoder.weights` must point to a local checkpoint file (nothing is downloaded)"
        )
    return path


def load_checkpoint(path: Path) -> dict[str, Tensor]:
    """The tensors of a local checkpoint (.pth/.pt/.bin via torch.load, or .safetensors).

    Unwraps `{"state_dict": ...}` / `{"model": ...}` and strips a DistributedDataParallel `module.` prefix.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise ValueError(
                f"{path}: reading .safetensors needs the `safetensors` package (pip install safetensors)"
            ) from exc
        obj: object = load_file(str(path), device="cpu")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same to the user
            raise ValueError(
                f"{path}: not readable as a torch checkpoint of plain tensors ({type(exc).__name__}: {exc}); "
                "save just the model's state_dict"
            ) from exc
    for _ in range(2):
        if isinstance(obj, Mapping):
            wrapped = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
            if wrapped:
                obj = obj[wrapped[0]]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state_dict (a mapping of names to tensors); got {type(obj).__name__}")
    state: dict[str, Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            raise ValueError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; save just the state_dict"
            )
        state[key.removeprefix("module.")] = value
    return state


def _short(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - _LIST_LIMIT} more)" if len(keys) > _LIST_LIMIT else ""
    return ", ".join(keys[:_LIST_LIMIT]) + more


def load_strict(
    model: nn.Module, state: Mapping[str, Tensor], *, ignore: tuple[str, ...], source: Path, what: str
) -> None:
    """Load `state` into `model`, refusing missing or unexpected keys (except prefixes in `ignore`)."""
    kept = {k: v for k, v in state.items() if not k.startswith(ignore)}
    try:
        result = model.load_state_dict(kept, strict=False)
    except RuntimeError as exc:
        raise ValueError(f"{source}: checkpoint does not fit {what}: {exc}") from exc
    problems = []
    if result.missing_keys:
        problems.append(f"missing keys: {_short(result.missing_keys)}")
    if result.unexpected_keys:
        problems.append(f"unexpected keys: {_short(result.unexpected_keys)}")
    if problems:
        raise ValueError(f"{source}: checkpoint does not fit {what}; " + "; ".join(problems))
