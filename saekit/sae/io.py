"""SAE folders in the sae-lens 6 format, plus saekit's sidecar.

    DIR/cfg.json                   sae-lens inference config (architecture standard | topk |
                                   jumprelu; BatchTopK and Matryoshka save as jumprelu)
    DIR/sae_weights.safetensors    W_enc (d_in, d_sae), b_enc (d_sae,), W_dec (d_sae, d_in), b_dec (d_in,)
                                   (+ threshold (d_sae,) for jumprelu)
    DIR/saekit.json                what saekit knows: model preset, layer in every naming,
                                   token types, data, normalisation, training summary

`sae_lens.SAE.load_from_disk(DIR)` reads the folder and encodes exactly as saekit does.
saekit's facts also go into cfg.json's `metadata` where sae-lens has a field for them
(`model_name`, `hook_name`, `hook_head_index`) and under `saekit_*` keys otherwise. The
input normalisation used in training is folded into the weights before saving, so both
libraries take raw activations; its factor is recorded. saekit.json is written last:
its presence marks a finished folder.
"""

from __future__ import annotations

from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from saekit.atomic import atomic_file, atomic_write_json
from saekit.compat import check_compatible, check_token_types, sae_record
from saekit.errors import UserError
from saekit.integrity import check_safetensors, read_json_object
from saekit.sae.model import SparseAutoencoder

SAE_CFG_FILENAME = "cfg.json"  # sae_lens.constants.SAE_CFG_FILENAME
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"  # sae_lens.constants.SAE_WEIGHTS_FILENAME
SAEKIT_INFO_FILENAME = "saekit.json"
SAEKIT_INFO_FORMAT = "saekit-sae"
WEIGHT_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
               torch.bfloat16: "bfloat16"}


class LoadedSAE(NamedTuple):
    """An SAE read from a folder."""

    sae: SparseAutoencoder
    """The module, in eval mode."""
    cfg: dict[str, Any]
    """cfg.json as written (sae-lens inference config)."""
    info: dict[str, Any]
    """saekit.json ({} for folders written by other tools)."""


def _sae_lens_version() -> str:
    try:
        return importlib_metadata.version("sae-lens")
    except importlib_metadata.PackageNotFoundError:
        return "6.0.0"  # the format version this writer follows


def sae_lens_cfg(sae: SparseAutoencoder, metadata: dict[str, Any]) -> dict[str, Any]:
    """The sae-lens 6 inference config dict of `sae` (as `SAEConfig.to_dict()` writes it)."""
    cfg: dict[str, Any] = {
        "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": DTYPE_NAMES[sae.W_enc.dtype], "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input, "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": _sae_lens_version(), "sae_lens_training_version": None,
                     **metadata},
        "architecture": sae.architecture,
    }
    if sae.architecture == "topk":
        cfg.update(k=sae.k, rescale_acts_by_decoder_norm=False)
    return cfg


def save_sae(sae: SparseAutoencoder, directory: str | Path, *, metadata: dict[str, Any],
             info: dict[str, Any]) -> Path:
    """Write `sae` as an sae-lens folder with `metadata` in cfg.json and `info` in saekit.json.

    Each file is written to a temporary name and renamed; saekit.json comes last.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {name: getattr(sae, name).detach().contiguous().cpu() for name in weight_names(sae)}
    with atomic_file(directory / SAE_WEIGHTS_FILENAME) as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt"})
    atomic_write_json(directory / SAE_CFG_FILENAME, sae_lens_cfg(sae, metadata))
    atomic_write_json(directory / SAEKIT_INFO_FILENAME, {"format": SAEKIT_INFO_FORMAT, "version": 1, **info})
    return directory


def read_sae_cfg(directory: str | Path) -> dict[str, Any]:
    """cfg.json of an SAE folder, or a UserError saying what is missing."""
    directory = Path(directory)
    path = directory / SAE_CFG_FILENAME
    if not path.is_file():
        what = ("does not exist" if not directory.exists() else "is a file, not a folder"
                if not directory.is_dir() else f"has no {SAE_CFG_FILENAME}")
        raise UserError(f"SAE folder {directory} {what}; train one with `saekit train` or "
                        "point at a folder written by sae-lens's save_model")
    cfg = read_json_object(path, fields={"d_in": int, "d_sae": int, "architecture": str},
                           fix="restore the SAE folder or train it again")
    if cfg["d_in"] < 1 or cfg["d_sae"] < 1:
        raise UserError(f"{path}: d_in and d_sae must be >= 1, got {cfg['d_in']} and {cfg['d_sae']}")
    return cfg


_INFO_OBJECTS = ("model", "layer", "training", "normalization", "data")


def read_sae_info(directory: str | Path) -> dict[str, Any]:
    """saekit.json of an SAE folder ({} when the folder was written by another tool)."""
    path = Path(directory) / SAEKIT_INFO_FILENAME
    if not path.exists():
        return {}
    info = read_json_object(path, fix="restore the SAE folder or train it again")
    layer = info.get("layer")
    if isinstance(layer, int) and not isinstance(layer, bool):  # a bare layer number: its names
        info["layer"] = {"hf_hidden_states_index": layer,
                         "transformer_lens_hook": f"blocks.{layer - 1}.hook_resid_post"}
    for key in _INFO_OBJECTS:
        if key in info and not isinstance(info[key], dict):
            raise UserError(f"{path}: field '{key}' must be an object, got "
                            f"{type(info[key]).__name__}; restore the SAE folder or train it again")
    return info


def _describe_layer(cfg: dict[str, Any], info: dict[str, Any]) -> str:
    layer = info.get("layer", {})
    if layer.get("hf_hidden_states_index") is not None:
        return f"layer {layer['hf_hidden_states_index']} of {info.get('model', {}).get('name', '?')}"
    hook = cfg.get("metadata", {}).get("hook_name")
    return f"hook {hook}" if hook else "an unknown layer"


def check_d_in(directory: Path, cfg: dict[str, Any], info: dict[str, Any], expected_d_in: int,
               target: str | None) -> None:
    """UserError unless the SAE's d_in equals `expected_d_in` (the width it will be fed)."""
    d_in = int(cfg["d_in"])
    if d_in != expected_d_in:
        raise UserError(f"SAE {directory} has d_in {d_in} (trained on {_describe_layer(cfg, info)}) "
                        f"but {target or 'the activations'} have width {expected_d_in}; "
                        "use an SAE trained on this model and layer")


def _check_supported(path: Path, cfg: dict[str, Any]) -> None:
    if cfg.get("architecture") not in ("standard", "topk", "jumprelu"):
        raise UserError(f"{path}: architecture {cfg.get('architecture')!r} is not supported by "
                        "saekit (standard, topk, jumprelu)")
    if cfg.get("normalize_activations", "none") not in ("none", "expected_average_only_in"):
        raise UserError(f"{path}: normalize_activations={cfg['normalize_activations']!r} is not "
                        "supported; fold the normalisation into the weights first")
    if cfg.get("reshape_activations", "none") != "none":
        raise UserError(f"{path}: reshape_activations={cfg['reshape_activations']!r} is not supported")


def sae_compat(directory: str | Path) -> dict[str, Any]:
    """The SAE folder's compatibility record (`saekit.compat.sae_record`)."""
    return sae_record(read_sae_cfg(directory), read_sae_info(directory))


def load_sae(directory: str | Path, *, expected_d_in: int | None = None, target: str | None = None,
             given: dict[str, Any] | None = None, allow_mismatch: bool = False,
             token_types: tuple[str, ...] | None = None,
             device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> LoadedSAE:
    """Read an SAE folder (saekit's or sae-lens's standard / topk format).

    expected_d_in: width of the activations the SAE will encode; a different d_in is a
    one-line UserError naming both widths and layers (`target` describes the caller's
    activations, e.g. "layer 16 of llava-1.5-13b"), even with `allow_mismatch`.
    given: the compatibility record of those activations (`saekit.compat`): another model,
    fingerprint, layer or normalisation, or `token_types` the SAE was not trained on, is a
    UserError naming both unless `allow_mismatch`. Weights must be whole and finite.
    """
    directory = Path(directory)
    cfg, info = read_sae_cfg(directory), read_sae_info(directory)
    _check_supported(directory / SAE_CFG_FILENAME, cfg)
    if given is not None:
        record = sae_record(cfg, info)
        check_compatible(record, f"SAE {directory}", given, target or "the activations",
                         allow_mismatch=allow_mismatch)
        check_token_types(record.get("token_types"), token_types or given.get("token_types") or (),
                          f"SAE {directory}", allow_mismatch=allow_mismatch)
    if expected_d_in is not None:
        check_d_in(directory, cfg, info, expected_d_in, target)
    weights_path = directory / SAE_WEIGHTS_FILENAME
    if not weights_path.is_file():
        raise UserError(f"SAE folder {directory} has no {SAE_WEIGHTS_FILENAME}")
    check_safetensors(weights_path, fix="restore the SAE folder or train it again")
    with safe_open(str(weights_path), framework="pt", device="cpu") as handle:
        weights = {name: handle.get_tensor(name) for name in handle.keys()}
    dtype_name = str(cfg.get("dtype", "float32")).replace("torch.", "")
    if dtype is None and dtype_name not in DTYPE_NAMES.values():
        raise UserError(f"{directory / SAE_CFG_FILENAME}: dtype {cfg.get('dtype')!r} is not one of "
                        f"{', '.join(DTYPE_NAMES.values())}")
    dtype = dtype or getattr(torch, dtype_name)
    sae = SparseAutoencoder(d_in=int(cfg["d_in"]), d_sae=int(cfg["d_sae"]),
                            architecture=cfg["architecture"], k=cfg.get("k"),
                            apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
                            dtype=dtype, device=device)
    _load_weights(sae, weights, weights_path)
    if cfg.get("rescale_acts_by_decoder_norm"):
        _fold_decoder_norm(sae)
    return LoadedSAE(sae.eval(), cfg, info)


def weight_names(sae: SparseAutoencoder) -> tuple[str, ...]:
    """The tensors of `sae` in sae_weights.safetensors (sae-lens's state-dict names)."""
    return WEIGHT_NAMES + (("threshold",) if sae.architecture == "jumprelu" else ())


def _load_weights(sae: SparseAutoencoder, weights: dict[str, torch.Tensor], path: Path) -> None:
    with torch.no_grad():
        for name in weight_names(sae):
            param = getattr(sae, name)
            if name not in weights or weights[name].shape != param.shape:
                got = tuple(weights[name].shape) if name in weights else "missing"
                raise UserError(f"{path}: {name} is {got}, cfg.json implies {tuple(param.shape)}")
            if not bool(torch.isfinite(weights[name]).all()):
                raise UserError(f"{path}: {name} holds NaN or infinite values (a diverged or "
                                "damaged SAE); retrain it, e.g. with a lower --lr")
            param.copy_(weights[name])


@torch.no_grad()
def _fold_decoder_norm(sae: SparseAutoencoder) -> None:
    """sae-lens TopK with rescale_acts_by_decoder_norm scores pre·‖W_dec,i‖ and decodes
    f/‖W_dec,i‖: the same as unit-norm decoder rows with the norms moved into the encoder."""
    norm = sae.W_dec.norm(dim=1)  # (d_sae,)
    sae.W_enc.mul_(norm)
    sae.b_enc.mul_(norm)
    sae.W_dec.div_(norm.unsqueeze(1))
