"""Every SAE architecture trains, saves as a folder sae-lens loads (BatchTopK and Matryoshka
as JumpReLU with their learned threshold, as sae-lens saves them) and encodes identically
in both libraries; sae-lens's own JumpReLU / BatchTopK folders load in saekit; the JumpReLU
step is sae-lens's (loss and every gradient); `saekit train --architecture batchtopk` runs
on a cache written by `saekit cache`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from saekit.sae.config import SAETrainConfig
from saekit.sae.io import load_sae
from saekit.sae.jumprelu import jumprelu_step, l0_coefficient_at
from saekit.sae.model import SparseAutoencoder
from saekit.sae.training import TrainingData, train_sae

D_IN, D_SAE, BATCH = 16, 64, 32
SAE_LENS_CLASS = {"standard": "StandardSAE", "topk": "TopKSAE", "batchtopk": "JumpReLUSAE",
                  "jumprelu": "JumpReLUSAE", "matryoshka": "JumpReLUSAE"}


def _synthetic(seed: int = 0) -> TrainingData:
    """Sparse combinations of 48 directions plus noise: something an SAE can learn."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(48, D_IN, generator=gen)

    def batches(start: int):
        step = start
        while True:
            g = torch.Generator().manual_seed(seed * 100_003 + step)
            codes = torch.rand(BATCH, 48, generator=g).lt(0.08) * torch.rand(BATCH, 48, generator=g)
            yield codes @ directions + 0.05 * torch.randn(BATCH, D_IN, generator=g)
            step += 1
    return TrainingData(batches, D_IN, {})


def _train(tmp_path: Path, architecture: str, data: TrainingData | None = None, **overrides) -> Path:
    cfg = SAETrainConfig(out=tmp_path / architecture, cache=Path("unused"), architecture=architecture,
                         d_sae=D_SAE, k=4, batch_size=BATCH, training_tokens=BATCH * 40, warmup_steps=2,
                         lr=3e-3, log_every=10, device="cpu",
                         matryoshka_widths=(8, 24) if architecture == "matryoshka" else None,
                         l0_coefficient=0.05, topk_threshold_lr=0.3, **{"checkpoint_every": 0, **overrides})
    return train_sae(cfg, data or _synthetic(), progress=False)


@pytest.mark.parametrize("architecture", list(SAE_LENS_CLASS))
def test_every_architecture_round_trips_through_sae_lens(tmp_path, architecture):
    from sae_lens import SAE

    folder = _train(tmp_path, architecture)
    cfg = json.loads((folder / "cfg.json").read_text())
    theirs = SAE.load_from_disk(folder)
    assert type(theirs).__name__ == SAE_LENS_CLASS[architecture]
    assert cfg["metadata"]["training_architecture"] == architecture
    ours = load_sae(folder).sae
    x = next(_synthetic(seed=7).batches(0)) * 3.0  # raw activations, off the training scale
    with torch.no_grad():
        f_theirs, f_ours = theirs.encode(x), ours.encode(x)
        assert torch.equal(f_theirs, f_ours)
        torch.testing.assert_close(theirs.decode(f_theirs), ours.decode(f_ours), rtol=0, atol=1e-6)
    assert (f_ours != 0).any() and (f_ours == 0).any()
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["fvu"] < lines[0]["fvu"]  # it learns
    if architecture in ("batchtopk", "matryoshka"):
        threshold = ours.threshold
        assert (threshold == threshold[0]).all() and threshold[0] > 0
        assert lines[-1]["threshold"] == pytest.approx(threshold[0].item())
        # at inference the threshold keeps about k latents per token of training-like data
        l0 = (ours.encode(next(_synthetic(seed=7).batches(0))) != 0).sum(dim=1).float().mean()
        assert 1 <= l0 <= 3 * 4
    if architecture == "topk":
        assert ((f_ours != 0).sum(dim=1) <= 4).all()


def test_jumprelu_step_is_sae_lens_jumprelu_training(tmp_path):
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    sae = SparseAutoencoder(d_in=D_IN, d_sae=D_SAE, architecture="jumprelu")
    sae.init_weights_(torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.b_enc.add_(torch.randn(D_SAE, generator=gen) * 0.05)
        sae.threshold.copy_(torch.rand(D_SAE, generator=gen) * 0.2)
    x = torch.randn(BATCH, D_IN, generator=gen)
    theirs = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False, jumprelu_bandwidth=0.1))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            getattr(theirs, name).copy_(getattr(sae, name))
    out = theirs.training_forward_pass(TrainStepInput(x, {"l0": 0.3}, None, 0, False))
    out.loss.backward()
    stats = jumprelu_step(sae, x, l0_coefficient=0.3, bandwidth=0.1)
    torch.testing.assert_close(stats.loss, out.loss.detach(), rtol=1e-6, atol=1e-6)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        torch.testing.assert_close(getattr(sae, name).grad, getattr(theirs, name).grad,
                                   rtol=1e-5, atol=1e-7, msg=name)
    assert sae.threshold.grad.abs().sum() > 0  # the straight-through estimator reaches θ


def test_l0_coefficient_warms_up_like_sae_lens():
    from sae_lens.training.optim import CoefficientScheduler

    scheduler = CoefficientScheduler(4, 2.0)
    for step in range(7):
        assert l0_coefficient_at(2.0, 4, step) == pytest.approx(scheduler.current_value)
        scheduler.step()


@pytest.mark.parametrize("kind", ["jumprelu", "batchtopk"])
def test_sae_lens_jumprelu_folders_load_in_saekit(tmp_path, kind):
    from sae_lens import SAE
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

    torch.manual_seed(3)
    if kind == "jumprelu":
        training = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE))
    else:
        training = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4))
        training.topk_threshold.fill_(0.2)
    with torch.no_grad():
        for p in training.parameters():
            p.add_(torch.rand_like(p) * 0.05)
    training.save_inference_model(tmp_path / kind)
    theirs = SAE.load_from_disk(tmp_path / kind)
    loaded = load_sae(tmp_path / kind)
    assert loaded.sae.architecture == "jumprelu"
    x = torch.randn(30, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(loaded.sae.encode(x), theirs.encode(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loaded.sae(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_train_batchtopk_on_a_saekit_cache(tmp_path, capsys):
    from sae_lens import SAE

    from saekit.cache import ActivationCache, CacheConfig, build_cache
    from saekit.cli import main

    rng = np.random.default_rng(0)
    lines = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        lines.append({"image": f"{i}.png", "text": "the red circle left of a big blue square"[: 12 + 4 * i]})
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(["cache", "--model", "tiny-llava", "--data", str(tmp_path / "data.jsonl"), "--out",
                 str(tmp_path / "cache"), "--layers", "2", "--device", "cpu", "--no-progress"]) == 0
    out = tmp_path / "sae"
    assert main(["train", "--cache", str(tmp_path / "cache"), "--out", str(out), "--architecture",
                 "batchtopk", "--k", "8", "--d-sae", "256", "--batch-size", "64", "--training-tokens",
                 str(64 * 20), "--warmup-steps", "2", "--lr", "2e-3", "--log-every", "5",
                 "--no-progress"]) == 0
    assert "batchtopk d_in 128 -> d_sae 256" in capsys.readouterr().out
    theirs = SAE.load_from_disk(out)
    acts = ActivationCache(tmp_path / "cache").read_all(2, token_types=("image", "prompt", "response"))
    with torch.no_grad():
        assert torch.equal(theirs.encode(acts), load_sae(out).sae.encode(acts))


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize("architecture", ["batchtopk", "jumprelu", "matryoshka"])
def test_an_interrupted_run_resumes_to_the_same_bytes(tmp_path, architecture):
    """The BatchTopK threshold (an EMA, not an optimiser parameter) and JumpReLU's θ travel in
    the checkpoint; the batch selection does not depend on the step that came before."""
    data = _synthetic()

    def dying(start: int):
        for i, batch in enumerate(data.batches(start)):
            if start + i == 27:
                raise _Interrupted
            yield batch

    whole = _train(tmp_path / "whole", architecture, checkpoint_every=10)
    with pytest.raises(_Interrupted):
        _train(tmp_path / "resumed", architecture, checkpoint_every=10, data=TrainingData(dying, D_IN, {}))
    resumed = _train(tmp_path / "resumed", architecture, checkpoint_every=10)
    for name in ("sae_weights.safetensors", "cfg.json"):
        assert (whole / name).read_bytes() == (resumed / name).read_bytes(), name
