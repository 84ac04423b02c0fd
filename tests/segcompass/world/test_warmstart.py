"""Warm start of the tiny policy: labels, a tiny run that saves a loadable HF folder, exact resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

from saekit.errors import UserError
from segcompass.world.scenes import generate
from segcompass.template import REF_TOKEN, THINK_CLOSE, THINK_OPEN, format_response, k_for
from segcompass.world.warmstart import (CHECKPOINT_DIR, EVAL_FILE, MODEL_DIR, WEIGHTS_FILE, WarmstartConfig,
                                  build_policy, caption_example, lr_factor, reference_example,
                                  teacher_batch, train)

TINY = dict(hidden_size=32, n_layers=1, n_heads=2, vision_hidden_size=16, vision_layers=2, image_size=32,
            patch_size=8, batch_size=2, threads=1, warmup_steps=1, vision_steps=2)


def test_labels_cover_exactly_the_response_and_its_end(tmp_path):
    cfg = WarmstartConfig(out=tmp_path, steps=1, **TINY)
    loaded = build_policy(cfg)
    samples = generate("multi", 2, seed=0)
    batch = teacher_batch(loaded, [reference_example(s, 4) for s in samples])
    tokenizer = loaded.tokenizer
    for row, sample in enumerate(samples):
        ids = batch.labels[row][batch.labels[row] != -100].tolist()
        tokens = tokenizer.convert_ids_to_tokens(ids)
        expected = format_response(sample.cot, k_for(sample.multi_prompt)).split() + [tokenizer.eos_token]
        assert tokens == expected
        assert tokens[0] == THINK_OPEN and THINK_CLOSE in tokens and tokens.count(REF_TOKEN) == k_for(True)
    assert tokenizer.unk_token_id not in batch.model_inputs["input_ids"].flatten().tolist()  # complete vocabulary
    captions = teacher_batch(loaded, [caption_example(s, 4) for s in samples])
    assert tokenizer.unk_token_id not in captions.model_inputs["input_ids"].flatten().tolist()
    words = tokenizer.convert_ids_to_tokens(captions.labels[0][captions.labels[0] != -100].tolist())
    assert words[:3] == ["the", "objects", "are"] and words.count("at") == len(samples[0].objects)
    # probe targets: one colour/shape class per vision patch, background 0, both from the same object
    assert batch.patch_targets.shape == (2, 5, 16)
    assert ((batch.patch_targets[:, 0] == 0) == (batch.patch_targets[:, 1] == 0)).all()


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    cfg = WarmstartConfig(steps=100, warmup_steps=10)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0) and lr_factor(100, cfg) == pytest.approx(0.1)


def test_tiny_warmstart_saves_a_loadable_policy(tmp_path):
    from saekit.models import load_model
    from segcompass.world.policy_eval import generate_responses

    result = train(WarmstartConfig(out=tmp_path, steps=3, eval_samples=3, **TINY), progress=False)
    report = json.loads((tmp_path / EVAL_FILE).read_text())
    assert report["n"] == 3 and 0 <= report["format_valid"] <= 1 and report["groups"]["all"]["n"] == 3
    loaded = load_model("tiny-llava", model_path=result.model_dir)
    trained = load_file(tmp_path / CHECKPOINT_DIR / WEIGHTS_FILE)
    assert {k for k in trained if not k.startswith("probe.")} == {f"policy.{k}" for k in loaded.model.state_dict()}
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, trained[f"policy.{name}"]), name
    texts = generate_responses(loaded, generate("val", 2, seed=5), max_new_tokens=6)
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    from transformers import LlavaForConditionalGeneration

    assert LlavaForConditionalGeneration.from_pretrained(tmp_path / MODEL_DIR).config.text_config.hidden_size == 32


def test_resume_continues_identically(tmp_path):
    common = dict(steps=4, checkpoint_every=2, eval_samples=0, **TINY)
    train(WarmstartConfig(out=tmp_path / "straight", **common), progress=False)
    train(WarmstartConfig(out=tmp_path / "resumed", **common), progress=False, stop_after=2)
    state = json.loads((tmp_path / "resumed" / CHECKPOINT_DIR / "state.json").read_text())
    assert state["step"] == 2 and not (tmp_path / "resumed" / MODEL_DIR).exists()
    train(WarmstartConfig(out=tmp_path / "resumed", **common), progress=False)
    a = load_file(tmp_path / "straight" / CHECKPOINT_DIR / WEIGHTS_FILE)
    b = load_file(tmp_path / "resumed" / CHECKPOINT_DIR / WEIGHTS_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match=r"^warmstart: .*checkpoint was written with other settings: "
                                        r"field 'lr' was 0\.002, now 0\.0001; use another --out or --no-resume$"):
        train(WarmstartConfig(out=tmp_path / "resumed", lr=1e-4, **common), progress=False)
    state_file = tmp_path / "resumed" / CHECKPOINT_DIR / "state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["slot_loss_weight"]  # as written before that setting existed
    state_file.write_text(json.dumps(state))
    with pytest.raises(UserError, match=r"field 'slot_loss_weight' was not recorded \(default 1\.0\), now 0\.5"):
        train(WarmstartConfig(out=tmp_path / "resumed", slot_loss_weight=0.5, **common), progress=False)
    # at its default the new setting changes nothing: the old checkpoint resumes (here: is already done)
    train(WarmstartConfig(out=tmp_path / "resumed", **common), progress=False)


def test_init_from_continues_a_finished_warm_start_on_another_split(tmp_path):
    common = dict(eval_samples=0, **TINY)
    train(WarmstartConfig(out=tmp_path / "base", steps=2, **common), progress=False)
    phase = dict(init_from=tmp_path / "base", split="train_absence", steps=2, **common)
    # stop_after=0: the checkpoint written before the first step holds exactly what was loaded
    train(WarmstartConfig(out=tmp_path / "loaded", **phase), progress=False, stop_after=0)
    base = load_file(tmp_path / "base" / CHECKPOINT_DIR / WEIGHTS_FILE)
    loaded = load_file(tmp_path / "loaded" / CHECKPOINT_DIR / WEIGHTS_FILE)
    assert base.keys() == loaded.keys() and all(torch.equal(base[k], loaded[k]) for k in base)
    train(WarmstartConfig(out=tmp_path / "phase", **phase), progress=False)
    after = load_file(tmp_path / "phase" / CHECKPOINT_DIR / WEIGHTS_FILE)
    vision = [k for k in base if ".vision_tower." in k]
    assert vision and all(torch.equal(base[k], after[k]) for k in vision)  # stage 0 skipped, tower frozen
    assert any(not torch.equal(base[k], after[k]) for k in base if ".language_model." in k)
    state = json.loads((tmp_path / "phase" / CHECKPOINT_DIR / "state.json").read_text())
    assert state["vision_pretraining"]["init_from"] == str(tmp_path / "base")
    with pytest.raises(UserError, match="hidden_size: 32 vs 48"):
        train(WarmstartConfig(out=tmp_path / "wide", **{**phase, "hidden_size": 48}), progress=False)
    train(WarmstartConfig(out=tmp_path / "half", steps=4, **common), progress=False, stop_after=2)
    with pytest.raises(UserError, match="unfinished"):
        train(WarmstartConfig(out=tmp_path / "x", **{**phase, "init_from": tmp_path / "half"}), progress=False)
    with pytest.raises(UserError, match="no warm-start checkpoint"):
        WarmstartConfig(init_from=tmp_path / "nowhere")
    with pytest.raises(UserError, match="unknown --split 'tarin'"):
        WarmstartConfig(split="tarin")


def test_quick_flag_changes_only_the_documented_fields():
    from segcompass.world.warmstart import QUICK_OVERRIDES

    cfg = WarmstartConfig(quick=True, lr=1e-3)
    eff = cfg.effective()
    assert eff.lr == 1e-3 and all(getattr(eff, k) == v for k, v in QUICK_OVERRIDES.items())
    with pytest.raises(UserError):
        WarmstartConfig(image_size=60, patch_size=8)


def test_intermediate_size_sets_the_llm_mlp_width():
    cfg = dict(TINY, intermediate_size=24)
    assert build_policy(WarmstartConfig(**cfg)).model.config.text_config.intermediate_size == 24
    assert build_policy(WarmstartConfig(**TINY)).model.config.text_config.intermediate_size == 2 * 32
    with pytest.raises(UserError, match="intermediate-size"):
        WarmstartConfig(intermediate_size=-1)


def test_slot_labels_name_the_answer_line_in_order(tmp_path):
    """Each <REF_POS> of a teacher batch is labelled with the target its answer line names
    in that position (left to right), 'none' (0) past the last target; captions add none."""
    from segcompass.world.render import COLOURS, SHAPES
    from segcompass.world.policy_eval import parse_answer

    loaded = build_policy(WarmstartConfig(out=tmp_path, steps=1, **TINY))
    samples = [s for s in generate("multi", 12, seed=0)][:6]
    batch = teacher_batch(loaded, [reference_example(s, 4) for s in samples] + [caption_example(samples[0], 4)])
    ref_id = loaded.tokenizer.convert_tokens_to_ids(REF_TOKEN)
    assert (batch.model_inputs["input_ids"][batch.slot_rows, batch.slot_positions] == ref_id).all()
    assert batch.slot_rows.tolist() == [row for row in range(len(samples)) for _ in range(k_for(True))]
    for row, sample in enumerate(samples):
        named = parse_answer(sample.cot)
        expected = [(1 + list(COLOURS).index(c), 1 + SHAPES.index(s)) for c, s in named]
        expected += [(0, 0)] * (k_for(True) - len(expected))
        assert [tuple(l) for l in batch.slot_labels[batch.slot_rows == row].tolist()] == expected
    assert any(len(parse_answer(s.cot)) >= 2 for s in samples) and any(not parse_answer(s.cot) for s in samples)


def test_word_separation_loss_hand_computed_and_pushes_collapsed_words_apart():
    from segcompass.world.probes import word_separation_loss

    # words 0 and 1 at cosine 0.8, word 2 orthogonal to both, word 3 not in the id list
    embeddings = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 2.0], [1.0, 0.0, 0.0]],
                              requires_grad=True)
    ids = torch.tensor([0, 1, 2])
    loss = word_separation_loss(embeddings, ids, margin=0.3)
    assert loss.item() == pytest.approx((0.8 - 0.3) ** 2 / 3)
    loss.backward()
    assert embeddings.grad[3].abs().sum() == 0 and embeddings.grad[2].abs().sum() < 1e-7
    moved = embeddings.detach() - 0.5 * embeddings.grad
    cos = torch.nn.functional.cosine_similarity(moved[0], moved[1], dim=0)
    assert cos < 0.8  # a gradient step separates the collapsed pair
    assert word_separation_loss(embeddings, ids, margin=0.9).item() == 0.0
    with pytest.raises(UserError, match="word-separation-margin"):
        WarmstartConfig(word_separation_margin=-0.1)


def test_probe_positions_are_the_covering_objects_own_position():
    from segcompass.world.render import COLUMNS, ROWS, patch_objects
    from segcompass.world.probes import centre_cells, patch_targets

    for sample in generate("train", 6, seed=0):
        owner = patch_objects(sample.labels, 8)  # (8, 8), -1 = background
        by_object = patch_targets(sample, 8)
        by_patch = patch_targets(sample, 8, object_position=False)
        cells = centre_cells(sample, 8)
        for row, col in zip(*(owner >= 0).nonzero()):
            obj = sample.objects[owner[row, col]]
            assert f"{ROWS[by_object[3, row, col]]} {COLUMNS[by_object[4, row, col]]}" == obj.position
            assert tuple(cells[:, row, col]) == (int(obj.centre[1]) // 16, int(obj.centre[0]) // 16)
        background = owner < 0
        assert (by_object[:3] == by_patch[:3]).all() and (by_object[3:, background] == by_patch[3:, background]).all()
        assert (cells[:, background] == -1).all()
        assert (by_patch[3] == (3 * (torch.arange(8) + 0.5) / 8).long()[:, None].numpy()).all()  # patch's own third
