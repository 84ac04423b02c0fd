"""`saekit eval`: its reconstruction and sparsity numbers are sae-lens's on the same SAE and
activations (within 1e-4); its downstream losses are sae-lens's `get_recons_loss` on the
tiny LLaVA twin; the identity SAE recovers 100% of the loss and the zero SAE 0%; the CLI
writes eval.json + density.png over a `saekit cache` cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from saekit.inputs import TOKEN_TYPE_NAMES, build_batch
from saekit.sae.downstream import downstream_losses
from saekit.sae.io import save_sae
from saekit.sae.metrics import SparsityStats
from saekit.sae.model import SparseAutoencoder

LAYER, HOOK = 2, "blocks.1.hook_resid_post"


def _sae(d_in: int, d_sae: int, architecture: str = "topk", seed: int = 0) -> SparseAutoencoder:
    sae = SparseAutoencoder(d_in=d_in, d_sae=d_sae, architecture=architecture, k=6)
    sae.init_weights_(torch.Generator().manual_seed(seed), decoder_norm=1.0)
    with torch.no_grad():
        sae.b_dec.add_(torch.randn(d_in, generator=torch.Generator().manual_seed(seed + 1)) * 0.3)
        if architecture == "jumprelu":
            sae.threshold.fill_(0.3)
    return sae


def _sae_lens(sae: SparseAutoencoder, folder: Path):
    from sae_lens import SAE

    save_sae(sae, folder, metadata={"model_name": "tiny-llava", "hook_name": HOOK}, info={})
    return SAE.load_from_disk(folder)


class _Store:
    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def get_batch_tokens(self, n: int) -> torch.Tensor:
        return self.tokens


class _CachedModel:
    """What sae-lens's sparsity metrics need of a model: activations by hook name."""

    def __init__(self, acts: torch.Tensor):
        self.acts = acts

    def run_with_cache(self, tokens, **kwargs):
        return None, {HOOK: self.acts}


@pytest.mark.parametrize("architecture", ["topk", "jumprelu"])
def test_sparsity_and_variance_metrics_equal_sae_lens(tmp_path, architecture):
    from sae_lens.evals import get_sparsity_and_variance_metrics
    from sae_lens.training.activation_scaler import ActivationScaler

    d_in, d_sae, n = 24, 80, 300
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, d_in, generator=gen) * 2 + 3.0  # a large mean: variance is about the mean
    sae = _sae(d_in, d_sae, architecture)
    theirs = _sae_lens(sae, tmp_path / "sae")
    metrics, features = get_sparsity_and_variance_metrics(
        theirs, _CachedModel(x.unsqueeze(0)), _Store(torch.zeros(1, n, dtype=torch.long)), ActivationScaler(),
        n_batches=1, compute_l2_norms=True, compute_sparsity_metrics=True, compute_variance_metrics=True,
        compute_featurewise_density_statistics=True, eval_batch_size_prompts=1, model_kwargs={})
    stats = SparsityStats(d_in, d_sae)
    with torch.no_grad():
        for chunk in x.split(128):  # chunked, as saekit reads a cache
            f = sae.encode(chunk)
            stats.add(chunk, sae.decode(f), f, torch.zeros(chunk.shape[0], dtype=torch.int8))
    ours = stats.result()["all"]
    for name in ("mse", "explained_variance", "cossim", "l0", "l1", "l2_norm_in", "l2_norm_out",
                 "l2_ratio", "relative_reconstruction_bias"):
        assert ours[name] == pytest.approx(metrics[name], rel=1e-4, abs=1e-4), name
    assert ours["explained_variance"] < 1 and ours["l0"] > 0
    torch.testing.assert_close(stats.feature_density()["all"].float(),
                               torch.tensor(features["feature_density"]), rtol=0, atol=1e-6)
    assert stats.result()["image"]["n_tokens"] == n  # token type 0 = image


@pytest.fixture(scope="module")
def tiny():
    from saekit.tiny import build_tiny_llava

    return build_tiny_llava()


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


class _HookedLlava:
    """What sae-lens's `get_recons_loss` needs of a HookedTransformer, around the HF tiny
    LLaVA: forward with hooks by TransformerLens name and per-token CE (TransformerLens's own
    `lm_cross_entropy_loss`)."""

    def __init__(self, loaded, batch):
        self.model, self.inputs = loaded.model, batch.model_inputs

    def _run(self, tokens, hooks):
        from transformer_lens.utils import lm_cross_entropy_loss

        handles = []
        for name, fn in hooks:
            block = int(name.split(".")[1])
            layer = self.model.model.language_model.layers[block]

            def hook(module, args, output, fn=fn):
                hidden = output[0] if isinstance(output, tuple) else output
                new = fn(hidden, hook=None)
                return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
            handles.append(layer.register_forward_hook(hook))
        try:
            with torch.no_grad():
                logits = self.model(**self.inputs, use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()
        return logits, lm_cross_entropy_loss(logits, tokens, per_token=True)

    def __call__(self, tokens, return_type="both", loss_per_token=True, **kwargs):
        return self._run(tokens, [])

    def run_with_hooks(self, tokens, return_type="both", fwd_hooks=(), loss_per_token=True, **kwargs):
        return self._run(tokens, fwd_hooks)


def test_downstream_losses_equal_sae_lens_get_recons_loss(tiny, tmp_path):
    from sae_lens.evals import get_recons_loss
    from sae_lens.training.activation_scaler import ActivationScaler

    text = "the red circle left of a big blue square"
    batch = build_batch(tiny, [_image(0), _image(1)], [text, text], ["a circle", "a square"])
    assert (batch.attention_mask == 1).all()  # equal lengths: no padding in either library
    sae = _sae(128, 512)
    theirs = get_recons_loss(_sae_lens(sae, tmp_path / "sae"), _HookedLlava(tiny, batch), ActivationScaler(),
                             batch.model_inputs["input_ids"], compute_kl=False, compute_ce_loss=True,
                             hook_name=HOOK)
    ours = downstream_losses(tiny, sae, [batch], LAYER, splits={"all": TOKEN_TYPE_NAMES},
                             loss_on=TOKEN_TYPE_NAMES)["splits"]["all"]
    clean, with_sae = theirs["ce_loss_without_sae"].mean(), theirs["ce_loss_with_sae"].mean()
    ablated = theirs["ce_loss_with_ablation"].mean()
    assert ours["ce_clean"] == pytest.approx(clean.item(), abs=1e-4)
    assert ours["ce_sae"] == pytest.approx(with_sae.item(), abs=1e-4)
    assert ours["ce_zero_ablated"] == pytest.approx(ablated.item(), abs=1e-4)
    score = ((ablated - with_sae) / (ablated - clean)).item()  # sae-lens's ce_loss_score
    assert ours["loss_recovered_vs_zero"] == pytest.approx(score, abs=1e-4)
    assert ours["ce_sae"] != pytest.approx(ours["ce_clean"], abs=1e-3)  # the SAE does cost something


def _identity_sae(d: int) -> SparseAutoencoder:
    """f = [ReLU(x), ReLU(−x)], x̂ = ReLU(x) − ReLU(−x) = x exactly."""
    sae = SparseAutoencoder(d_in=d, d_sae=2 * d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return sae


def test_identity_sae_recovers_all_of_the_loss_and_the_zero_sae_none(tiny):
    batch = build_batch(tiny, [_image(2), _image(3), _image(4)],
                        ["find the red circle", "the big blue square near the star", "a dog"],
                        ["it is left", "right of the star", "no"])
    splits = {"all": ("image", "prompt", "response"), "image": ("image",), "response": ("response",)}
    identity = downstream_losses(tiny, _identity_sae(128), [batch], LAYER, splits=splits)["splits"]
    for name, split in identity.items():
        assert split["ce_sae"] == split["ce_clean"], name  # x̂ = x to the bit
        assert split["loss_recovered_vs_zero"] == 1.0 and split["loss_recovered_vs_mean"] == 1.0
        assert split["ce_zero_ablated"] != split["ce_clean"]  # (a random model: either way)
    assert identity["image"]["spliced_tokens"] == 3 * 64  # 8x8 image positions per sample
    zero = downstream_losses(tiny, SparseAutoencoder(d_in=128, d_sae=8), [batch], LAYER,
                             splits=splits)["splits"]
    for split in zero.values():
        assert split["ce_sae"] == split["ce_zero_ablated"]
        assert split["loss_recovered_vs_zero"] == 0.0


def test_eval_cli_writes_json_and_png_over_a_cache(tmp_path, capsys):
    from saekit.cli import main

    lines = []
    for i in range(5):
        _image(10 + i).save(tmp_path / f"{i}.png")
        lines.append({"image": f"{i}.png", "text": "find the red circle left of the square"[: 10 + 6 * i]})
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(["cache", "--model", "tiny-llava", "--data", str(tmp_path / "data.jsonl"), "--out",
                 str(tmp_path / "cache"), "--layers", "2", "--device", "cpu", "--no-progress"]) == 0
    assert main(["train", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "sae"),
                 "--architecture", "batchtopk", "--k", "8", "--d-sae", "256", "--batch-size", "64",
                 "--training-tokens", str(64 * 10), "--warmup-steps", "2", "--lr", "2e-3",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "sae"), "--cache", str(tmp_path / "cache"), "--data",
                 str(tmp_path / "data.jsonl"), "--max-samples", "3", "--device", "cpu",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "loss recovered (all)" in printed and "explained variance" in printed
    result = json.loads((tmp_path / "sae" / "eval" / "eval.json").read_text())
    recon = result["reconstruction"]
    assert result["architecture"] == "jumprelu" and result["training_architecture"] == "batchtopk"
    assert set(recon) >= {"all", "image", "prompt", "latents"}
    assert recon["all"]["n_tokens"] == recon["image"]["n_tokens"] + recon["prompt"]["n_tokens"]
    assert sum(recon["latents"]["log10_density_histogram"]["counts"]) + recon["latents"]["dead"] == 256
    assert set(result["downstream"]["splits"]) == {"all", "image", "prompt"}
    with Image.open(tmp_path / "sae" / "eval" / "density.png") as png:
        assert png.size == (720, 400)
