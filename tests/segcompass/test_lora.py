"""LoRA on the tiny twin: adapters only above the SAE layer, the base untouched, adapters saved
in peft's folder format that load back (ours and `PeftModel`'s) to the same predictions, merging,
and LoRA training runs (seg and rl+seg) that resume identically."""

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from segcompass.lora import LORA_DIR, lora_layers
from segcompass.model import SegCompassConfig, build_segcompass, load_segcompass, save_segcompass
from segcompass.predictor import Predictor, PredictorConfig
from segcompass.world.scenes import generate
from segcompass_tiny import TINY_SAE_LAYER, tiny_checkpoint  # noqa: F401 (session fixture)

FAST = PredictorConfig(max_new_tokens=8, batch_size=2, top_atoms=2)
CONFIG = SegCompassConfig(sae_layer=TINY_SAE_LAYER, lora_rank=4)


def _predict(model, samples):
    predictions = Predictor(model, FAST).predict([s.image for s in samples], [s.instruction for s in samples],
                                                 multi=[s.multi_prompt for s in samples])
    return [(p.response, p.slot_probs, p.confidences) for p in predictions]


def _logits(policy, model, samples):
    from segcompass.training.batching import batch_from_samples

    batch = batch_from_samples(model, samples).model_batch
    with torch.no_grad():
        return policy(**batch.model_inputs).logits


def test_adapters_save_load_and_reproduce_predictions_base_untouched(tiny_checkpoint, tmp_path):  # noqa: F811
    model = build_segcompass(CONFIG, policy_path=tiny_checkpoint / "policy", sae_path=tiny_checkpoint / "sae")
    trainable = [n for n, p in model.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".layers.1." in n and "language_model" in n for n in trainable)
    names = {name for name, _ in lora_layers(model.policy)}
    assert names and not any(".layers.0." in n or "vision" in n for n in names)  # block L = 1 and below: none
    with torch.no_grad():  # stand in for training: B starts at zero, which would make the adapters a no-op
        for name, param in model.policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    samples = generate("val", 2, seed=1)
    expected = _predict(model.eval(), samples)
    folder = save_segcompass(model, tmp_path / "ckpt", sae_path=tiny_checkpoint / "sae")
    assert (folder / LORA_DIR / "adapter_config.json").is_file()
    base, saved = load_file(str(tiny_checkpoint / "policy" / "model.safetensors")), load_file(
        str(folder / "policy" / "model.safetensors"))
    assert base.keys() == saved.keys() and all(torch.equal(base[k], saved[k]) for k in base)
    loaded = load_segcompass(folder).eval()
    for (r1, p1, c1), (r2, p2, c2) in zip(expected, _predict(loaded, samples)):
        assert r1 == r2 and np.array_equal(p1, p2) and np.array_equal(c1, c2)
    adapted = _logits(loaded.policy, loaded, samples)
    plain = load_segcompass(tiny_checkpoint).eval()
    assert not torch.allclose(adapted, _logits(plain.policy, plain, samples))  # the adapters act

    merged = load_segcompass(folder, merge_lora=True).eval()
    assert not lora_layers(merged.policy) and merged.config.lora_rank == 0
    torch.testing.assert_close(_logits(merged.policy, merged, samples), adapted, rtol=1e-4, atol=1e-4)

    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    peft_model = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(folder / "policy"),
                                           folder / LORA_DIR).eval()
    torch.testing.assert_close(_logits(peft_model, loaded, samples), adapted, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["seg", "rl+seg"])
def test_lora_training_moves_only_adapters_and_resumes_identically(mode, tiny_checkpoint, tmp_path):  # noqa: F811
    from segcompass.training.supervised import TrainConfig, train

    cfg = TrainConfig(policy=tiny_checkpoint / "policy", sae=tiny_checkpoint / "sae", out=tmp_path / "full",
                      sae_layer=TINY_SAE_LAYER, lora_rank=2, steps=2, batch_size=2, checkpoint_every=1, log_every=1,
                      threads=1, device="cpu", mode=mode, group_size=2, rl_prompts=2, max_new_tokens=8,
                      lr=1e-3)
    full = train(cfg, progress=False)
    train(dataclasses.replace(cfg, out=tmp_path / "resumed"), progress=False, stop_after=1)
    resumed = train(dataclasses.replace(cfg, out=tmp_path / "resumed"), progress=False)
    base = load_file(str(tiny_checkpoint / "policy" / "model.safetensors"))
    for final in (full, resumed):
        policy = load_file(str(final / "policy" / "model.safetensors"))
        assert all(torch.equal(base[k], policy[k]) for k in base)  # the base never moves
    a, b = (load_file(str(f / LORA_DIR / "adapter_model.safetensors")) for f in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("lora_B" in k and a[k].abs().sum() > 0 for k in a)  # trained away from B = 0
