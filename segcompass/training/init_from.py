"""`--init-from CHECKPOINT`: a training run starts from a trained SegCompass checkpoint's head,
SAM and policy (e.g. a `--mode seg` run's final/), so that GRPO's mask rewards mean something
from its first step.

The run still builds its model from `--policy`, `--sae` and its head flags; the checkpoint must
be of the same make, or it is refused in one line naming the field: the SegCompassConfig fields
that shape the weights (policy preset, SAE layer, SAM preset, trained SAM encoder, LoRA rank),
every field of the resolved HeadConfig (d_sae among them), the frozen layers of the policy up
to the SAE layer (`saekit.compat` record, against `--policy`), and the SAE itself (its weights
file against `--sae`'s, byte for byte: the codebook is indexed by that SAE's atoms).

Then the checkpoint's head (codebook, aggregator, slot mapper), SAM and policy weights replace
the built ones. With LoRA the checkpoint's policy/ is its untouched base, so only its adapters
are loaded. Without, the policy's `_name_or_path` is set to the checkpoint's policy/ so that
TRL builds GRPO's frozen reference policy from it (KL to where the run starts); with LoRA the
reference stays the base.
"""

from __future__ import annotations

import dataclasses
import filecmp
from pathlib import Path

import torch

from saekit.compat import COMPAT_KEY, differences
from saekit.errors import UserError
from saekit.integrity import check_file_sizes, load_safetensors, read_json_object
from saekit.sae.io import SAE_WEIGHTS_FILENAME

CHECKED_CONFIG = ("policy_preset", "sae_layer", "sam_preset", "train_sam_encoder", "lora_rank")
"""SegCompassConfig fields a checkpoint must share with the run (the head's are compared resolved)."""


def check_init_checkpoint(model, directory: Path, sae_path: Path) -> dict:
    """The checkpoint's segcompass.json record, or a one-line UserError naming what differs."""
    from segcompass.build import HeadConfig
    from segcompass.model import CONFIG_FILE, SegCompassConfig, policy_compat

    directory = Path(directory)
    what = f"train: --init-from {directory}"
    fix = "use a checkpoint trained with this run's --policy, --sae and head settings"
    meta = read_json_object(directory / CONFIG_FILE, fields={"config": dict, "head": dict},
                            fix="point --init-from at a folder written by `segcompass train` (e.g. runs/x/final)")
    if isinstance(meta.get("files"), dict):
        check_file_sizes(directory, meta["files"], fix="the checkpoint is damaged: copy it again or retrain")
    try:  # through the dataclasses: fields added since the checkpoint was written take their defaults
        config = dataclasses.asdict(SegCompassConfig(**meta["config"]))
        head = dataclasses.asdict(HeadConfig(**meta["head"]))
    except TypeError as err:
        raise UserError(f"{what}: its 'config' or 'head' has fields this segcompass does not know ({err})") from None
    mine = dataclasses.asdict(model.config)
    for name in CHECKED_CONFIG:
        if config[name] != mine[name]:
            raise UserError(f"{what}: field {name!r} is {config[name]!r} there, {mine[name]!r} in this run; {fix}")
    for name, value in dataclasses.asdict(model.head_cfg).items():
        if head[name] != value:
            raise UserError(f"{what}: head field {name!r} is {head[name]!r} there, {value!r} in this run; {fix}")
    if isinstance(meta.get(COMPAT_KEY), dict):
        diffs = differences(meta[COMPAT_KEY], policy_compat(model.loaded, model.config.sae_layer))
        if diffs:
            raise UserError(f"{what}: its policy's layers up to the SAE's differ from --policy's "
                            f"({'; '.join(diffs)}); {fix}")
    theirs, ours = directory / "sae" / SAE_WEIGHTS_FILENAME, Path(sae_path) / SAE_WEIGHTS_FILENAME
    if not theirs.is_file() or not filecmp.cmp(theirs, ours, shallow=False):
        raise UserError(f"{what}: field 'sae' differs (its sae/ is not the SAE of --sae {sae_path}); {fix}")
    return meta


def init_from_checkpoint(model, directory: Path, sae_path: Path) -> None:
    """Check the checkpoint (`check_init_checkpoint`) and load its head, SAM and policy into `model`."""
    from segcompass.model import _HEAD_OWN_PREFIXES, HEAD_WEIGHTS, _load_sam_folder
    from segcompass.training.common import load_policy_weights

    directory = Path(directory)
    check_init_checkpoint(model, directory, sae_path)
    fix = "the checkpoint is damaged: copy it again or retrain"
    head = {k: v for k, v in load_safetensors(directory / HEAD_WEIGHTS, fix=fix).items()
            if k.startswith(_HEAD_OWN_PREFIXES)}
    missing, unexpected = model.head.load_state_dict(head, strict=False)
    if unexpected or [k for k in missing if k.startswith(_HEAD_OWN_PREFIXES)]:
        raise UserError(f"train: --init-from {directory / HEAD_WEIGHTS}: weights do not match the head "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    device = next(model.sam.parameters()).device
    sam = _load_sam_folder(directory / "sam", device)
    with torch.no_grad():
        model.sam.load_state_dict(sam.state_dict(), strict=True)
    del sam
    if model.config.lora_rank:
        from segcompass import lora

        lora.load_lora_weights(model.policy, directory / lora.LORA_DIR)
        return
    load_policy_weights(model.policy, directory / "policy")
    model.policy.config._name_or_path = str((directory / "policy").resolve())  # TRL's reference policy
