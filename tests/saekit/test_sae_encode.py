"""Chunked sparse encoding against the dense reference: threshold, top-k, both
architectures, ragged chunks, empty input, and the codes file round trip."""

from __future__ import annotations

import pytest
import torch

from saekit.errors import UserError
from saekit.sae.encode import encode_dense, encode_sparse, load_codes, save_codes
from saekit.sae.model import SparseAutoencoder
from saekit.sparse import SparseCodes

D_IN, D_SAE = 16, 200


def _sae(architecture: str = "standard", k: int | None = None) -> SparseAutoencoder:
    sae = SparseAutoencoder(d_in=D_IN, d_sae=D_SAE, architecture=architecture, k=k)
    sae.init_weights_(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc.copy_(torch.linspace(-0.3, 0.1, D_SAE))
    return sae


def _acts(n: int) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(n)) * 3


def _assert_same(codes: SparseCodes, dense: torch.Tensor) -> None:
    """Same support exactly; values to float rounding (a 1-row matmul may round differently)."""
    expected = SparseCodes.from_dense(dense)
    assert torch.equal(codes.offsets, expected.offsets)
    assert torch.equal(codes.indices, expected.indices)
    torch.testing.assert_close(codes.values, expected.values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(codes.to_dense(), dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("architecture,k", [("standard", None), ("topk", 12)])
@pytest.mark.parametrize("threshold,top_k", [(0.0, None), (0.4, None), (0.0, 5), (0.3, 7)])
def test_chunked_sparse_encode_equals_dense_reference(architecture, k, threshold, top_k):
    sae, acts = _sae(architecture, k), _acts(103)
    dense = encode_dense(sae, acts, threshold=threshold, top_k=top_k)
    assert (dense > 0).any() and (dense == 0).any()
    if top_k is not None:
        assert ((dense != 0).sum(dim=1) <= top_k).all()
    if threshold > 0:
        assert (dense[dense != 0] > threshold).all()
        with torch.no_grad():
            f = sae.encode(acts)
        assert architecture == "topk" or ((f > 0) & (f <= threshold)).any()  # some were dropped
    for chunk in (1, 10, 64, 1000):  # ragged last chunk, single rows, one chunk
        _assert_same(encode_sparse(sae, acts, threshold=threshold, top_k=top_k, chunk_tokens=chunk), dense)


def test_indices_ascend_within_each_token_under_top_k():
    codes = encode_sparse(_sae(), _acts(30), top_k=6, chunk_tokens=7)
    for t in range(codes.n_tokens):
        row = codes.indices[codes.offsets[t]:codes.offsets[t + 1]]
        assert torch.all(row[1:] > row[:-1])


def test_empty_input_and_bad_arguments():
    codes = encode_sparse(_sae(), torch.zeros(0, D_IN))
    assert codes.n_tokens == 0 and codes.indices.numel() == 0 and codes.offsets.tolist() == [0]
    with pytest.raises(UserError, match="threshold must be >= 0"):
        encode_sparse(_sae(), _acts(3), threshold=-1.0)
    with pytest.raises(UserError, match=f"top_k must be in 1..{D_SAE}"):
        encode_sparse(_sae(), _acts(3), top_k=0)


def test_codes_file_round_trip(tmp_path):
    codes = encode_sparse(_sae(), _acts(25), threshold=0.1)
    types = torch.arange(25, dtype=torch.int8) % 4
    path = save_codes(tmp_path / "codes.safetensors", codes, extra={"token_types": types},
                      metadata={"layer": 2})
    back, extra, header = load_codes(path)
    assert back.d_sae == D_SAE and header["layer"] == "2"
    for a, b in zip(back[:3], codes[:3]):
        assert torch.equal(a, b)
    assert torch.equal(extra["token_types"], types)
    (tmp_path / "other.safetensors").write_bytes(path.read_bytes().replace(b"saekit-sparse-codes", b"something-else-xyz!"))
    with pytest.raises(UserError, match="not a saekit codes file"):
        load_codes(tmp_path / "other.safetensors")
