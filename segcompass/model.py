"""SegCompass assembled: policy MLLM + frozen SAE + head + SAM, and its checkpoint folder.

A checkpoint is a folder (every tensor in safetensors, nothing pickled):
    segcompass.json         SegCompassConfig + HeadConfig + training record, the compatibility
                            record of the policy layer the SAE reads (`saekit.compat`), and the
                            size of every file (checked on loading: a damaged folder is refused)
    policy/                 the policy, `save_pretrained` (trained above the SAE layer)
    sae/                    the frozen SAE, sae-lens format (copied so the folder stands alone)
    sam/                    SAM (vision encoder, prompt encoder, mask decoder), `save_pretrained`
    head.safetensors        codebook, aggregator and slot mapper weights
    lora/                   with --lora-rank: the policy's adapters (peft format); policy/ is then
                            the untouched base (`segcompass.lora`)
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from saekit.atomic import atomic_directory
from saekit.compat import COMPAT_KEY, capture_record, check_compatible
from saekit.errors import UserError
from saekit.inputs import TOKEN_TYPE_NAMES, ModelBatch
from saekit.integrity import (check_file_sizes, check_safetensors, file_sizes, load_safetensors,
                              read_json_object)
from saekit.models import LoadedModel, load_model, save_pretrained
from saekit.sae.encode import encode_sparse
from saekit.sae.io import load_sae
from saekit.sparse import SparseCodes
from segcompass.build import HeadConfig, build_backbone, build_head, head_config
from segcompass.modeling.segcompass_head import HeadOutput, SegCompassHead
from segcompass.policy import (SAE_TOKEN_TYPES, PolicyForward, SlotInputs, policy_forward, ref_token_id,
                               slot_inputs)
from segcompass.sam import build_sam, load_sam, preprocess_images

CONFIG_FILE = "segcompass.json"
HEAD_WEIGHTS = "head.safetensors"
_HEAD_OWN_PREFIXES = ("codebook.", "key_codebook.", "aggregator.", "slot_mapper.")  # the mask decoder lives in sam/
SAE_TOKEN_TYPE_NAMES = tuple(TOKEN_TYPE_NAMES[code] for code in SAE_TOKEN_TYPES)
"""The token types SegCompass feeds its SAE (image, prompt, response)."""


@dataclass(frozen=True)
class SegCompassConfig:
    """Which pieces make up a SegCompass model."""

    policy_preset: str = "tiny-llava"
    """saekit model preset of the policy (tiny-llava, llava-1.5-7b, qwen2.5-vl-7b, ...)."""
    sae_layer: int = 2
    """Policy layer the SAE reads (saekit numbering: HF hidden_states[L])."""
    head_preset: str = "tiny-llava"
    """segcompass.build HEAD_PRESETS entry (dimensions of codebook, aggregator, slot mapper)."""
    sam_preset: str = "sam-tiny-16"
    """SAM preset: sam-vit-b/l/h (pretrained, frozen encoder) or sam-tiny-16/32 (trained)."""
    train_sam_encoder: bool = True
    """Train the SAM vision encoder (the world's small one); pretrained ViTs stay frozen."""
    key_kernel: int = 0
    """Slot-mapper key projection side (`HeadConfig.key_kernel`); 0 = the head preset's."""
    policy_image_keys: str = "preset"
    """'on' / 'off': override `HeadConfig.policy_image_keys`; 'preset' = the head preset's."""
    head_routing: str = "preset"
    """'paper' / 'concepts': override `HeadConfig.routing`; 'preset' = the head preset's."""
    lora_rank: int = 0
    """LoRA adapters of this rank on the policy blocks above `sae_layer` (base frozen); 0 = none."""


class SegCompassOutput(NamedTuple):
    head: HeadOutput
    """Heatmaps, confidences, masks and provenance."""
    policy: PolicyForward
    """The one policy forward pass (logits for GRPO, hidden states)."""
    slots: SlotInputs
    """SAE tokens, their samples and positions, slot embeddings."""
    codes: SparseCodes
    """SAE codes of the SAE tokens (atoms with |h| >= the codebook threshold)."""
    policy_image: Tensor | None
    """(B, n_image, d_llm) the image tokens' layer-L states the slot mapper keyed on, or None."""


class HeadInputs(NamedTuple):
    """Everything the head reads for one batch: the place where causal tests intervene."""

    codes: SparseCodes
    """SAE codes of all N SAE tokens (atoms with |h| >= the codebook threshold)."""
    token_sample_index: Tensor
    """(N,) int64 sample of each SAE token."""
    slot_embeddings: Tensor
    """(B, K_s, d_llm) raw concentration-token states e_k (read by the paper routing only)."""
    image_embeddings: Tensor
    """(B, C, h, w) SAM image embeddings."""
    policy_image: Tensor | None
    """(B, g*g, d_llm) raw layer-L image states (paper routing with policy image keys), or None."""
    slot_rows: Tensor
    """(B, K_s) int64 code row of each slot's concentration token (-1: none)."""
    image_rows: Tensor
    """(B, g*g) int64 code row of each image token, raster order (-1: none)."""


class SegCompass(nn.Module):
    def __init__(self, *, policy: LoadedModel, sae: nn.Module, head: SegCompassHead, sam: nn.Module,
                 config: SegCompassConfig, head_cfg: HeadConfig):
        super().__init__()
        self.loaded = policy
        self.policy = policy.model
        self.sae = sae.requires_grad_(False).eval()
        self.head = head
        self.sam = sam
        self.backbone = build_backbone(sam, trainable=config.train_sam_encoder)
        self.config, self.head_cfg = config, head_cfg
        self.ref_token_id = ref_token_id(policy)
        freeze_policy_up_to(self.policy, config.sae_layer)
        if config.lora_rank:
            from segcompass.lora import add_lora

            add_lora(self.policy, config.sae_layer, config.lora_rank)
        self.embedding_cache = None

    @property
    def sam_input_size(self) -> int:
        return self.backbone.image_size

    def image_embeddings(self, images: list[np.ndarray]) -> Tensor:
        """(B, C, h, w) SAM image embeddings of uint8 RGB images (gradients if the encoder trains;
        a frozen encoder's come from the on-disk cache when `use_embedding_cache` set one)."""
        device = next(self.head.parameters()).device
        if self.embedding_cache is not None and not self.backbone.trainable:
            from segcompass.sam import embed_images

            with torch.autocast(device.type, enabled=False):  # cached in fp32, whatever the run's precision
                return embed_images(self.backbone, images, cache=self.embedding_cache).to(device)
        pixels = preprocess_images(images, self.sam_input_size).pixel_values
        return self.backbone(pixels.to(device))

    def use_embedding_cache(self, root: str | Path) -> None:
        """Keep the frozen SAM encoder's embeddings in `root`, keyed by image content and by the
        preset and encoder weights (`sam.ImageEmbeddingCache`); a trained encoder is never cached."""
        if self.backbone.trainable:
            return
        from segcompass.sam import ImageEmbeddingCache, encoder_fingerprint

        self.embedding_cache = ImageEmbeddingCache(root, f"{self.config.sam_preset}-{encoder_fingerprint(self.sam)}")

    def forward(self, batch: ModelBatch, image_embeddings: Tensor,
                keep_slot_embeddings: Tensor | None = None) -> SegCompassOutput:
        """One policy pass over prompt + response, SAE codes, head -> SegCompassOutput."""
        return self.heads(policy_forward(self.policy, batch, self.config.sae_layer), batch, image_embeddings,
                          keep_slot_embeddings)

    def heads(self, forward: PolicyForward, batch: ModelBatch, image_embeddings: Tensor,
              keep_slot_embeddings: Tensor | None = None) -> SegCompassOutput:
        """Everything after the policy pass: slots, SAE codes, head (GRPO reuses TRL's pass).

        keep_slot_embeddings: optional (B,) bool; a False sample's e_k are zeroed, so its slots
        see only the SAE concept pathway r_k (training-time dropout, `TrainConfig.slot_embedding_dropout`).
        """
        slots, inputs = self.head_inputs(forward, batch, image_embeddings)
        if keep_slot_embeddings is not None:
            keep = keep_slot_embeddings.to(inputs.slot_embeddings)[:, None, None]
            inputs = inputs._replace(slot_embeddings=inputs.slot_embeddings * keep)
        return SegCompassOutput(self.run_head(inputs), forward, slots, inputs.codes, inputs.policy_image)

    def head_inputs(self, forward: PolicyForward, batch: ModelBatch,
                    image_embeddings: Tensor) -> tuple[SlotInputs, HeadInputs]:
        """The slot inputs of one policy pass and what the head reads from them."""
        slots = slot_inputs(forward, batch, self.ref_token_id, self.head.num_slots)
        codes = encode_sparse(self.sae, slots.sae_tokens.detach().to(self.sae.W_enc.dtype),
                              threshold=self.head_cfg.threshold)  # the SAE is frozen: no gradient
        reads_image = self.head_cfg.policy_image_keys or self.head.concept_routed
        policy_image = policy_image_tokens(forward, batch) if reads_image else None
        image_rows = slots.token_rows(image_positions(batch).to(slots.token_position.device)) if reads_image else slots.slot_positions[:, :0]
        return slots, HeadInputs(codes, slots.token_sample_index, slots.slot_embeddings.float(), image_embeddings,
                                 policy_image, slots.token_rows(slots.slot_positions), image_rows)

    def run_head(self, inputs: HeadInputs) -> HeadOutput:
        """The head on (possibly edited) inputs."""
        policy_image = inputs.policy_image if self.head_cfg.policy_image_keys else None
        return self.head(inputs.codes, inputs.token_sample_index, inputs.slot_embeddings, inputs.image_embeddings,
                         policy_image, slot_rows=inputs.slot_rows, image_rows=inputs.image_rows)


def image_positions(batch: ModelBatch) -> Tensor:
    """(B, n_image) int64 positions of each sample's image tokens, in raster order."""
    from saekit.inputs import TokenType

    is_image = batch.token_types == int(TokenType.IMAGE)  # (B, T)
    counts = is_image.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"image keys need the same number of image tokens per sample, got {counts.tolist()}")
    return is_image.nonzero(as_tuple=True)[1].view(len(counts), int(counts[0]))  # (B*n,) -> (B, n)


def policy_image_tokens(forward: PolicyForward, batch: ModelBatch) -> Tensor:
    """(B, n_image, d) layer-L states of each sample's image tokens, in the vision tower's
    raster order (every sample of a LLaVA batch has the same n_image)."""
    positions = image_positions(batch).to(forward.sae_hidden.device)  # (B, n)
    rows = torch.arange(len(positions), device=positions.device)[:, None]  # (B, 1)
    return forward.sae_hidden[rows, positions]  # (B, T, d) -> (B, n, d)


def freeze_policy_up_to(policy: nn.Module, layer: int) -> None:
    """Freeze everything the layer-L states depend on: vision tower, projector, embeddings,
    blocks 1..L. Blocks above L, the final norm and an untied LM head stay trainable."""
    from saekit.capture import decoder_layers

    blocks = decoder_layers(policy)
    policy.requires_grad_(False)
    for block in list(blocks)[layer:]:
        block.requires_grad_(True)
    from segcompass.policy import final_norm

    final_norm(policy).requires_grad_(True)
    head, embeddings = policy.get_output_embeddings().weight, policy.get_input_embeddings().weight
    # With tied embeddings (the world policy) the LM head IS the input embedding matrix:
    # training it would move the layer-L states the frozen SAE reads, so it stays frozen.
    if head.data_ptr() != embeddings.data_ptr():
        policy.get_output_embeddings().requires_grad_(True)


def policy_compat(policy: LoadedModel, sae_layer: int) -> dict[str, Any]:
    """The compatibility record of what SegCompass feeds its SAE: layer `sae_layer` of `policy`."""
    return capture_record(policy, sae_layer, SAE_TOKEN_TYPE_NAMES)


def build_segcompass(config: SegCompassConfig, *, policy_path: str | Path, sae_path: str | Path,
                     sam_path: str | Path | None = None, seed: int = 0,
                     device: str | torch.device = "cpu", allow_mismatch: bool = False) -> SegCompass:
    """A new SegCompass from a (warm-started) policy, a trained SAE and SAM.

    The SAE must have been trained on this policy's layer `sae_layer` (its compatibility
    record against the policy's, `saekit.compat`) unless `allow_mismatch`."""
    policy = load_model(config.policy_preset, policy_path, device=device, path_flag="--policy")
    if not 1 <= config.sae_layer <= policy.preset.n_layers:
        raise UserError(f"--sae-layer {config.sae_layer} is out of range for {policy.preset.name} "
                        f"(valid 1..{policy.preset.n_layers})")
    target = f"--policy {policy_path} at --sae-layer {config.sae_layer}"
    sae = load_sae(sae_path, expected_d_in=policy.preset.d_model, target=target,
                   given=policy_compat(policy, config.sae_layer), allow_mismatch=allow_mismatch,
                   device=device).sae
    overrides = {"key_kernel": config.key_kernel} if config.key_kernel else {}
    if config.policy_image_keys not in ("preset", "on", "off"):
        raise UserError(f"policy_image_keys must be preset, on or off, got {config.policy_image_keys!r}")
    if config.policy_image_keys != "preset":
        overrides["policy_image_keys"] = config.policy_image_keys == "on"
    if config.head_routing not in ("preset", "paper", "concepts"):
        raise UserError(f"head_routing must be preset, paper or concepts, got {config.head_routing!r}")
    if config.head_routing != "preset":
        overrides["routing"] = config.head_routing
    cfg = head_config(config.head_preset, d_sae=sae.d_sae, d_llm=policy.preset.d_model,
                      sam_preset=config.sam_preset, **overrides)
    sam = load_sam(config.sam_preset, sam_path, device=device) if sam_path else build_sam(config.sam_preset, seed=seed)
    torch.manual_seed(seed)
    head = build_head(cfg, sam).to(device)
    return SegCompass(policy=policy, sae=sae, head=head, sam=sam.to(device), config=config, head_cfg=cfg)


def save_segcompass(model: SegCompass, directory: str | Path, *, sae_path: str | Path,
                    record: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint folder (see the module docstring) atomically."""
    with atomic_directory(directory) as tmp:
        write_checkpoint(model, tmp, sae_path=sae_path, record=record)
    return Path(directory)


def write_checkpoint(model: SegCompass, tmp: Path, *, sae_path: str | Path, record: dict | None) -> None:
    """Fill the (empty) folder `tmp` with the checkpoint files."""
    from segcompass.lora import LORA_DIR, base_layers, has_lora, save_lora

    with base_layers(model.policy):  # with adapters, policy/ is the untouched base
        save_pretrained(model.loaded, tmp / "policy")
    if has_lora(model.policy):
        save_lora(model.policy, tmp / LORA_DIR)
    shutil.copytree(sae_path, tmp / "sae")
    model.sam.save_pretrained(tmp / "sam", safe_serialization=True)
    head_state = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()
                  if k.startswith(_HEAD_OWN_PREFIXES)}
    save_file(head_state, str(tmp / HEAD_WEIGHTS))
    meta = {"config": dataclasses.asdict(model.config), "head": dataclasses.asdict(model.head_cfg),
            "record": record or {}, COMPAT_KEY: policy_compat(model.loaded, model.config.sae_layer),
            "files": file_sizes(tmp)}
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))


def load_segcompass(directory: str | Path, *, device: str | torch.device = "cpu",
                    merge_lora: bool = False) -> SegCompass:
    """Read a checkpoint folder written by `save_segcompass`; `merge_lora` folds LoRA adapters
    into the policy's weights (the model then saves as a plain checkpoint)."""
    directory = Path(directory)
    meta_path = directory / CONFIG_FILE
    if not meta_path.is_file():
        what = "does not exist" if not directory.exists() else f"has no {CONFIG_FILE}"
        raise UserError(f"checkpoint {directory} {what}; point --checkpoint at a folder written "
                        "by `segcompass train` (e.g. runs/segcompass/final)")
    fix = "the checkpoint is damaged: copy it again or retrain"
    meta = read_json_object(meta_path, fields={"config": dict, "head": dict}, fix=fix)
    if isinstance(meta.get("files"), dict):  # written with sizes: every file is whole
        check_file_sizes(directory, meta["files"], fix=fix)
    else:  # an older checkpoint: at least the head and SAM weights
        check_safetensors(directory / HEAD_WEIGHTS, fix=fix)
        check_safetensors(directory / "sam" / "model.safetensors", fix=fix)
        read_json_object(directory / "sam" / "config.json", fix=fix)
    try:
        config = SegCompassConfig(**meta["config"])
        head_cfg = HeadConfig(**meta["head"])
    except TypeError as err:
        raise UserError(f"{meta_path}: 'config' or 'head' has fields this segcompass does not know "
                        f"({err}); {fix}") from None
    policy = load_model(config.policy_preset, directory / "policy", device=device, path_flag=None)
    given = policy_compat(policy, config.sae_layer)
    if isinstance(meta.get(COMPAT_KEY), dict):  # the policy's frozen layers are the ones trained with
        check_compatible(meta[COMPAT_KEY], f"checkpoint {directory}", given, "its policy/ folder",
                         advice=f"the policy/ folder is not the one trained; {fix}")
    sae = load_sae(directory / "sae", expected_d_in=policy.preset.d_model, given=given,
                   target=f"its policy's layer {config.sae_layer}", device=device).sae
    sam = _load_sam_folder(directory / "sam", device)
    head = build_head(head_cfg, sam).to(device)
    missing, unexpected = head.load_state_dict(load_safetensors(directory / HEAD_WEIGHTS, fix=fix), strict=False)
    own_missing = [k for k in missing if k.startswith(_HEAD_OWN_PREFIXES)]
    if own_missing or unexpected:
        raise UserError(f"{directory / HEAD_WEIGHTS}: weights do not match the head config "
                        f"(missing {own_missing[:3]}, unexpected {unexpected[:3]})")
    model = SegCompass(policy=policy, sae=sae, head=head, sam=sam, config=config, head_cfg=head_cfg)
    if config.lora_rank:
        from segcompass import lora

        lora.load_lora_weights(model.policy, directory / lora.LORA_DIR)
        if merge_lora:
            lora.merge_lora(model.policy)
            model.config = dataclasses.replace(config, lora_rank=0)
    return model


def _load_sam_folder(folder: Path, device: str | torch.device) -> nn.Module:
    from safetensors import SafetensorError
    from transformers import SamModel

    try:
        return SamModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).to(device)
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{folder}: cannot load SAM ({first}); the checkpoint is damaged: copy it "
                        "again or retrain") from None


def checkpoint_record(directory: str | Path) -> dict[str, Any]:
    """The training record stored in a checkpoint's segcompass.json."""
    record = read_json_object(Path(directory) / CONFIG_FILE).get("record", {})
    return record if isinstance(record, dict) else {}
