"""Give a pretrained policy (LLaVA-1.5, Qwen2.5-VL) the template's special tokens.

SegCompass reads its slots at `<REF_POS>` and the template wraps reasoning in `<think>` …
`</think>` (`segcompass.template.SPECIAL_TOKENS`); a hub checkpoint has none of them. This adds
them to the tokenizer as special (never split) tokens, grows the input embeddings and an untied
LM head by one row each, initialised to the mean of the existing rows (a common, neutral start:
every existing token's logits and hidden states stay exactly as they were), and saves the
result as a policy folder that `saekit` and `segcompass train --policy` load. Run it once,
before caching activations for the SAE:

    python -m segcompass.policy_tokens --preset llava-1.5-7b /models/llava-1.5-7b-hf runs/policy
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from saekit.errors import UserError


@torch.no_grad()
def add_template_tokens(loaded) -> list[str]:
    """Add the missing template tokens to `loaded` (a saekit `LoadedModel`) in place; returns them."""
    from segcompass.template import SPECIAL_TOKENS

    tokenizer, model = loaded.tokenizer, loaded.model
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if not missing:
        return []
    old_rows = model.get_input_embeddings().weight.shape[0]
    tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    new_size = max(len(tokenizer), old_rows)
    tied = model.get_output_embeddings() is None or (
        model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr())
    model.resize_token_embeddings(new_size, mean_resizing=False)
    ids = tokenizer.convert_tokens_to_ids(missing)
    matrices = [model.get_input_embeddings().weight] + ([] if tied else [model.get_output_embeddings().weight])
    for weight in matrices:
        weight[ids] = weight[:old_rows].float().mean(0).to(weight.dtype)
    return missing


def prepare_policy(preset: str, source: str | Path, out: str | Path) -> Path:
    """Load `preset` from `source`, add the template tokens, save the policy folder to `out`."""
    from saekit.models import load_model, save_pretrained

    loaded = load_model(preset, source, device="cpu", dtype=None if preset.startswith("tiny") else "bfloat16")
    if not add_template_tokens(loaded):
        raise UserError(f"{source}: the policy already has every template token; use it as it is")
    return save_pretrained(loaded, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segcompass.policy_tokens", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, help="saekit preset (llava-1.5-7b, qwen2.5-vl-7b, ...).")
    parser.add_argument("source", type=Path, help="Folder of the pretrained policy (hub layout).")
    parser.add_argument("out", type=Path, help="Output policy folder.")
    args = parser.parse_args(argv)
    try:
        print(prepare_policy(args.preset, args.source, args.out))
    except UserError as err:
        print(f"error: {err}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
