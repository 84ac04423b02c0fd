"""Surgery on `segcompass.model.HeadInputs`: take, permute and recombine samples; edit code entries.

The SAE tokens of a HeadInputs are stored sample by sample (`segcompass.policy.slot_inputs`
flattens in (sample, position) order), so sample b owns the contiguous CSR rows
`ranges[b, 0]:ranges[b, 1]` and its `slot_rows` / `image_rows` point into them (-1: none).
Every helper keeps that layout, so its output can go straight to `SegCompass.run_head`.

Fields come in two groups that must travel together:
    code fields    codes, token_sample_index, slot_rows, image_rows (rows index the codes)
    dense fields   slot_embeddings e_k, image_embeddings (SAM), policy_image
`take_samples(inputs, index, codes_from=donors)` builds a batch whose sample i has the dense
fields of `index[i]` and the code fields of `donors[i]`: "codes shuffled across samples" and
the conflict test's "A's pass with B's codes" are both that one call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from saekit.sparse import SparseCodes
from segcompass.model import HeadInputs


def num_samples(inputs: HeadInputs) -> int:
    return int(inputs.image_embeddings.shape[0])


def sample_ranges(inputs: HeadInputs) -> Tensor:
    """(B, 2) int64 [start, stop) CSR rows of each sample's SAE tokens."""
    index = inputs.token_sample_index
    if len(index) > 1 and bool((index.diff() < 0).any()):
        raise ValueError("HeadInputs: SAE tokens must be ordered sample by sample")
    counts = torch.bincount(index, minlength=num_samples(inputs))  # (B,)
    stops = counts.cumsum(0)
    return torch.stack([stops - counts, stops], dim=1)


def select_entries(codes: SparseCodes, keep: Tensor) -> SparseCodes:
    """Codes with only the stored entries where `keep` (nnz,) is True; every row stays in place."""
    counts = torch.bincount(codes.row_ids()[keep], minlength=codes.n_tokens)  # (n_tokens,)
    offsets = torch.zeros_like(codes.offsets)
    offsets[1:] = counts.cumsum(0)
    return SparseCodes(codes.indices[keep], codes.values[keep], offsets, codes.d_sae)


def empty_codes(codes: SparseCodes) -> SparseCodes:
    """The same rows with no atom at all (every SAE code removed)."""
    return select_entries(codes, torch.zeros_like(codes.indices, dtype=torch.bool))


def take_rows(codes: SparseCodes, rows: Tensor) -> SparseCodes:
    """CSR rows `rows` (R,) of `codes`, in that order, as codes of their own (R rows)."""
    offsets = codes.offsets.to(rows.device)
    counts = (offsets[1:] - offsets[:-1])[rows]  # (R,) entries per taken row
    new_offsets = torch.zeros(len(rows) + 1, dtype=torch.int64, device=rows.device)
    new_offsets[1:] = counts.cumsum(0)
    # entry e of taken row i sits at offsets[rows[i]] + (e - new_offsets[i])
    shift = torch.repeat_interleave(offsets[rows] - new_offsets[:-1], counts)
    entries = shift + torch.arange(int(new_offsets[-1]), device=rows.device)  # (nnz',)
    entries = entries.to(codes.indices.device)
    return SparseCodes(codes.indices[entries], codes.values[entries], new_offsets.to(codes.offsets.device),
                       codes.d_sae)


def _remap_rows(rows: Tensor, old_start: Tensor, new_start: Tensor) -> Tensor:
    """(B', n) global rows of donor samples -> rows in the new layout; -1 stays -1."""
    moved = rows - old_start[:, None] + new_start[:, None]
    return torch.where(rows >= 0, moved, torch.full_like(rows, -1))


def _code_fields(inputs: HeadInputs, donors: Tensor) -> tuple[SparseCodes, Tensor, Tensor, Tensor]:
    """(codes, token_sample_index, slot_rows, image_rows) of samples `donors` (B',), in that order."""
    ranges = sample_ranges(inputs).cpu()[donors]  # (B', 2), index arithmetic on the CPU
    lengths = ranges[:, 1] - ranges[:, 0]  # (B',)
    new_start = lengths.cumsum(0) - lengths
    total = int(lengths.sum())
    rows = torch.repeat_interleave(ranges[:, 0] - new_start, lengths) + torch.arange(total)  # (N',)
    device = inputs.token_sample_index.device
    codes = take_rows(inputs.codes, rows.to(inputs.codes.offsets.device))
    sample_index = torch.repeat_interleave(torch.arange(len(donors)), lengths).to(device)
    donors_d, start_d, new_d = donors.to(device), ranges[:, 0].to(device), new_start.to(device)
    slot_rows = _remap_rows(inputs.slot_rows[donors_d], start_d, new_d)
    image_rows = _remap_rows(inputs.image_rows[donors_d], start_d, new_d)
    return codes, sample_index, slot_rows, image_rows


def take_samples(inputs: HeadInputs, index: Sequence[int] | Tensor,
                 codes_from: Sequence[int] | Tensor | None = None) -> HeadInputs:
    """A batch whose sample i is `inputs`' sample index[i]; with `codes_from`, its code fields
    (codes, token_sample_index, slot_rows, image_rows) come from sample codes_from[i] instead.
    Repeats are allowed (a sample may appear twice)."""
    index = torch.as_tensor(index, dtype=torch.int64).cpu().reshape(-1)
    donors = index if codes_from is None else torch.as_tensor(codes_from, dtype=torch.int64).cpu().reshape(-1)
    if len(donors) != len(index):
        raise ValueError(f"take_samples: {len(index)} samples but {len(donors)} code donors")
    codes, sample_index, slot_rows, image_rows = _code_fields(inputs, donors)
    dense = index.to(inputs.slot_embeddings.device)
    policy_image = None if inputs.policy_image is None else inputs.policy_image[dense]
    return HeadInputs(codes, sample_index, inputs.slot_embeddings[dense], inputs.image_embeddings[dense],
                      policy_image, slot_rows, image_rows)


def permute_samples(inputs: HeadInputs, order: Sequence[int] | Tensor) -> HeadInputs:
    """Sample b of the result is sample order[b] of `inputs` (all fields); `order` a permutation."""
    order = torch.as_tensor(order, dtype=torch.int64).reshape(-1)
    if sorted(order.tolist()) != list(range(num_samples(inputs))):
        raise ValueError(f"permute_samples: {order.tolist()} is not a permutation of {num_samples(inputs)} samples")
    return take_samples(inputs, order)


def with_codes_from(inputs: HeadInputs, donor: HeadInputs) -> HeadInputs:
    """`inputs` with the code fields of `donor` (same number of samples): everything the head reads
    from the SAE comes from the donor's pass, everything else from `inputs`' pass."""
    if num_samples(donor) != num_samples(inputs):
        raise ValueError(f"with_codes_from: {num_samples(inputs)} samples but the donor has {num_samples(donor)}")
    return inputs._replace(codes=donor.codes, token_sample_index=donor.token_sample_index,
                           slot_rows=donor.slot_rows, image_rows=donor.image_rows)


def concat_inputs(parts: Sequence[HeadInputs]) -> HeadInputs:
    """The samples of several HeadInputs, one batch after the other (rows and samples offset)."""
    if not parts:
        raise ValueError("concat_inputs: nothing to concatenate")
    row_base = _starts([p.codes.n_tokens for p in parts])
    sample_base = _starts([num_samples(p) for p in parts])
    entry_base = _starts([int(p.codes.offsets[-1]) for p in parts])
    offsets = torch.cat([parts[0].codes.offsets[:1]] + [p.codes.offsets[1:] + e for p, e in zip(parts, entry_base)])
    codes = SparseCodes(torch.cat([p.codes.indices for p in parts]), torch.cat([p.codes.values for p in parts]),
                        offsets, parts[0].codes.d_sae)

    def rows(field: Tensor, base: int) -> Tensor:
        return torch.where(field >= 0, field + base, torch.full_like(field, -1))

    images = [p.policy_image for p in parts]
    return HeadInputs(
        codes, torch.cat([p.token_sample_index + s for p, s in zip(parts, sample_base)]),
        torch.cat([p.slot_embeddings for p in parts]), torch.cat([p.image_embeddings for p in parts]),
        None if any(i is None for i in images) else torch.cat(images),
        torch.cat([rows(p.slot_rows, r) for p, r in zip(parts, row_base)]),
        torch.cat([rows(p.image_rows, r) for p, r in zip(parts, row_base)]))


def _starts(sizes: Sequence[int]) -> list[int]:
    """First index of each part when parts of `sizes` are laid end to end."""
    out = [0]
    for size in sizes[:-1]:
        out.append(out[-1] + size)
    return out


def inputs_to(inputs: HeadInputs, device: str | torch.device) -> HeadInputs:
    """Every tensor of `inputs` on `device` (codes detached)."""
    c = inputs.codes
    codes = SparseCodes(c.indices.to(device), c.values.detach().to(device), c.offsets.to(device), c.d_sae)
    move = (lambda t: None if t is None else t.detach().to(device))
    return HeadInputs(codes, move(inputs.token_sample_index), move(inputs.slot_embeddings),
                      move(inputs.image_embeddings), move(inputs.policy_image), move(inputs.slot_rows),
                      move(inputs.image_rows))


def replace_in_rows(codes: SparseCodes, rows: Tensor, remove: Tensor, add: Tensor, add_values: Tensor
                    ) -> SparseCodes:
    """Codes where, in each row of `rows` (R,), the atoms `remove` and `add` are dropped and the atoms
    `add` (A,) are written with activations `add_values` (A,); other rows are untouched."""
    device = codes.indices.device
    rows, remove, add = (t.to(device).long().reshape(-1) for t in (rows, remove, add))
    row_ids = codes.row_ids()
    edited_row = torch.isin(row_ids, rows)
    keep = ~(edited_row & torch.isin(codes.indices, torch.cat([remove, add])))
    new_rows = rows.repeat_interleave(len(add))  # (R*A,)
    new_atoms = add.repeat(len(rows))
    new_values = add_values.to(codes.values).reshape(-1).repeat(len(rows))
    all_rows = torch.cat([row_ids[keep], new_rows])
    all_atoms = torch.cat([codes.indices[keep], new_atoms])
    order = torch.argsort(all_rows * codes.d_sae + all_atoms)  # CSR: rows, then atoms ascending
    counts = torch.bincount(all_rows, minlength=codes.n_tokens)
    offsets = torch.zeros_like(codes.offsets)
    offsets[1:] = counts.cumsum(0)
    return SparseCodes(all_atoms[order], torch.cat([codes.values[keep], new_values])[order], offsets, codes.d_sae)
