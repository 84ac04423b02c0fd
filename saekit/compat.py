"""The compatibility record every piece carries, and the one check that two pieces fit.

A piece is an activation cache (a record per cached layer, in manifest.json), an SAE
(saekit.json) or a SegCompass checkpoint (segcompass.json). Its record says which
activations it holds or expects:

    model          saekit preset name (tiny-llava, llava-1.5-7b, ...)
    fingerprint    digest of the model's parameter names and shapes and of a sample of every
                   weight that layer `layer` depends on (`model_fingerprint`); None: unknown
    layer          HF hidden_states index L (output of decoder block L counted from 1)
    hook           the same layer in TransformerLens's naming, blocks.{L-1}.hook_resid_post
    d_in           width of the activations
    token_types    token types the piece holds (a cache) or was trained on (an SAE)
    normalization  what is done to raw activations before use: "none" (saekit folds its
                   scale into the SAE weights, so every saekit piece takes raw activations)

A consumer calls `check_compatible(...)` with the record of what it has and the record of
what it is given; a mismatch is a one-line UserError naming both pieces and every field
that differs, unless the user passed the override flag (then it is a warning). A field
either record lacks (a piece written before records existed) is not compared.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Iterable, Mapping

import torch

from saekit.errors import UserError

log = logging.getLogger(__name__)

COMPAT_KEY = "compat"
"""Where a piece's JSON keeps its record."""
COMPARED = ("model", "fingerprint", "layer", "hook", "d_in", "normalization")
"""Fields that must be equal (token types are a subset check, `check_token_types`)."""
OVERRIDE_FLAG = "--allow-mismatch"
_SAMPLES_PER_TENSOR = 4096


def _sample(param: torch.Tensor) -> tuple[str, bytes]:
    """(dtype tag, bytes) of up to 4096 evenly spaced values of `param`.

    float32 and bfloat16 weights are rounded to bfloat16 first, so the same model loaded in
    either dtype (CPU float32, GPU bfloat16) has one fingerprint; a fine-tune changes the
    rounding of enough of the ~10^5-10^6 sampled values to change it too. Float16 weights are
    hashed as they are (tag fp16): their fingerprint is compared with fp16 ones only."""
    flat = param.detach().reshape(-1)
    step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
    values = flat[::step][:_SAMPLES_PER_TENSOR]
    if values.dtype == torch.float16:
        return "fp16", values.cpu().contiguous().view(torch.int16).numpy().tobytes()
    if values.is_floating_point():
        values = values.to(torch.bfloat16)
        return "bf16", values.cpu().contiguous().view(torch.int16).numpy().tobytes()
    return "int", values.cpu().contiguous().numpy().tobytes()


def _layer_inputs(model: torch.nn.Module, layer: int) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) of everything the layer-`layer` states depend on: all parameters but
    decoder blocks L+1.., the final norm and an untied LM head."""
    from saekit.capture import decoder_layers

    blocks = decoder_layers(model)
    blocks_path = next(name for name, module in model.named_modules() if module is blocks)
    lm_path = blocks_path.rsplit(".", 1)[0] if "." in blocks_path else ""
    later = tuple(f"{blocks_path}.{i}." for i in range(layer, len(blocks)))
    norm = f"{lm_path}.norm." if lm_path else "norm."
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    untied_head = (head.weight if head is not None and embeddings is not None
                   and head.weight is not embeddings.weight else None)
    return [(name, p) for name, p in model.named_parameters()
            if not name.startswith(later) and not name.startswith(norm) and p is not untied_head]


@torch.no_grad()
def model_fingerprint(model: torch.nn.Module, layer: int) -> str:
    """Digest of what layer `layer`'s activations depend on (see `_sample`): the parameter
    names and shapes (the architecture) and a sample of each such weight. Blocks above the
    layer are left out, so a policy trained above its SAE layer keeps its fingerprint."""
    digest = hashlib.sha256(type(model).__name__.encode())
    tags = set()
    for name, param in sorted(_layer_inputs(model, layer), key=lambda item: item[0]):
        tag, data = _sample(param)
        tags.add(tag)
        digest.update(f"{name}\0{tuple(param.shape)}\0".encode())
        digest.update(data)
    return ("fp16:" if "fp16" in tags else "bf16:") + digest.hexdigest()[:32]


def capture_record(loaded: Any, layer: int, token_types: Iterable[str]) -> dict[str, Any]:
    """The record of activations captured from `loaded` (a `LoadedModel`) at `layer`."""
    return {"model": loaded.preset.name, "fingerprint": model_fingerprint(loaded.model, layer),
            "layer": int(layer), "hook": f"blocks.{int(layer) - 1}.hook_resid_post",
            "d_in": int(loaded.preset.d_model), "token_types": list(token_types),
            "normalization": "none"}


def sae_record(cfg: Mapping[str, Any], info: Mapping[str, Any]) -> dict[str, Any]:
    """The record of an SAE folder: saekit.json's own, or what an older saekit.json and
    cfg.json say (fields neither says are None and not compared)."""
    if isinstance(info.get(COMPAT_KEY), dict):
        return dict(info[COMPAT_KEY])
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    model = info.get("model") if isinstance(info.get("model"), dict) else {}
    layer_info = info.get("layer") if isinstance(info.get("layer"), dict) else {}
    layer = layer_info.get("hf_hidden_states_index", meta.get("hf_hidden_states_index"))
    hook = layer_info.get("transformer_lens_hook", meta.get("hook_name"))
    types = info.get("token_types", meta.get("saekit_token_types"))
    return {"model": model.get("name", meta.get("saekit_model_preset")), "fingerprint": None,
            "layer": layer, "hook": hook, "d_in": cfg.get("d_in"),
            "token_types": list(types) if isinstance(types, (list, tuple)) else None,
            "normalization": cfg.get("normalize_activations", "none")}


def describe(record: Mapping[str, Any]) -> str:
    """'tiny-llava layer 2, d_in 128' (what a message shows of a piece)."""
    return f"{record.get('model') or '?'} layer {record.get('layer', '?')}, d_in {record.get('d_in', '?')}"


def differences(have: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    """'field a vs b' for each compared field both records know and that differs."""
    both_layers = have.get("layer") is not None and given.get("layer") is not None
    return [f"{field} {have[field]} vs {given[field]}" for field in COMPARED
            if have.get(field) is not None and given.get(field) is not None
            and not (field == "hook" and both_layers)  # the same fact as the layer
            and not _same(field, have[field], given[field])]


def _same(field: str, a: Any, b: Any) -> bool:
    if field == "fingerprint" and str(a).split(":")[0] != str(b).split(":")[0]:
        return True  # fp16 and bf16 digests cannot be compared (see `_sample`)
    return a == b


def check_compatible(have: Mapping[str, Any], have_name: str, given: Mapping[str, Any],
                     given_name: str, *, allow_mismatch: bool = False,
                     flag: str = OVERRIDE_FLAG, advice: str | None = None) -> list[str]:
    """Refuse, in one line naming both pieces, a `given` record that does not fit `have`.

    With `allow_mismatch` the differences are logged as a warning and returned instead.
    `advice` replaces the message's default ending (use matching pieces or pass `flag`).
    """
    diffs = differences(have, given)
    if diffs and not allow_mismatch:
        advice = advice or (f"use pieces made from the same model and layer, or pass {flag} "
                            "to mix them knowingly")
        raise UserError(f"{have_name} ({describe(have)}) does not fit {given_name} "
                        f"({describe(given)}): {'; '.join(diffs)}; {advice}")
    if diffs:
        log.warning("%s does not fit %s (%s); going on because of %s", have_name, given_name,
                    "; ".join(diffs), flag)
    return diffs


def check_token_types(trained: Iterable[str] | None, used: Iterable[str], sae_name: str, *,
                      allow_mismatch: bool = False, flag: str = OVERRIDE_FLAG) -> None:
    """Refuse feeding an SAE token types it was not trained on (unknown `trained`: no check)."""
    if trained is None:
        return
    extra = [t for t in used if t not in set(trained)]
    if extra and not allow_mismatch:
        raise UserError(f"{sae_name} was trained on token types {', '.join(trained)}, not "
                        f"{', '.join(extra)}; choose --token-types among those, or pass {flag}")
    if extra:
        log.warning("%s was not trained on token types %s; going on because of %s",
                    sae_name, ", ".join(extra), flag)
