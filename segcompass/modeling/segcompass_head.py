"""SegCompass head: sparse SAE codes + slot embeddings + image embedding -> heatmaps, masks.

    codes --QueryCodebook--> codebook tokens --ConceptAggregator--> r_k
    [e_k ; r_k] + image keys --SlotMapper--> heatmap logits H_k, confidences c_k
    H_k as dense mask prompt + image embedding --SlotMaskDecoder--> mask logits

Provenance is returned as data: for every surviving (token, atom, h) pair of the batch, the
weight it carries into each slot, `slot_attention[b, k, l] * pair_share`, where l is the
codebook token the pair fed and pair_share its magnitude share within that codebook token
(see `query_codebook`). In per_atom mode the share is 1 and the weight is the attention
itself. Summing a slot's pair weights by atom gives "which atoms fed which slot with what
weight"; the pairs' token ids say where (image patch, CoT word) each atom fired.

Two routings. The paper's (`key_codebook=None`): Q_k = MLP([e_k ; r_k]) with e_k the raw
last-layer state of the k-th concentration token, and (world presets) the raw layer-L image
states added to the keys. Both read the policy in full, so the slot mapper can ground the
target without any atom. The concept routing (`key_codebook` given) lets nothing
instance-specific reach the slot mapper or the confidence head except through thresholded
SAE atoms and SAM's image embedding:
    u_k   = sum_j h_j C[j] over the atoms of concentration token k       (its code, read by C)
    Q_k   = MLP([u_k ; r_k])
    keys  = W^K SAM(image) + resize(W^P LN(sum_j h_j C_key[j] over each image token's atoms))
so removing the codes removes everything the head knows about which object is meant. The
atoms of concentration token k also feed slot k directly; provenance adds that path to the
pair weights (each pair's share within its token).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from saekit.sparse import SparseCodes
from segcompass.modeling.concept_aggregator import ConceptAggregator
from segcompass.modeling.mask_decoder import SlotMaskDecoder
from segcompass.modeling.query_codebook import QueryCodebook
from segcompass.modeling.slot_mapper import SlotMapper


class SlotAtoms(NamedTuple):
    """One slot's atoms, heaviest first."""

    atoms: Tensor
    """(k,) int64 atom indices j."""
    weights: Tensor
    """(k,) float summed pair weights of each atom into the slot."""
    token_ids: list[Tensor]
    """k tensors: global token indices at which each atom fired (|h| >= threshold)."""
    values: list[Tensor]
    """k tensors: h_j at those tokens."""


class Provenance(NamedTuple):
    """Which SAE atoms, from which tokens, fed which slot with what weight (all detached)."""

    slot_attention: Tensor
    """(B, K_s, L) last aggregator block's slot -> codebook-token attention, mean over heads."""
    source_token: Tensor
    """(B, L) int64 global token index of each codebook token; -1 at padding."""
    pair_sample: Tensor
    """(P,) int64 sample of each surviving (token, atom) pair."""
    pair_token: Tensor
    """(P,) int64 global token index (CSR row) of each pair."""
    pair_atom: Tensor
    """(P,) int64 atom index j of each pair."""
    pair_value: Tensor
    """(P,) float activation h_j of each pair."""
    pair_slot_weight: Tensor
    """(P, K_s) weight of each pair into each slot: attention to its codebook token x share."""

    def top_atoms(self, sample: int, slot: int, k: int = 10) -> SlotAtoms:
        """The `k` atoms with the largest summed weight into `slot` of `sample`."""
        in_sample = self.pair_sample == sample
        atoms, weights = self.pair_atom[in_sample], self.pair_slot_weight[in_sample, slot]
        tokens, values = self.pair_token[in_sample], self.pair_value[in_sample]
        unique, inverse = torch.unique(atoms, return_inverse=True)
        summed = weights.new_zeros(len(unique)).index_add_(0, inverse, weights)
        top = summed.argsort(descending=True)[:k]
        return SlotAtoms(atoms=unique[top], weights=summed[top],
                         token_ids=[tokens[inverse == i] for i in top.tolist()],
                         values=[values[inverse == i] for i in top.tolist()])


class HeadOutput(NamedTuple):
    heatmap_logits: Tensor
    """(B, K_s, 4h, 4w) slot heatmap logits H_k at SAM's mask-prompt resolution."""
    confidence_logits: Tensor
    """(B, K_s) slot confidence logits c_k."""
    mask_logits: Tensor
    """(B, K_s, 4h, 4w) mask logits, one per slot, in the padded square SAM input frame."""
    iou_pred: Tensor
    """(B, K_s) SAM's IoU prediction per mask."""
    provenance: Provenance
    """Atoms -> slots, with weights and token ids (see `Provenance`)."""


class SegCompassHead(nn.Module):
    def __init__(self, *, codebook: QueryCodebook, aggregator: ConceptAggregator,
                 slot_mapper: SlotMapper, mask_decoder: SlotMaskDecoder, key_codebook: QueryCodebook | None = None):
        super().__init__()
        self.codebook = codebook
        self.aggregator = aggregator
        self.slot_mapper = slot_mapper
        self.mask_decoder = mask_decoder
        self.key_codebook = key_codebook  # given: concept routing (module docstring)

    @property
    def concept_routed(self) -> bool:
        return self.key_codebook is not None

    @property
    def num_slots(self) -> int:
        return self.aggregator.num_slots

    def forward(self, codes: SparseCodes, token_sample_index: Tensor, slot_embeddings: Tensor | None,
                image_embeddings: Tensor, policy_image: Tensor | None = None, *,
                slot_rows: Tensor | None = None, image_rows: Tensor | None = None) -> HeadOutput:
        """codes over all tokens of B samples, token_sample_index (n_tokens,) in [0, B),
        image_embeddings (B, C, h, w). Paper routing: slot_embeddings e (B, K_s, d_llm) and
        policy_image (B, g*g, d_llm) the policy's image tokens (read only if the slot mapper
        keys on them). Concept routing: slot_rows (B, K_s) and image_rows (B, g*g), the code
        rows of each slot's concentration token and of each image token (-1: none)."""
        batch = image_embeddings.shape[0]
        cb = self.codebook(codes, token_sample_index, batch)
        agg = self.aggregator(cb.tokens, cb.padding_mask)
        if self.concept_routed:
            if slot_rows is None or image_rows is None:
                raise ValueError("a concept-routed head needs slot_rows and image_rows")
            queries = _rows(self.codebook.token_vectors(codes), slot_rows)  # (B, K_s, d_c)
            keys = _rows(self.key_codebook.token_vectors(codes), image_rows)  # (B, g*g, d_c)
        else:
            queries, keys = slot_embeddings, policy_image
        if queries.shape[:2] != (batch, self.num_slots):
            raise ValueError(f"got slot inputs {tuple(queries.shape[:2])}, expected ({batch}, {self.num_slots})")
        mapped = self.slot_mapper(queries, agg.concepts, image_embeddings, keys)
        decoded = self.mask_decoder(mapped.heatmap_logits, image_embeddings)
        provenance = self._provenance(cb, agg.slot_attention, slot_rows if self.concept_routed else None)
        return HeadOutput(heatmap_logits=mapped.heatmap_logits,
                          confidence_logits=mapped.confidence_logits,
                          mask_logits=decoded.mask_logits, iou_pred=decoded.iou_pred,
                          provenance=provenance)

    def _provenance(self, cb, slot_attention: Tensor, slot_rows: Tensor | None) -> Provenance:
        """Pair weights into slots: attention x share, plus the direct path of concentration tokens."""
        batch, slots, length = slot_attention.shape
        # (B, K, L) -> (B*L, K): each pair reads its codebook token's column.
        flat_attention = slot_attention.permute(0, 2, 1).reshape(batch * length, slots)
        pair_weight = flat_attention[cb.pair_position] * cb.pair_share[:, None].to(flat_attention.dtype)
        pair_sample = torch.div(cb.pair_position, max(length, 1), rounding_mode="floor")
        if slot_rows is not None and len(cb.pair_token):
            # pair p feeds slot k directly when its token is slot k's concentration token
            direct = cb.pair_token[:, None] == slot_rows[pair_sample]  # (P, K)
            pair_weight = pair_weight + direct.to(pair_weight.dtype) * self._token_share(cb)[:, None]
        return Provenance(slot_attention=slot_attention, source_token=cb.source_token, pair_sample=pair_sample,
                          pair_token=cb.pair_token, pair_atom=cb.pair_atom, pair_value=cb.pair_value,
                          pair_slot_weight=pair_weight)

    def _token_share(self, cb) -> Tensor:
        """(P,) each pair's share within its LLM token (equals pair_share in per_token mode)."""
        if self.codebook.mode == "per_token":
            return cb.pair_share
        norm = torch.linalg.vector_norm(self.codebook.weight.detach(), dim=1)[cb.pair_atom]
        magnitude = cb.pair_value.abs() * norm
        _, inverse = torch.unique(cb.pair_token, return_inverse=True)
        total = magnitude.new_zeros(int(inverse.max()) + 1).index_add_(0, inverse, magnitude)
        return magnitude / total[inverse].clamp_min(torch.finfo(magnitude.dtype).tiny)


def _rows(vectors: Tensor, rows: Tensor) -> Tensor:
    """(N, d) per-token vectors at (B, n) rows -> (B, n, d); zeros where a row is -1."""
    picked = vectors[rows.clamp(min=0)]  # (B, n, d)
    return picked * (rows >= 0)[..., None].to(picked.dtype)
