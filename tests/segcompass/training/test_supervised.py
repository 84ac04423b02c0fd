"""Supervised SegCompass training: freezing, LR groups, checkpoint round trip, resume == uninterrupted."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from saekit.models import save_pretrained
from saekit.sae.io import save_sae
from saekit.sae.model import SparseAutoencoder
from segcompass.model import load_segcompass
from segcompass.training.supervised import TrainConfig, param_groups, train
from segcompass.world.warmstart import WarmstartConfig, build_policy
from segcompass_tiny import TINY_SAE_LAYER, tiny_checkpoint  # noqa: F401 (session fixture)


@pytest.fixture(scope="module")
def pieces(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    torch.manual_seed(0)
    policy = build_policy(WarmstartConfig(hidden_size=32, n_layers=3, n_heads=2, vision_hidden_size=32,
                                          vision_layers=2, image_size=32, patch_size=8))
    save_pretrained(policy, root / "policy")
    sae = SparseAutoencoder(d_in=32, d_sae=256)
    with torch.no_grad():  # random directions, scaled so that some atoms pass the |h| >= 2 threshold
        sae.W_enc.normal_(0, 1.0)
        sae.W_dec.copy_(torch.nn.functional.normalize(sae.W_enc.T, dim=1))
    save_sae(sae, root / "sae", metadata={"model_name": "tiny-llava", "hook_name": "blocks.1.hook_resid_post"},
             info={"layer": 2})
    return root


def _cfg(root, out, steps=4):
    return TrainConfig(policy=root / "policy", sae=root / "sae", out=out, steps=steps, batch_size=2,
                       checkpoint_every=2, log_every=1, threads=1)


def test_freezing_and_lr_groups(pieces, tmp_path):
    from segcompass.model import SegCompassConfig, build_segcompass
    from saekit.capture import decoder_layers

    cfg = _cfg(pieces, tmp_path)
    model = build_segcompass(cfg.model_config(), policy_path=cfg.policy, sae_path=cfg.sae)
    blocks = decoder_layers(model.policy)
    assert not any(p.requires_grad for p in blocks[1].parameters())  # block 2 = the SAE layer: frozen
    assert all(p.requires_grad for p in blocks[2].parameters())  # above it: trained
    assert not any(p.requires_grad for p in model.sae.parameters())
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert groups["slot_mapper"]["lr"] == pytest.approx(cfg.lr * 80)
    assert groups["codebook"]["lr"] == pytest.approx(cfg.lr * 25)
    assert groups["decoder"]["lr"] == pytest.approx(cfg.lr * 10)
    assert groups["policy"]["lr"] == pytest.approx(cfg.lr)
    raised = {g["name"]: g for g in param_groups(model, dataclasses.replace(cfg, policy_lr_mult=10.0))}
    assert raised["policy"]["lr"] == pytest.approx(cfg.lr * 10) and raised["decoder"]["lr"] == groups["decoder"]["lr"]
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids))  # no parameter in two groups
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == set(ids)


def test_resume_reproduces_uninterrupted_run(pieces, tmp_path):
    full = train(_cfg(pieces, tmp_path / "full"), progress=False)
    stopped = train(_cfg(pieces, tmp_path / "resumed"), progress=False, stop_after=2)
    assert stopped.name == "checkpoint"
    resumed = train(_cfg(pieces, tmp_path / "resumed"), progress=False)
    for name in ("head.safetensors", "sam/model.safetensors", "policy/model.safetensors"):
        a, b = load_file(str(full / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{name}:{key}")
    # the checkpoint loads back into an equivalent model
    model = load_segcompass(full)
    assert model.head.num_slots == 4
    with open(tmp_path / "full" / "metrics.jsonl") as handle:
        assert len(handle.readlines()) == 4


def test_changed_config_refuses_to_resume(pieces, tmp_path):
    from saekit.errors import UserError

    train(_cfg(pieces, tmp_path), progress=False, stop_after=2)
    with pytest.raises(UserError, match=r"checkpoint was written with other settings: field 'lr' was 2e-05, now 0\.001"):
        train(dataclasses.replace(_cfg(pieces, tmp_path), lr=1e-3), progress=False)


def test_freezing_keeps_tied_embeddings_frozen():
    """The world policy ties its LM head to the input embeddings: training the head would
    move the layer-L states the frozen SAE reads (a GRPO run showed embed_tokens drifting)."""
    from segcompass.model import freeze_policy_up_to

    policy = build_policy(WarmstartConfig(hidden_size=32, n_layers=3, n_heads=2, vision_hidden_size=32,
                                          vision_layers=2, image_size=32, patch_size=8)).model
    assert policy.lm_head.weight is policy.get_input_embeddings().weight
    freeze_policy_up_to(policy, 2)
    assert not policy.get_input_embeddings().weight.requires_grad
    blocks = policy.model.language_model.layers
    assert not any(p.requires_grad for p in blocks[1].parameters())
    assert all(p.requires_grad for p in blocks[2].parameters())


def test_slot_embedding_dropout_zeroes_only_the_dropped_samples(pieces):
    """A dropped sample's slots see r_k alone: its head output equals the head run on zero e_k;
    a kept sample's output is the plain forward's. The keep mask is keyed by (seed, step)."""
    from segcompass.training.batching import seg_batch
    from segcompass.model import build_segcompass
    from segcompass.training.supervised import slot_embedding_keep

    cfg = dataclasses.replace(_cfg(pieces, pieces / "unused"), slot_embedding_dropout=0.5)
    keeps = torch.stack([slot_embedding_keep(cfg, step, 64) for step in range(20)])
    assert 0.4 < keeps.float().mean() < 0.6
    assert torch.equal(keeps[3], slot_embedding_keep(cfg, 3, 64)) and not torch.equal(keeps[3], keeps[4])
    assert slot_embedding_keep(dataclasses.replace(cfg, slot_embedding_dropout=0.0), 3, 64) is None
    rng_before = torch.get_rng_state()
    slot_embedding_keep(cfg, 5, 8)
    assert torch.equal(torch.get_rng_state(), rng_before)  # resume stays exact

    torch.manual_seed(0)
    model = build_segcompass(cfg.model_config(), policy_path=cfg.policy, sae_path=cfg.sae).eval()
    batch = seg_batch(model, "train", 2, seed=0, start=0)
    with torch.no_grad():
        embeddings = model.image_embeddings(batch.images)
        plain = model(batch.model_batch, embeddings)
        dropped = model(batch.model_batch, embeddings, torch.tensor([True, False]))
        zero_e = model.head(plain.codes, plain.slots.token_sample_index,
                            torch.zeros_like(plain.slots.slot_embeddings.float()), embeddings, plain.policy_image)
    torch.testing.assert_close(dropped.head.heatmap_logits[0], plain.head.heatmap_logits[0])
    torch.testing.assert_close(dropped.head.heatmap_logits[1], zero_e.heatmap_logits[1])
    torch.testing.assert_close(dropped.head.confidence_logits[1], zero_e.confidence_logits[1])
    assert not torch.allclose(dropped.head.heatmap_logits[1], plain.head.heatmap_logits[1])


def test_policy_image_keys_are_the_layer_l_image_token_states(pieces):
    """The world head keys on the image tokens' layer-L states (those the SAE reads), taken from
    the same single policy pass; --policy-image-keys off gives the paper's SAM-only keys."""
    from saekit.inputs import TokenType
    from segcompass.training.batching import seg_batch
    from segcompass.model import build_segcompass

    cfg = _cfg(pieces, pieces / "unused")
    torch.manual_seed(0)
    model = build_segcompass(cfg.model_config(), policy_path=cfg.policy, sae_path=cfg.sae).eval()
    batch = seg_batch(model, "train", 2, seed=0, start=0)
    with torch.no_grad():
        out = model(batch.model_batch, model.image_embeddings(batch.images))
        hidden = model.policy(**batch.model_batch.model_inputs, output_hidden_states=True).hidden_states
    is_image = batch.model_batch.token_types == int(TokenType.IMAGE)  # (B, T)
    assert model.head_cfg.policy_image_keys and out.policy_image.shape == (2, 16, 32)  # 4 x 4 grid, d 32
    for b in range(2):
        torch.testing.assert_close(out.policy_image[b], hidden[cfg.sae_layer][b][is_image[b]])
    plain = build_segcompass(dataclasses.replace(cfg, policy_image_keys="off").model_config(),
                             policy_path=cfg.policy, sae_path=cfg.sae).eval()
    assert not plain.head_cfg.policy_image_keys and not hasattr(plain.head.slot_mapper, "policy_key")
    with torch.no_grad():
        assert plain(batch.model_batch, plain.image_embeddings(batch.images)).policy_image is None


def test_hallucination_share_swaps_samples_deterministically(pieces, tmp_path):
    from segcompass.world.scenes import iter_samples
    from segcompass.training.supervised import step_samples

    plain = _cfg(pieces, tmp_path)
    base = [s.sample_id for s in iter_samples("train", plain.batch_size, plain.seed, 3 * plain.batch_size)]
    assert [s.sample_id for s in step_samples(plain, 3)] == base
    every = dataclasses.replace(plain, batch_size=8, hallucination_share=1.0)
    swapped = step_samples(every, 3)
    assert all(s.template_id.startswith("hallucinated/") and s.targets == () for s in swapped)
    assert [s.cot for s in step_samples(every, 3)] == [s.cot for s in swapped]  # keyed by (seed, step)
    half = [s.template_id.startswith("hallucinated/")
            for step in range(20) for s in step_samples(dataclasses.replace(every, hallucination_share=0.5), step)]
    assert 0.35 < sum(half) / len(half) < 0.65
    with pytest.raises(Exception, match="hallucination-share"):
        dataclasses.replace(plain, hallucination_share=1.5)
    with pytest.raises(Exception, match="hallucination-share is for --mode seg"):
        dataclasses.replace(plain, mode="rl+seg", hallucination_share=0.2)


def test_concept_routed_model_reads_its_inputs_only_through_the_codes(tiny_checkpoint, tmp_path):  # noqa: F811
    """--head-routing concepts: the rows the head reads are the concentration and image tokens'
    codes; editing the raw e_k / image states changes nothing, dropping the codes changes the
    masks; and a few training steps run and save a checkpoint that loads back identically."""
    from saekit.inputs import TokenType
    from segcompass.model import load_segcompass
    from segcompass.training.batching import seg_batch
    from segcompass.training.supervised import train

    # the tiny checkpoint's SAE is calibrated so that atoms pass the codebook threshold
    cfg = dataclasses.replace(_cfg(tiny_checkpoint, tmp_path / "run", steps=2), head_routing="concepts",
                              sae_layer=TINY_SAE_LAYER)
    final = train(cfg, progress=False)
    model = load_segcompass(final).eval()
    assert model.head.concept_routed and model.head_cfg.routing == "concepts"
    batch = seg_batch(model, "train", 2, seed=0, start=0)
    with torch.no_grad():
        embeddings = model.image_embeddings(batch.images)
        forward = model(batch.model_batch, embeddings)
        slots, inputs = model.head_inputs(forward.policy, batch.model_batch, embeddings)
        types = batch.model_batch.token_types
        ref = model.ref_token_id
        for b in range(2):  # slot rows point at this sample's concentration tokens, image rows at its image
            rows = inputs.slot_rows[b][inputs.slot_rows[b] >= 0]  # slots past the response's tokens: -1
            assert len(rows) == int(slots.slots_written[b]) and bool((slots.token_sample_index[rows] == b).all())
            assert bool((batch.model_batch.model_inputs["input_ids"][b, slots.token_position[rows]] == ref).all())
            assert bool((types[b, slots.token_position[inputs.image_rows[b]]] == int(TokenType.IMAGE)).all())
        edited = model.run_head(inputs._replace(slot_embeddings=torch.randn_like(inputs.slot_embeddings),
                                                policy_image=torch.randn_like(inputs.policy_image)))
        no_codes = model.run_head(inputs._replace(codes=inputs.codes._replace(values=inputs.codes.values * 0)))
    torch.testing.assert_close(edited.mask_logits, forward.head.mask_logits)
    assert not torch.allclose(no_codes.mask_logits, forward.head.mask_logits)
