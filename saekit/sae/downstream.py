"""Downstream cost of an SAE: the model's next-token loss with the SAE's reconstruction
spliced into layer L, against the clean model and the layer zero- or mean-ablated.

For a set of spliced positions S (the tokens of one type, or all the SAE's types) the
output of decoder block L is replaced at S by x̂ = SAE(x) ("sae"), by 0 ("zero") or by the
mean activation of the evaluated S-positions ("mean"), and the model runs on:

    loss recovered (vs zero) = (CE_zero − CE_sae) / (CE_zero − CE_clean)
    loss recovered (vs mean) = (CE_mean − CE_sae) / (CE_mean − CE_clean)

CE is the mean next-token cross-entropy over the predicted tokens whose type is in
`loss_on` (by default the text a VLM is trained to predict: prompt and response).
With S = every position and `loss_on` every type, the terms are sae-lens's
`get_recons_loss` (`ce_loss_without_sae`, `ce_loss_with_sae`, `ce_loss_with_ablation`;
its `ce_loss_score` is the zero-ablation loss recovered); the tests hold them to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from saekit.capture import _to_model, decoder_layers
from saekit.inputs import PAD_TYPE, TOKEN_TYPE_NAMES, ModelBatch, token_type_codes
from saekit.models import LoadedModel
from saekit.sae.model import SparseAutoencoder

Splice = Callable[[Tensor], Tensor]
"""(B, T, d) block output -> its replacement (the same shape)."""
KINDS = ("clean", "sae", "zero", "mean")


def next_token_losses(model: torch.nn.Module, batch: ModelBatch, layer: int,
                      splice: Splice | None = None) -> tuple[Tensor, Tensor]:
    """(logits (B, T, V), CE (B, T−1)) of one forward pass, block `layer`'s output (layer L
    = HF hidden_states[L]) replaced by `splice(output)`; CE[b, t] predicts token t+1.
    The hook is removed in `finally`."""
    block = decoder_layers(model)[layer - 1]

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (splice(output[0]),) + tuple(output[1:])
        return splice(output)

    handle = block.register_forward_hook(hook) if splice is not None else None
    try:
        with torch.no_grad():
            logits = model(**_to_model(model, batch.model_inputs), use_cache=False).logits.float()
    finally:
        if handle is not None:
            handle.remove()
    ids = batch.model_inputs["input_ids"].to(logits.device)
    log_probs = logits[:, :-1].log_softmax(dim=-1)  # (B, T-1, V)
    ce = -log_probs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return logits, ce


def sae_splice(sae: SparseAutoencoder, where: Tensor) -> Splice:
    """Replace the positions `where` ((B, T) bool) by the SAE's reconstruction."""
    def splice(hidden: Tensor) -> Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1]).to(sae.W_enc.dtype)  # (B, T, d) -> (BT, d)
        x_hat = sae(flat).to(hidden.dtype).reshape(hidden.shape)  # (BT, d) -> (B, T, d)
        return torch.where(where.to(hidden.device).unsqueeze(-1), x_hat, hidden)
    return splice


def constant_splice(value: Tensor, where: Tensor) -> Splice:
    """Replace the positions `where` by `value` ((d,): 0 or a mean)."""
    def splice(hidden: Tensor) -> Tensor:
        fill = value.to(hidden.device, hidden.dtype).expand_as(hidden)
        return torch.where(where.to(hidden.device).unsqueeze(-1), fill, hidden)
    return splice


class _Sums:
    """CE sums and counts of one split and one intervention kind."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def add(self, ce: Tensor, mask: Tensor) -> None:
        self.total += ce[mask].double().sum().item()
        self.count += int(mask.sum())

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None  # None: no token to predict


def _recovered(ablated: float | None, sae: float | None, clean: float | None) -> float | None:
    if ablated is None or sae is None or clean is None:
        return None
    gap = ablated - clean
    return (ablated - sae) / gap if gap != 0 else None  # None: the ablation changes nothing


def downstream_losses(loaded: LoadedModel, sae: SparseAutoencoder, batches: Sequence[ModelBatch],
                      layer: int, *, splits: dict[str, Iterable[str]],
                      loss_on: Iterable[str] = ("prompt", "response"), progress: bool = False
                      ) -> dict[str, Any]:
    """Loss recovered per split ({name: token types spliced}) over `batches`.

    Two passes: the clean forward of every batch (its CE, and the mean activation of each
    split's positions), then per split and batch the sae / zero / mean forwards.
    """
    from tqdm import tqdm

    model = loaded.model
    loss_codes = torch.tensor(token_type_codes(tuple(loss_on)), dtype=torch.int8)
    split_codes = {name: torch.tensor(token_type_codes(tuple(types)), dtype=torch.int8)
                   for name, types in splits.items()}
    sums = {name: {kind: _Sums() for kind in KINDS} for name in splits}
    mean_sum = {name: torch.zeros(sae.d_in, dtype=torch.float64) for name in splits}
    mean_count = {name: 0 for name in splits}
    clean_ce = []
    for batch in tqdm(batches, desc="downstream clean", disable=not progress):
        recorded: dict[str, Tensor] = {}

        def record(hidden: Tensor) -> Tensor:
            recorded["x"] = hidden.detach()
            return hidden

        _, ce = next_token_losses(model, batch, layer, record)
        clean_ce.append(ce)
        for name, codes in split_codes.items():
            where = torch.isin(batch.token_types, codes)  # (B, T)
            mean_sum[name] += recorded["x"][where.to(recorded["x"].device)].double().sum(dim=0).cpu()
            mean_count[name] += int(where.sum())
    means = {name: (mean_sum[name] / max(mean_count[name], 1)).float() for name in splits}
    split_codes = {name: codes for name, codes in split_codes.items() if mean_count[name]}  # data has them
    for name, codes in tqdm(split_codes.items(), desc="downstream splices", disable=not progress):
        for batch, ce_clean in zip(batches, clean_ce):
            where = torch.isin(batch.token_types, codes)  # (B, T) spliced positions
            target = _loss_mask(batch, loss_codes).to(ce_clean.device)  # (B, T-1)
            sums[name]["clean"].add(ce_clean, target)
            for kind, splice in (("sae", sae_splice(sae, where)),
                                 ("zero", constant_splice(torch.zeros(sae.d_in), where)),
                                 ("mean", constant_splice(means[name], where))):
                sums[name][kind].add(next_token_losses(model, batch, layer, splice)[1], target)
    out: dict[str, Any] = {"layer": layer, "loss_on": list(loss_on), "n_samples":
                           sum(int(b.token_types.shape[0]) for b in batches), "splits": {}}
    for name in split_codes:
        ce = {kind: sums[name][kind].mean for kind in KINDS}
        out["splits"][name] = {
            "token_types": list(splits[name]), "spliced_tokens": mean_count[name],
            "loss_tokens": sums[name]["clean"].count, "ce_clean": ce["clean"], "ce_sae": ce["sae"],
            "ce_zero_ablated": ce["zero"], "ce_mean_ablated": ce["mean"],
            "loss_recovered_vs_zero": _recovered(ce["zero"], ce["sae"], ce["clean"]),
            "loss_recovered_vs_mean": _recovered(ce["mean"], ce["sae"], ce["clean"])}
    return out


def _loss_mask(batch: ModelBatch, loss_codes: Tensor) -> Tensor:
    """(B, T−1) bool: CE[b, t] counts when tokens t and t+1 are real and t+1's type is in
    `loss_codes`."""
    types = batch.token_types  # (B, T)
    valid = (types[:, :-1] != PAD_TYPE) & (types[:, 1:] != PAD_TYPE)
    return valid & torch.isin(types[:, 1:], loss_codes)


def default_splits(sae_token_types: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """"all" (the SAE's token types) and one split per type among image, prompt, response."""
    splits = {"all": tuple(sae_token_types)}
    for name in TOKEN_TYPE_NAMES:
        if name in sae_token_types and name != "special":
            splits[name] = (name,)
    return splits
