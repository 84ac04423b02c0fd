"""Model presets and loading: LLaVA-1.5, Qwen2.5-VL and their tiny random-init twins.

Every number about a backbone lives in `PRESETS`. Real presets load strictly offline,
from `--model-path DIR` or the local Hugging Face cache; saekit never downloads weights.
The tiny twins are the same `transformers` classes at toy sizes (see `saekit.tiny`), so
every code path that runs on them is the code path a 7B model takes.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from saekit.atomic import atomic_write_json, normal_permissions
from saekit.errors import UserError
from saekit.presets import PRESETS, LoadedModel, ModelPreset, get_preset  # noqa: F401 (re-exported)
from saekit.tiny import build_tiny

PRESET_FILE = "saekit_preset.json"  # written by `save_pretrained` next to the HF files


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else as given, after checking that
    this torch can use it (a UserError naming the device otherwise)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise UserError(f"--device {device}: not a device torch knows ({err}); use auto, cpu, "
                        "cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch was built without CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible")
            raise UserError(f"--device {device}: {why}; use --device cpu (or auto)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) "
                            f"are visible (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: MPS is not available here; use --device cpu (or auto)")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None -> fp32 on CPU (bf16 matmul is ~300x slower there), bf16 on an accelerator."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(names)}")
    return names[dtype]


def load_model(name: str, model_path: str | Path | None = None, *, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = None, path_flag: str | None = "--model-path") -> LoadedModel:
    """Load preset `name` offline: from `model_path`, the local HF cache, or (tiny) in-process.

    Never downloads. A missing directory, a checkpoint of another family or an unreadable
    file is a one-line `UserError` that says where saekit looked and what to do.
    `path_flag`: the caller's flag that gives `model_path` (named in that advice); None when
    the folder is part of something else (a SegCompass checkpoint's policy/).
    """
    preset = get_preset(name)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if preset.is_tiny and model_path is None:
        loaded = build_tiny(preset.name)
        loaded.model.to(device=device, dtype=dtype)
        return loaded
    directory = _find_weights(preset, model_path, path_flag)
    return _load_directory(preset, directory, device, dtype)


def _find_weights(preset: ModelPreset, model_path: str | Path | None, path_flag: str | None) -> Path:
    """The directory holding `config.json` for `preset`, or a UserError saying how to get one."""
    give = f"pass {path_flag} DIR pointing at" if path_flag else "it must be"
    how = (f"{give} a local copy of {preset.hub_id}, or run "
           f"`huggingface-cli download {preset.hub_id}` on a machine with network"
           if preset.hub_id else
           f"{give} a directory written by saekit.models.save_pretrained")
    if model_path is not None:
        directory = Path(model_path).expanduser()
        if not (directory / "config.json").is_file():
            what = "does not exist" if not directory.exists() else "has no config.json"
            raise UserError(f"model {preset.name}: {directory} {what}; {how}")
        return directory
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:  # local_files_only: look in the cache, never on the network
        return Path(snapshot_download(preset.hub_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        raise UserError(f"model {preset.name}: weights of {preset.hub_id} are not in the local "
                        f"Hugging Face cache ({constants.HF_HUB_CACHE}); {how}") from None


def _load_directory(preset: ModelPreset, directory: Path, device: torch.device,
                    dtype: torch.dtype) -> LoadedModel:
    """Load model + tokenizer + image processor from a local HF-layout directory."""
    import transformers

    from safetensors import SafetensorError

    config = _read_config(preset, directory)
    model_class = getattr(transformers, preset.hf_class)
    # On an accelerator, place weights there while loading (no full copy in host memory).
    placement = {"device_map": str(device)} if device.type != "cpu" else {}
    try:
        model = model_class.from_pretrained(directory, config=config, dtype=dtype,
                                            use_safetensors=True,  # never unpickle weights
                                            local_files_only=True, **placement)
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
        image_processor = _load_image_processor(directory)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError, SafetensorError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"model {preset.name}: could not load {preset.hf_class} from "
                        f"{directory}: {first_line}") from None
    model.to(device).eval()
    return LoadedModel(model, tokenizer, image_processor, _actual_preset(preset, config, directory))


def _read_config(preset: ModelPreset, directory: Path):
    """The checkpoint's config, after checking its model_type is the preset's family."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"model {preset.name}: unreadable {directory / 'config.json'}: "
                        f"{str(err).strip().splitlines()[0] if str(err).strip() else err!r}") from None
    if config.model_type != preset.family:
        raise UserError(f"model {preset.name}: {directory / 'config.json'} has model_type "
                        f"{config.model_type!r}, expected {preset.family!r}; pick the preset that "
                        f"matches the checkpoint ({', '.join(PRESETS)})")
    return config


def _load_image_processor(directory: Path):
    """The checkpoint's image processor; the PIL backend when torchvision is missing."""
    from transformers import AutoImageProcessor
    from transformers.utils import is_torchvision_available

    kwargs: dict[str, Any] = {"local_files_only": True}
    if not is_torchvision_available():
        kwargs["backend"] = "pil"  # the default torchvision backend cannot be imported
    try:
        return AutoImageProcessor.from_pretrained(directory, **kwargs)
    except TypeError:  # a transformers without the `backend` switch
        kwargs.pop("backend", None)
        return AutoImageProcessor.from_pretrained(directory, **kwargs)


def _actual_preset(preset: ModelPreset, config, directory: Path) -> ModelPreset:
    """`preset` with the width/depth of the loaded checkpoint (warns when they differ)."""
    text = config.text_config
    d_model, n_layers = int(text.hidden_size), int(text.num_hidden_layers)
    saved = directory / PRESET_FILE
    default_layer = preset.default_layer
    if saved.is_file():  # a folder saekit wrote for this very preset keeps its default layer
        record = json.loads(saved.read_text())
        if record.get("name") == preset.name:
            default_layer = int(record["default_layer"])
    if (d_model, n_layers) != (preset.d_model, preset.n_layers) and not preset.is_tiny:
        warnings.warn(f"model {preset.name}: {directory} has d_model {d_model} and {n_layers} "
                      f"layers, the preset says {preset.d_model} and {preset.n_layers}; using "
                      f"the checkpoint's numbers", stacklevel=3)
    if not 1 <= default_layer <= n_layers:
        default_layer = max(1, n_layers // 2)
    return dataclasses.replace(preset, d_model=d_model, n_layers=n_layers,
                               default_layer=default_layer)


def save_pretrained(loaded: LoadedModel, directory: str | Path) -> Path:
    """Write model (safetensors), tokenizer, image processor and `saekit_preset.json`.

    The folder loads with `load_model(preset, model_path=directory)` and with the plain
    `transformers` class (`LlavaForConditionalGeneration.from_pretrained(directory)`).
    For LLaVA a `LlavaProcessor` is saved too, so tools that load a processor (e.g.
    TransformerLens's `TransformerBridge.boot_transformers`) find one.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(directory, safe_serialization=True)
    loaded.tokenizer.save_pretrained(directory)
    loaded.image_processor.save_pretrained(directory)
    if loaded.preset.family == "llava":
        _save_llava_processor(loaded, directory)
    normal_permissions(directory)  # safetensors writes 0600: other users could not read the weights
    # Written last, via a temporary name: its presence marks a complete folder.
    atomic_write_json(directory / PRESET_FILE, dataclasses.asdict(loaded.preset))
    return directory


def _save_llava_processor(loaded: LoadedModel, directory: Path) -> None:
    from transformers import LlavaProcessor

    config = loaded.model.config
    processor = LlavaProcessor(
        image_processor=loaded.image_processor, tokenizer=loaded.tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        image_token=loaded.preset.image_token,
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=loaded.tokenizer.chat_template)
    processor.save_pretrained(directory)
