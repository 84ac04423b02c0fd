"""The TopK family's training step on a sparse decoder path: TopK, BatchTopK and
Matryoshka-BatchTopK, each with the AuxK dead-latent loss.

Only the encoder's forward matmul touches all d_sae latents. Everything after the
selection works on its k·n entries, held as CSR matrices (n × d_sae):

    pre  = x W_enc + b_enc                            (n, d_sae), one preallocated buffer
    S    = the selected entries, values v = ReLU(pre) there:
           topk: each row's top k;  batchtopk, matryoshka: the batch's top k·n (sae-lens's
           BatchTopK); entries with v = 0 are dropped (they decode to nothing)
    x̂_l  = b_dec + Σ_{l' ≤ l} S_l' W_dec[l']          Matryoshka level l = latents
                                                      [w_{l-1}, w_l); one level otherwise
    ê    = S_aux W_dec                                AuxK: the top-k_aux ReLU(pre) of
                                                      the dead latents per row
    L    = Σ_l (1/n) Σ_b ‖x̂_l − x‖²  +  c·min(n_dead/aux_k, 1)·(1/n) Σ_b ‖ê − (x − x̂_L)‖²

(the Matryoshka sum is sae-lens's MatryoshkaBatchTopKTrainingSAE loss: the outer level's
MSE plus each inner level's; the residual of the AuxK term is a constant). The backward
is written out: with g_l = ∂L/∂x̂_l and G_l = Σ_{l' ≥ l} g_l' (a level-l latent feeds every
reconstruction from level l on),

    ∂L/∂v_e     = ⟨G_lev(e)[row e], W_dec[col e]⟩     sampled dense-dense product on S
    ∂L/∂W_dec_l = S_{v,l}ᵀ G_l  (+ S_auxᵀ g_aux)      sparse (d_l × n) @ dense (n × d_in)
    ∂L/∂W_enc   = (S_gᵀ x)ᵀ,  ∂L/∂b_enc = Σ_rows S_g  S_g: ∂L/∂pre on S ∪ S_aux
    ∂L/∂b_dec   = Σ_l Σ_rows g_l

so the decoder and its gradient touch only the selected rows of W_dec, and the two
(n × d_sae) @ (d_sae × d_in) matmuls and the (d_in × n) @ (n × d_sae) one of a dense step
become sparse products with k·n entries. `dense_reference_loss` is the same loss through
autograd on dense (n × d_sae) latents; `tests/saekit/test_sae_sparse_step.py` holds the two
to each other (values and gradients).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from saekit.sae.losses import StepStats, _fvu
from saekit.sae.model import SparseAutoencoder

Selection = Literal["topk", "batchtopk"]


class Entries(NamedTuple):
    """Selected latents of a batch, row-major (rows ascending, cols ascending within a row)."""

    rows: Tensor
    """(nnz,) int64 batch row of each entry."""
    cols: Tensor
    """(nnz,) int64 latent of each entry."""
    values: Tensor
    """(nnz,) its activation, > 0."""


@contextlib.contextmanager
def one_thread(device: torch.device) -> Iterator[None]:
    """Run the sparse bookkeeping on one CPU thread. It is many small ops (sorts, gathers,
    CSR products over k·n entries), whose OpenMP regions cost more than they save on a few
    cores, and far more when another process shares them: an argsort of 131k entries took
    14 ms on one thread and 320 ms on two with two other jobs on the 2 cores; a whole
    BatchTopK step went from 4.4 s to 2.5 s. The encoder matmul keeps every thread."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _row_entries(values: Tensor, cols: Tensor) -> Entries:
    """Entries of a per-row selection ((n, m) values and latents), ReLU'd, zeros dropped."""
    cols, order = cols.sort(dim=-1)
    values = values.gather(-1, order).relu()  # (n, m)
    rows = torch.arange(values.shape[0], device=values.device).unsqueeze(1).expand_as(cols)
    keep = values > 0
    if bool(keep.all()):
        return Entries(rows.reshape(-1), cols.reshape(-1), values.reshape(-1))
    return Entries(rows[keep], cols[keep], values[keep])


def select_topk(pre: Tensor, k: int) -> Entries:
    """Each row's top-k pre-activations, ReLU'd (sae-lens's TopK activation)."""
    values, cols = pre.topk(k, dim=-1, sorted=False)  # (n, k)
    return _row_entries(values, cols)


def select_batchtopk(pre: Tensor, k: float, guess: float | None = None) -> Entries:
    """The batch's top int(k·n) ReLU'd pre-activations (sae-lens's BatchTopK), exactly.

    A top-k over all n·d_sae values costs several encoder matmuls on a CPU, so the
    selection first narrows the candidates to the values above a cut that keeps at least
    int(k·n) of them: `guess` (the previous step's cut, lowered a little) when it does,
    else the int(k·n)-th largest of the rows' own top-⌈k⌉ values (a lower bound on the
    batch's cut). The result does not depend on `guess`.
    """
    n, width = pre.shape
    total = min(int(k * n), n * width)
    flat = pre.reshape(-1)  # (n·d_sae,) row-major: flat index = row·d_sae + col
    candidates = None
    if guess is not None and guess > 0:
        candidates = (flat > guess).nonzero().squeeze(1)
        if candidates.numel() < total:  # the cut moved below the guess
            candidates = None
    if candidates is None:
        per_row = pre.topk(min(width, max(math.ceil(k), 1)), dim=-1, sorted=False).values  # (n, ⌈k⌉)
        lower = per_row.reshape(-1).topk(total, sorted=False).values.min()
        candidates = (flat >= lower).nonzero().squeeze(1) if lower > 0 else (flat > 0).nonzero().squeeze(1)
    with one_thread(pre.device):  # small ops from here on
        if candidates.numel() > total:
            candidates = candidates[flat[candidates].topk(total, sorted=False).indices].sort().values
        values = flat[candidates]  # every candidate is > 0
        return Entries(torch.div(candidates, width, rounding_mode="floor"), candidates % width, values)


def select_aux(pre: Tensor, dead: Tensor, k_aux: int) -> Entries:
    """Each row's top-k_aux ReLU'd pre-activations among the dead latents (AuxK)."""
    dead_cols = dead.nonzero().squeeze(1)  # (n_dead,)
    sub = pre.index_select(1, dead_cols)  # (n, n_dead)
    values, local = sub.topk(k_aux, dim=-1, sorted=False)  # (n, k_aux)
    return _row_entries(values, dead_cols[local])


def _csr(rows: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A CSR matrix from row-major entries (duplicates allowed: products sum them)."""
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=shape[0]).cumsum(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "CSR support is in beta state"
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


def _sampled_dot(rows: Tensor, cols: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """(nnz,) ⟨left[rows e], right[cols e]⟩ for row-major entries: a sampled dense-dense
    product on the entries' pattern (left (n, d), right (width, d))."""
    pattern = _csr(rows, cols, torch.ones_like(rows, dtype=left.dtype), (left.shape[0], right.shape[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse.sampled_addmm(pattern, left, right.T, beta=0.0).values()


def _transposed(rows: Tensor, cols: Tensor, values: Tensor, n: int, width: int) -> Tensor:
    """The (width × n) CSR transpose of row-major entries."""
    order = torch.argsort(cols, stable=True)
    return _csr(cols[order], rows[order], values[order], (width, n))


def _level(entries: Entries, level: Tensor | None, start: int) -> tuple[Tensor, Tensor, Tensor]:
    """(rows, cols − start, values) of the entries at positions `level` (None: all)."""
    if level is None:
        return entries.rows, entries.cols - start if start else entries.cols, entries.values
    return entries.rows[level], entries.cols[level] - start, entries.values[level]


class StepParts(NamedTuple):
    """What one forward pass selected and produced (inputs of the backward)."""

    main: Entries
    aux: Entries | None
    aux_scale: float
    """min(n_dead / aux_k, 1)·aux_coefficient (0 without dead latents)."""
    levels: list[Tensor | None]
    """Per Matryoshka level, the positions of its entries in `main` (None: all of them)."""
    errors: list[Tensor]
    """x̂_l − x per level, (n, d_in) each, the outer level last."""
    aux_error: Tensor | None
    """ê − (x − x̂_L), (n, d_in)."""


class TopKFamilyStep:
    """Forward + hand-written backward of the TopK family's loss on the sparse path.

    `__call__(x, dead)` leaves the gradients in the SAE's `.grad` (preallocated buffers,
    reused every step) and returns the step's `StepStats`. For batchtopk it also moves the
    SAE's threshold (its JumpReLU θ, one value for every latent) by sae-lens's EMA of the
    smallest selected activation.
    """

    def __init__(self, sae: SparseAutoencoder, batch_size: int, *, selection: Selection, k: float,
                 levels: tuple[int, ...], aux_k: int, aux_coefficient: float,
                 threshold_lr: float = 0.01):
        if sae.apply_b_dec_to_input:
            raise ValueError("the sparse path trains SAEs with apply_b_dec_to_input=False")
        if levels[-1] != sae.d_sae or any(a >= b for a, b in zip(levels, levels[1:])):
            raise ValueError(f"levels must increase strictly up to d_sae, got {levels}")
        if selection == "batchtopk" and not hasattr(sae, "threshold"):
            raise ValueError("a batchtopk SAE is a jumprelu module (its threshold is learned here)")
        self.sae, self.selection, self.k, self.levels = sae, selection, k, levels
        self.aux_k, self.aux_coefficient, self.threshold_lr = aux_k, aux_coefficient, threshold_lr
        d, D, kw = sae.d_in, sae.d_sae, {"dtype": sae.W_enc.dtype, "device": sae.W_enc.device}
        self.pre = torch.empty(batch_size, D, **kw)
        """(B, D) pre-activations."""
        self.last_cut: float | None = None
        """batchtopk: the previous step's smallest selected activation (a start for the next cut)."""
        self.W_enc_grad = torch.empty(d, D, **kw)
        self.b_enc_grad = torch.empty(D, **kw)
        self.W_dec_grad = torch.empty(D, d, **kw)
        self.b_dec_grad = torch.empty(d, **kw)

    def select(self, pre: Tensor) -> Entries:
        """The step's selected entries of `pre`."""
        if self.selection == "topk":
            return select_topk(pre, int(self.k))
        guess = None if self.last_cut is None else 0.95 * self.last_cut
        entries = select_batchtopk(pre, self.k, guess)
        self.last_cut = float(entries.values.min()) if entries.values.numel() else None
        return entries

    @torch.no_grad()
    def forward(self, x: Tensor, dead: Tensor) -> StepParts:
        """Select, decode every level and the AuxK reconstruction."""
        sae, n = self.sae, x.shape[0]
        pre = torch.addmm(sae.b_enc, x, sae.W_enc, out=self.pre[:n])  # (n, D)
        main = self.select(pre)  # passes over all of pre: every thread
        aux = None
        if self.aux_coefficient and bool(dead.any()):
            aux = select_aux(pre, dead, min(self.aux_k, int(dead.sum())))
        with one_thread(pre.device):
            return self._decode(x, main, aux, int(dead.sum()))

    def _decode(self, x: Tensor, main: Entries, aux: Entries | None, n_dead: int) -> StepParts:
        sae, n = self.sae, x.shape[0]
        levels = [None] if len(self.levels) == 1 else [
            ((main.cols >= start) & (main.cols < width)).nonzero().squeeze(1)
            for start, width in zip((0,) + self.levels[:-1], self.levels)]
        errors, x_hat = [], sae.b_dec.expand(n, -1)
        for start, width, level in zip((0,) + self.levels[:-1], self.levels, levels):
            rows, cols, values = _level(main, level, start)
            x_hat = x_hat + _csr(rows, cols, values, (n, width - start)) @ sae.W_dec[start:width]  # x̂_l
            errors.append(x_hat - x)  # (n, d)
        if aux is None:
            return StepParts(main, None, 0.0, levels, errors, None)
        e_hat = _csr(aux.rows, aux.cols, aux.values, (n, sae.d_sae)) @ sae.W_dec  # (n, d), no bias
        scale = self.aux_coefficient * min(n_dead / self.aux_k, 1.0)
        return StepParts(main, aux, scale, levels, errors, e_hat + errors[-1])  # ê − (x − x̂_L)

    @torch.no_grad()
    def __call__(self, x: Tensor, dead: Tensor, *, want_l0: bool = False) -> StepStats:
        """x: (n, d_in) with n <= the buffer's batch size; dead: (d_sae,) bool."""
        x = x.contiguous()
        parts = self.forward(x, dead)
        with one_thread(x.device):
            return self._backward(x, parts, want_l0)

    def _backward(self, x: Tensor, parts: StepParts, want_l0: bool) -> StepStats:
        sae, n, D = self.sae, x.shape[0], self.sae.d_sae
        main = parts.main
        g = [e * (2.0 / n) for e in parts.errors]  # ∂L/∂x̂_l, (n, d) each
        torch.sum(torch.stack(g).sum(dim=0), dim=0, out=self.b_dec_grad)
        self.W_dec_grad.zero_()
        grad_v = torch.empty_like(main.values)
        G, cumulative = torch.zeros_like(x), []
        for g_l in reversed(g):  # G_l = Σ_{l' >= l} g_l'
            G = G + g_l
            cumulative.append(G)
        for start, width, level, G_l in zip((0,) + self.levels[:-1], self.levels, parts.levels,
                                            reversed(cumulative)):
            rows, cols, values = _level(main, level, start)
            dots = _sampled_dot(rows, cols, G_l, sae.W_dec[start:width])
            if level is None:
                grad_v = dots
            else:
                grad_v[level] = dots
            self.W_dec_grad[start:width] += _transposed(rows, cols, values, n, width - start) @ G_l
        rows, cols, grad_pre = main.rows, main.cols, grad_v  # every kept entry has v > 0
        aux_loss = x.new_zeros(())
        if parts.aux is not None:
            aux = parts.aux
            aux_loss = parts.aux_error.pow(2).sum() / n
            g_aux = parts.aux_error * (2.0 * parts.aux_scale / n)  # (n, d)
            grad_a = _sampled_dot(aux.rows, aux.cols, g_aux, sae.W_dec)
            self.W_dec_grad += _transposed(aux.rows, aux.cols, aux.values, n, D) @ g_aux
            rows, cols = torch.cat([rows, aux.rows]), torch.cat([cols, aux.cols])
            grad_pre = torch.cat([grad_pre, grad_a])
        # ∂L/∂W_enc = xᵀ S_g, computed as (S_gᵀ x)ᵀ: the sparse operand on the left is MKL's fast case
        self.W_enc_grad.copy_((_transposed(rows, cols, grad_pre, n, D) @ x).T)
        self.b_enc_grad.zero_().index_add_(0, cols, grad_pre)
        sae.W_enc.grad, sae.b_enc.grad = self.W_enc_grad, self.b_enc_grad
        sae.W_dec.grad, sae.b_dec.grad = self.W_dec_grad, self.b_dec_grad
        if self.selection == "batchtopk" and self.last_cut is not None:
            self._update_threshold(self.last_cut)
        mses = [e.pow(2).sum() / n for e in parts.errors]
        loss = torch.stack(mses).sum() + parts.aux_scale * aux_loss
        fired = torch.bincount(main.cols, minlength=D) > 0
        l0 = torch.tensor(main.values.numel() / n) if want_l0 else None
        return StepStats(loss, mses[-1], aux_loss, _fvu(parts.errors[-1], x), fired, l0)

    def _update_threshold(self, smallest: float) -> None:
        """θ ← (1 − lr)·θ + lr·(smallest selected activation), in float64 (sae-lens's
        BatchTopKTrainingSAE.update_topk_threshold); every latent shares θ."""
        theta = float(self.sae.threshold[0])
        theta = (1 - self.threshold_lr) * theta + self.threshold_lr * smallest
        self.sae.threshold.fill_(theta)


def dense_reference_loss(sae: SparseAutoencoder, x: Tensor, main: Entries, aux: Entries | None,
                         levels: tuple[int, ...], aux_scale: float) -> Tensor:
    """The same loss through autograd on dense (n × d_sae) latents, for the parity test:
    the selections are given (a selection is not differentiable), the values are taken
    from the pre-activations so the gradient reaches the encoder."""
    n, D = x.shape[0], sae.d_sae
    pre = sae.hidden_pre(x)  # (n, D)
    f = torch.zeros(n, D, dtype=pre.dtype).index_put((main.rows, main.cols), pre[main.rows, main.cols].relu())
    loss, x_hat = x.new_zeros(()), None
    for width in levels:
        x_hat = f[:, :width] @ sae.W_dec[:width] + sae.b_dec  # (n, d)
        loss = loss + (x_hat - x).pow(2).sum(dim=-1).mean()
    if aux is not None:
        f_aux = torch.zeros(n, D, dtype=pre.dtype).index_put(
            (aux.rows, aux.cols), pre[aux.rows, aux.cols].relu(), accumulate=True)
        residual = (x - x_hat).detach()
        loss = loss + aux_scale * (f_aux @ sae.W_dec - residual).pow(2).sum(dim=-1).mean()
    return loss
