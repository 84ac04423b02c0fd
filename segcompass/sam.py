"""SAM presets, loading from a local `facebook/sam-vit-*` directory, preprocessing, and an
on-disk cache of image embeddings.

Real presets (`sam-vit-b`, `sam-vit-l`, `sam-vit-h`) load with `transformers.SamModel` from a
local directory (`--sam-path DIR`: `config.json` + `model.safetensors`, as on the hub) or
from the local Hugging Face cache, offline; weights are read from safetensors only. The
world presets (`sam-tiny-16`, `sam-tiny-32`) are small SAM-architecture models built from a
config and trained on the embedded world (there are no SAM weights on this machine).

Freezing: `load_sam` freezes the vision encoder (the paper precomputes ViT-H embeddings);
the prompt encoder and mask decoder stay trainable (the paper trains the decoder at 10x).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import SamConfig, SamModel

from saekit.atomic import atomic_file
from saekit.errors import UserError
from segcompass.postprocess import resized_size

if TYPE_CHECKING:
    from segcompass.modeling.sam_backbone import SamBackbone

# SAM's ImageNet pixel statistics (segment-anything `Sam.pixel_mean/pixel_std`), 0-255 scale.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class SamPreset:
    """The numbers of one SAM architecture (vision encoder, prompt encoder, mask decoder)."""

    hub_id: str | None
    """Hugging Face id of the pretrained weights; None for presets trained from scratch."""
    vision_hidden: int
    """ViT width."""
    vision_layers: int
    """ViT depth."""
    vision_heads: int
    """ViT attention heads."""
    global_attn_indexes: tuple[int, ...]
    """ViT blocks with global (not windowed) attention."""
    window_size: int = 14
    """Windowed-attention side, in patches."""
    image_size: int = 1024
    """Side of the square padded input."""
    patch_size: int = 16
    """Patch side; the embedding is (image_size / patch_size)^2."""
    embed_dim: int = 256
    """Channels of the image embedding = width of prompt encoder and mask decoder."""
    decoder_mlp_dim: int = 2048
    """Two-way transformer feed-forward width."""
    decoder_heads: int = 8
    """Two-way transformer heads."""
    mask_input_channels: int = 16
    """Channels of the dense mask-prompt convolutions."""

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} not divisible by patch_size {self.patch_size}")
        if self.vision_hidden % self.vision_heads or self.embed_dim % self.decoder_heads:
            raise ValueError("widths must be divisible by their head counts")

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (64 for the real presets)."""
        return self.image_size // self.patch_size


SAM_PRESETS: dict[str, SamPreset] = {
    "sam-vit-b": SamPreset("facebook/sam-vit-base", 768, 12, 12, (2, 5, 8, 11)),
    "sam-vit-l": SamPreset("facebook/sam-vit-large", 1024, 24, 16, (5, 11, 17, 23)),
    "sam-vit-h": SamPreset("facebook/sam-vit-huge", 1280, 32, 16, (7, 15, 23, 31)),
    # Embedded world: 128^2 scenes. 16^2 embedding (8 px patches) is the fast default;
    # 32^2 (4 px patches) resolves small objects better at ~4x the encoder cost.
    "sam-tiny-16": SamPreset(None, 96, 4, 4, (1, 3), window_size=8, image_size=128, patch_size=8,
                             embed_dim=64, decoder_mlp_dim=256, decoder_heads=4, mask_input_channels=8),
    "sam-tiny-32": SamPreset(None, 96, 4, 4, (1, 3), window_size=8, image_size=128, patch_size=4,
                             embed_dim=64, decoder_mlp_dim=256, decoder_heads=4, mask_input_channels=8),
}


def _preset(name: str) -> SamPreset:
    if name not in SAM_PRESETS:
        raise UserError(f"unknown SAM preset {name!r}; choose one of {', '.join(SAM_PRESETS)}")
    return SAM_PRESETS[name]


def sam_config(name: str) -> SamConfig:
    """The `transformers.SamConfig` of a preset."""
    p = _preset(name)
    vision = dict(hidden_size=p.vision_hidden, num_hidden_layers=p.vision_layers,
                  num_attention_heads=p.vision_heads, global_attn_indexes=list(p.global_attn_indexes),
                  window_size=p.window_size, image_size=p.image_size, patch_size=p.patch_size,
                  output_channels=p.embed_dim, num_pos_feats=p.embed_dim // 2,
                  # transformers' SAM default is 1e-10 (fine when weights are loaded, but a
                  # from-scratch encoder would start at ~0 and barely train).
                  initializer_range=0.02)
    prompt = dict(hidden_size=p.embed_dim, image_size=p.image_size, patch_size=p.patch_size,
                  mask_input_channels=p.mask_input_channels)
    decoder = dict(hidden_size=p.embed_dim, mlp_dim=p.decoder_mlp_dim, num_attention_heads=p.decoder_heads,
                   iou_head_hidden_dim=p.embed_dim)
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def build_sam(name: str, *, seed: int | None = None) -> SamModel:
    """A randomly initialised SAM of preset `name` (world presets; tests)."""
    if seed is not None:
        torch.manual_seed(seed)
    return SamModel(sam_config(name)).eval()


def freeze_vision_encoder(sam: SamModel) -> SamModel:
    """No gradients and eval mode for the vision encoder; the decoder stays trainable."""
    sam.vision_encoder.requires_grad_(False).eval()
    return sam


def load_sam(name: str, model_path: Path | str | None = None, *, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> SamModel:
    """Pretrained SAM of preset `name` from `model_path` (or the local HF cache), offline.

    The vision encoder comes back frozen. A config that differs from the preset's numbers
    loads anyway, with a warning (the checkpoint is the truth).
    """
    preset = _preset(name)
    if preset.hub_id is None and model_path is None:
        raise UserError(f"SAM preset {name!r} has no published weights; pretrain it with "
                        f"`segcompass sam-pretrain` and pass --sam-path DIR, or pick one of sam-vit-b/l/h")
    source = _resolve_sam_dir(name, preset, model_path)
    sam = SamModel.from_pretrained(source, use_safetensors=True, local_files_only=True, dtype=dtype)
    _warn_on_preset_mismatch(name, preset, sam.config)
    return freeze_vision_encoder(sam.to(device))


def _resolve_sam_dir(name: str, preset: SamPreset, model_path: Path | str | None) -> Path:
    """The directory holding config.json + model.safetensors, or a one-line UserError."""
    if model_path is None:
        try:
            from huggingface_hub import snapshot_download
            path = Path(snapshot_download(preset.hub_id, local_files_only=True))
        except Exception:  # noqa: BLE001 - any miss in the cache means "not available offline"
            raise UserError(f"SAM weights for {name} ({preset.hub_id}) are not in the local Hugging Face "
                            f"cache; download them elsewhere and pass --sam-path DIR") from None
    else:
        path = Path(model_path)
    layout = preset.hub_id or f"{name} (`segcompass sam-pretrain` output)"
    if not path.is_dir():
        raise UserError(f"--sam-path {path}: no such directory; point it at a local {layout} "
                        f"folder (config.json + model.safetensors)")
    if not (path / "config.json").is_file():
        raise UserError(f"--sam-path {path}: no config.json there; expected a {layout} "
                        f"directory (config.json + model.safetensors)")
    if not any(path.glob("*.safetensors")):
        raise UserError(f"--sam-path {path}: no *.safetensors weights (only safetensors are read; "
                        f"convert pytorch_model.bin with transformers' save_pretrained)")
    return path


def _warn_on_preset_mismatch(name: str, preset: SamPreset, config: SamConfig) -> None:
    vision = config.vision_config
    loaded = (vision.hidden_size, vision.num_hidden_layers, vision.image_size, vision.output_channels)
    expected = (preset.vision_hidden, preset.vision_layers, preset.image_size, preset.embed_dim)
    if loaded != expected:
        warnings.warn(f"SAM checkpoint (width, depth, image size, embed dim) = {loaded} differs from "
                      f"preset {name} {expected}; using the checkpoint's", stacklevel=3)


class SamInputs(NamedTuple):
    pixel_values: Tensor
    """(B, 3, S, S) normalised, resized so the longest side is S, zero-padded bottom/right."""
    resized_sizes: Tensor
    """(B, 2) int64 (h, w) of each image inside the padded square."""
    original_sizes: Tensor
    """(B, 2) int64 (H, W) of each input image."""


def preprocess_images(images: Sequence[np.ndarray], image_size: int) -> SamInputs:
    """(H, W, 3) uint8 RGB images -> SAM input: resize longest side, normalise, pad."""
    batch = torch.zeros(len(images), 3, image_size, image_size)
    resized, original = [], []
    mean, std = torch.tensor(PIXEL_MEAN)[:, None, None], torch.tensor(PIXEL_STD)[:, None, None]
    for i, image in enumerate(images):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image {i}: expected (H, W, 3) uint8, got {image.shape} {image.dtype}")
        original.append(tuple(image.shape[:2]))
        h, w = resized_size(image.shape[0], image.shape[1], image_size)
        if (h, w) != image.shape[:2]:
            image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
        pixels = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float()  # (3, h, w)
        batch[i, :, :h, :w] = (pixels - mean) / std  # padding stays 0 after normalisation, as SAM
        resized.append((h, w))
    return SamInputs(batch, torch.tensor(resized), torch.tensor(original))


def image_key(image: np.ndarray) -> str:
    """sha256 of an image's shape, dtype and pixels: the cache key of its embedding."""
    digest = hashlib.sha256(f"{image.shape}|{image.dtype}|".encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def encoder_fingerprint(sam: SamModel) -> str:
    """sha256 (16 hex) of the vision encoder's config and weights: ties a cache to a model."""
    digest = hashlib.sha256(sam.config.vision_config.to_json_string().encode())
    for name, tensor in sorted(sam.vision_encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class ImageEmbeddingCache:
    """Image embeddings on disk, one safetensors file per image, keyed by image hash.

    Layout: `root/<model_tag>/<key[:2]>/<key>.safetensors` holding tensor `image_embedding`
    (C, h, w). `model_tag` must change whenever the encoder does (`encoder_fingerprint`).
    Writes are atomic (`saekit.atomic.atomic_file`), so a killed run leaves no torn file.
    """

    TENSOR_NAME = "image_embedding"

    def __init__(self, root: Path | str, model_tag: str):
        self.directory = Path(root) / model_tag

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> Tensor | None:
        path = self.path(key)
        return load_file(path)[self.TENSOR_NAME] if path.is_file() else None

    def put(self, key: str, embedding: Tensor) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, unique=True) as tmp:  # other processes may fill the same cache
            save_file({self.TENSOR_NAME: embedding.detach().cpu().contiguous()}, str(tmp))

    def get_or_compute(self, images: Sequence[np.ndarray],
                       compute: Callable[[list[np.ndarray]], Tensor]) -> Tensor:
        """(B, C, h, w) embeddings; `compute` runs once, on the images not yet cached."""
        keys = [image_key(image) for image in images]
        found = {key: self.get(key) for key in set(keys)}
        missing = [key for key in dict.fromkeys(keys) if found[key] is None]
        if missing:
            first = {key: images[keys.index(key)] for key in missing}
            computed = compute(list(first.values()))  # (M, C, h, w)
            for key, embedding in zip(missing, computed):
                self.put(key, embedding)
                found[key] = self.get(key)  # read back: a hit and a miss give the same tensor
        return torch.stack([found[key] for key in keys])


@torch.no_grad()
def embed_images(backbone: "SamBackbone", images: Sequence[np.ndarray], *,
                 cache: ImageEmbeddingCache | None = None, batch_size: int = 8) -> Tensor:
    """(B, C, h, w) image embeddings of uint8 RGB images with a frozen backbone, cached.

    Returned on the CPU in the backbone's dtype; move them where the head runs.
    """
    device = backbone.vision_encoder.patch_embed.projection.weight.device

    def compute(batch_images: list[np.ndarray]) -> Tensor:
        chunks = []
        for start in range(0, len(batch_images), batch_size):
            inputs = preprocess_images(batch_images[start:start + batch_size], backbone.image_size)
            chunks.append(backbone(inputs.pixel_values.to(device)).cpu())
        return torch.cat(chunks)

    return cache.get_or_compute(images, compute) if cache is not None else compute(list(images))
