"""LoRA adapters (peft) on the policy blocks above the SAE layer.

`add_lora(policy, sae_layer, rank)` injects rank-r adapters (alpha = 2r, no dropout) into
every linear layer of decoder blocks L+1..n (the blocks `freeze_policy_up_to` leaves
trainable), in place: module paths, hooks and `SegCompass.policy` stay as they were, and
every base weight is frozen, so the only trainable policy parameters are the adapters.
Blocks 1..L, whose output the frozen SAE reads, get none.

In a checkpoint folder the policy is saved as its untouched base (`policy/`, written with
the adapters lifted out by `base_layers`) plus the adapter in peft's own folder format
(`lora/adapter_config.json` + `lora/adapter_model.safetensors`, keys prefixed
`base_model.model.` as `PeftModel.save_pretrained` writes them), so
`PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained("policy"), "lora")`
reads it too. `merge_lora` folds the adapters into the base weights (a plain policy again).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from saekit.errors import UserError

LORA_DIR = "lora"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"
_PEFT_PREFIX = "base_model.model."


def lora_targets(policy: nn.Module, sae_layer: int) -> list[str]:
    """Full module names of the linear layers in decoder blocks sae_layer+1 .. n (1-based)."""
    from saekit.capture import decoder_layers

    blocks = list(decoder_layers(policy))
    path_of = {id(module): name for name, module in policy.named_modules()}
    names = []
    for block in blocks[sae_layer:]:
        prefix = path_of[id(block)]
        names += [f"{prefix}.{name}" for name, module in block.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise UserError(f"--lora-rank: no linear layer above the SAE layer {sae_layer} "
                        f"({len(blocks)} blocks): nothing to adapt")
    return names


def lora_config(policy: nn.Module, sae_layer: int, rank: int):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias="none",
                      target_modules=lora_targets(policy, sae_layer))


def add_lora(policy: nn.Module, sae_layer: int, rank: int) -> nn.Module:
    """Inject rank-`rank` adapters above layer `sae_layer` into `policy`, in place; base frozen."""
    from peft import inject_adapter_in_model

    if rank < 1:
        raise UserError(f"--lora-rank must be >= 1 to add adapters, got {rank}")
    inject_adapter_in_model(lora_config(policy, sae_layer, rank), policy, adapter_name=ADAPTER_NAME)
    for name, param in policy.named_parameters():  # peft freezes the rest; say it where it matters
        param.requires_grad_("lora_" in name)
    return policy


def lora_layers(policy: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, peft LoRA layer) of every adapted module."""
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in policy.named_modules() if isinstance(m, LoraLayer)]


def has_lora(policy: nn.Module) -> bool:
    return bool(lora_layers(policy))


def _swap(policy: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(policy.get_submodule(parent) if parent else policy, child, module)


@contextmanager
def base_layers(policy: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every adapted module is its base layer again (to save the base
    policy with `save_pretrained`); the adapters go back in `finally`."""
    layers = lora_layers(policy)
    for name, layer in layers:
        _swap(policy, name, layer.get_base_layer())
    try:
        yield policy
    finally:
        for name, layer in layers:
            _swap(policy, name, layer)


def adapter_state(policy: nn.Module) -> dict[str, Tensor]:
    """The adapter weights, keyed as `PeftModel.save_pretrained` keys them."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(policy, adapter_name=ADAPTER_NAME)
    return {_PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_lora(policy: nn.Module, directory: str | Path) -> Path:
    """`directory/adapter_config.json` + `adapter_model.safetensors` (peft's folder format)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    policy.peft_config[ADAPTER_NAME].save_pretrained(str(directory))
    save_file(adapter_state(policy), str(directory / ADAPTER_WEIGHTS))
    return directory


def load_adapter_state(policy: nn.Module, state: dict[str, Tensor], where: str) -> None:
    """Copy adapter weights (keyed as `adapter_state` keys them) into `policy`'s injected
    adapters; a UserError naming `where` unless the keys match exactly."""
    from peft import set_peft_model_state_dict

    if set(state) != set(adapter_state(policy)):
        raise UserError(f"{where}: LoRA adapter weights do not match the policy's adapters "
                        f"(rank or adapted layers differ)")
    set_peft_model_state_dict(policy, {k.removeprefix(_PEFT_PREFIX): v for k, v in state.items()},
                              adapter_name=ADAPTER_NAME)


def load_lora_weights(policy: nn.Module, directory: str | Path) -> None:
    """Copy a saved adapter folder into `policy`'s (already injected) adapters."""
    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise UserError(f"{path}: LoRA adapter weights not found (the checkpoint was written with --lora-rank)")
    load_adapter_state(policy, load_file(str(path)), str(path))


@torch.no_grad()
def merge_lora(policy: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and remove the adapters (in place)."""
    for name, layer in lora_layers(policy):
        layer.merge(adapter_names=[ADAPTER_NAME])
        _swap(policy, name, layer.get_base_layer())
    if hasattr(policy, "peft_config"):
        del policy.peft_config
    return policy
