"""The embedded world: determinism, masks, instructions that mean what they say, held-out splits."""

import hashlib
import json
import re

import numpy as np
import pytest

from segcompass.world.scenes import (SPLITS, WorldSample, export_jsonl, export_png, generate, make_sample,
                                   world_vocabulary)
from segcompass.world.language import FAMILIES, MAX_TARGETS, PROPERTIES, RELATIONS, TEMPLATES, phrasing_of
from segcompass.world.render import (COLOURS, SIZE_RANK, SIZES, Placement, layout, render, scene_objects,
                                          stencil)
from segcompass.world.policy_eval import parse_answer

N_PER_SPLIT = 300


@pytest.fixture(scope="module")
def samples() -> dict[str, list[WorldSample]]:
    return {split: generate(split, N_PER_SPLIT, seed=0) for split in SPLITS}


def _digest(samples: list[WorldSample]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(s.image.tobytes())
        h.update(np.packbits(s.target_masks).tobytes())
        h.update(json.dumps([s.sample_id, s.instruction, s.cot, s.template_id, s.targets, s.inventory]).encode())
    return h.hexdigest()


def test_same_seed_same_bytes_and_samples_regenerate_alone():
    first, again, other = generate("val", 12, seed=3), generate("val", 12, seed=3), generate("val", 12, seed=4)
    assert _digest(first) == _digest(again)
    assert _digest(first) != _digest(other)
    alone = make_sample("val", 7, seed=3)
    assert _digest([alone]) == _digest([first[7]])
    assert generate("train", 3, seed=3)[0].image.tobytes() != first[0].image.tobytes()  # splits differ


def test_split_codes_are_unique():
    codes = [spec.code for spec in SPLITS.values()]
    assert len(set(codes)) == len(codes)


def test_families_present_where_expected(samples):
    expected = {
        "train": set(FAMILIES), "val": set(FAMILIES),
        "testA": {"direct", "attribute", "spatial", "indirect"},
        "testB": {"direct", "attribute", "spatial", "indirect"},
        "multi": set(FAMILIES), "reason": {"attribute", "spatial", "indirect", "multi"},
        "train_absence": set(FAMILIES),
    }
    for split, found in samples.items():
        assert {s.family for s in found} == expected[split], split
    multi = samples["multi"]
    assert all(s.multi_prompt for s in multi)
    assert any(len(s.targets) == 0 for s in multi) and any(len(s.targets) >= 2 for s in multi)
    assert any(len(s.targets) == 1 for s in multi)
    assert all(len(s.targets) == 1 and not s.multi_prompt for split in ("testA", "testB") for s in samples[split])


def test_reason_split_shares_no_template_or_phrasing_with_train(samples):
    train_ids = {s.template_id for s in samples["train"]}
    reason_ids = {s.template_id for s in samples["reason"]}
    assert train_ids.isdisjoint(reason_ids)
    assert all(t.startswith("reason/") for t in reason_ids)
    # Every trained template occurs in train, so "not seen in 300 samples" means "never".
    assert train_ids == {t.template_id for t in TEMPLATES if not t.held_out}
    train_phrasings = {phrasing_of(s.instruction) for s in samples["train"]}
    reason_phrasings = {phrasing_of(s.instruction) for s in samples["reason"]}
    assert train_phrasings.isdisjoint(reason_phrasings)
    # …and statically, over the templates themselves.
    assert {t.phrasing for t in TEMPLATES if t.held_out}.isdisjoint({t.phrasing for t in TEMPLATES if not t.held_out})
    assert train_phrasings == {t.phrasing for t in TEMPLATES if not t.held_out}


def test_scene_distributions(samples):
    for split, found in samples.items():
        lo, hi = SPLITS[split].n_objects
        assert all(lo <= len(s.objects) <= hi for s in found), split
        for s in found:
            pairs = [(o.colour, o.shape) for o in s.objects]
            assert len(set(pairs)) == len(pairs)  # names are unique within a scene
            assert all(o.area >= SPLITS[split].min_visible * o.full_area for o in s.objects)
    assert all(o.area == o.full_area for s in samples["testA"] for o in s.objects)  # sparse: no occlusion
    occluded = np.mean([any(o.area < o.full_area for o in s.objects) for s in samples["testB"]])
    assert occluded > 0.3  # cluttered


def test_masks_are_visible_pixels_after_painting_order():
    a = Placement("square", "red", "large", 40, 40)
    b = Placement("circle", "blue", "medium", 40, 52)  # painted later, overlaps a's right side
    scene = layout([a, b])
    objects = scene_objects([a, b], scene)
    full_a = np.zeros((128, 128), bool)
    full_a[40 - 19:40 + 20, 40 - 19:40 + 20] = stencil("square", "large")
    full_b = np.zeros((128, 128), bool)
    full_b[40 - 14:40 + 15, 52 - 14:52 + 15] = stencil("circle", "medium")
    assert np.array_equal(objects[1].mask, full_b)
    assert np.array_equal(objects[0].mask, full_a & ~full_b)
    assert objects[0].area == (full_a & ~full_b).sum() < objects[0].full_area == full_a.sum()
    ys, xs = np.nonzero(objects[0].mask)
    assert objects[0].bbox == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    image = render([a, b], scene, np.random.default_rng(0))
    for obj in objects:  # painted colour = named colour ± jitter (12) ± noise (7)
        mean = image[obj.mask].astype(float).mean(axis=0)
        assert np.all(np.abs(mean - np.clip(COLOURS[obj.colour], 7, 241)) <= 19)


def test_stencils_have_distinct_shapes_and_ordered_sizes():
    for size in SIZES:
        masks = {shape: stencil(shape, size) for shape in ("circle", "square", "triangle", "diamond", "star", "cross")}
        assert len({m.tobytes() for m in masks.values()}) == len(masks)
    for shape in ("circle", "star"):
        areas = [stencil(shape, s).sum() for s in SIZES]
        assert areas == sorted(areas) and len(set(areas)) == 3


def test_sample_masks_and_answers_match_the_inventory(samples):
    for found in samples.values():
        for s in found:
            assert s.target_masks.shape == (len(s.targets), 128, 128) and s.target_masks.dtype == bool
            for mask, index in zip(s.target_masks, s.targets):
                assert np.array_equal(mask, s.objects[index].mask)
            union = np.zeros((128, 128), int)
            for o in s.objects:
                union += o.mask
            assert union.max() <= 1  # instance masks never overlap
            assert sorted(parse_answer(s.cot)) == sorted((s.objects[i].colour, s.objects[i].shape) for i in s.targets)
            assert len(s.targets) <= MAX_TARGETS


def _by_name(sample: WorldSample, colour: str, shape: str):
    return next(o for o in sample.objects if (o.colour, o.shape) == (colour, shape))


def _direction(anchor, other, relation: str) -> bool:
    dx, dy = other.centre[0] - anchor.centre[0], other.centre[1] - anchor.centre[1]
    along = {"left of": -dx, "right of": dx, "above": -dy, "below": dy}[relation]
    across = dy if relation in ("left of", "right of") else dx
    return along > 0 and abs(across) < along


def test_instructions_mean_what_they_say(samples):
    """Re-derive each family's referents from the inventory with independent code."""
    colours, shapes = "|".join(COLOURS), "circle|square|triangle|diamond|star|cross"
    relations = "|".join(RELATIONS)
    checked = set()
    for s in [x for found in samples.values() for x in found]:
        targets = {s.objects[i].name for i in s.targets}
        text = s.instruction
        if m := re.fullmatch(rf"the (?:(small|medium|large) )?({colours}) ({shapes})", text):
            present = {o.name for o in s.objects}
            name = f"{m[2]} {m[3]}"
            assert targets == ({name} if name in present else set())
            if m[1] and targets:
                assert _by_name(s, m[2], m[3]).size == m[1]
        elif m := re.fullmatch(rf"the (largest|smallest) (?:({colours}) object|({shapes})|object)", text):
            group = [o for o in s.objects if (m[2] is None or o.colour == m[2]) and (m[3] is None or o.shape == m[3])]
            (target,) = [s.objects[i] for i in s.targets]
            sign = 1 if m[1] == "largest" else -1
            assert all(sign * SIZE_RANK[target.size] > sign * SIZE_RANK[o.size] for o in group if o is not target)
        elif m := re.fullmatch(rf"the shape ({relations}) the ({colours}) ({shapes})", text):
            anchor = _by_name(s, m[2], m[3])
            assert targets == {o.name for o in s.objects if o is not anchor and _direction(anchor, o, m[1])}
        elif m := re.fullmatch(r"the object with the same colour as the (\w+)", text):
            (anchor,) = [o for o in s.objects if o.shape == m[1]]
            assert targets == {o.name for o in s.objects if o.colour == anchor.colour and o is not anchor}
        elif text in PROPERTIES.values():
            shape = next(k for k, v in PROPERTIES.items() if v == text)
            assert targets == {o.name for o in s.objects if o.shape == shape}
        elif m := re.fullmatch(rf"(?:all the|every) ({colours}) (?:objects|shape)", text):
            assert targets == {o.name for o in s.objects if o.colour == m[1]}
        elif m := re.fullmatch(r"all the (\w+)", text):
            assert targets == {o.name for o in s.objects if o.shape + ("es" if o.shape == "cross" else "s") == m[1]}
        else:
            continue
        checked.add(s.template_id)
    assert len(checked) >= 12


def test_vocabulary_covers_every_instruction_and_cot(samples):
    vocab = set(world_vocabulary())
    used = {w for found in samples.values() for s in found for w in f"{s.instruction} {s.cot}".split()}
    assert used <= vocab
    assert len(vocab) < 120  # small enough for a from-scratch tiny policy


def test_to_seg_sample_and_exports(tmp_path):
    from PIL import Image

    found = generate("multi", 6, seed=1)
    seg = found[0].to_seg_sample()
    assert seg.dataset == "world" and seg.instructions == (found[0].instruction,)
    assert seg.meta["template_id"] == found[0].template_id and len(seg.meta["inventory"]) == len(found[0].objects)
    assert np.array_equal(seg.target_masks, found[0].target_masks)
    assert any(s.to_seg_sample().is_no_target for s in generate("multi", 30, seed=1))

    path = export_jsonl(found, tmp_path / "jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 6 and lines[0]["text"].startswith(found[0].instruction)
    assert found[0].cot in lines[0]["text"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "jsonl" / lines[0]["image"])), found[0].image)

    path = export_png(found, tmp_path / "png")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for s, record in zip(found, records):
        masks = [np.asarray(Image.open(tmp_path / "png" / m)) > 0 for m in record["masks"]]
        assert len(masks) == len(s.targets)
        assert all(np.array_equal(a, b) for a, b in zip(masks, s.target_masks))


def test_world_cli(tmp_path, capsys):
    from segcompass.cli import main

    assert main(["world", "--split", "reason", "--n", "4", "--seed", "2", "--out", str(tmp_path), "--no-progress"]) == 0
    assert len((tmp_path / "data.jsonl").read_text().splitlines()) == 4
    assert "4 reason samples" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["world", "--split", "nope", "--n", "1", "--out", str(tmp_path)])


def test_patch_objects_assigns_each_patch_its_majority_object():
    from segcompass.world.render import patch_objects

    labels = np.full((8, 8), -1, dtype=np.int16)  # 2×2 grid of 4×4 patches
    labels[0:4, 0:4] = 0  # patch (0, 0): object 0 everywhere
    labels[0:2, 4:8] = 1  # patch (0, 1): object 1 on 8 of 16 pixels, object 0 on 6
    labels[2:4, 4:7] = 0
    labels[4, 0] = 1  # patch (1, 0): one pixel (< 25 %) -> background
    assert patch_objects(labels, 2).tolist() == [[0, 1], [-1, -1]]
    assert patch_objects(np.full((8, 8), -1, dtype=np.int16), 2).tolist() == [[-1, -1], [-1, -1]]


def test_prompt_does_not_reveal_whether_a_target_exists(samples, monkeypatch):
    """In train/val a single-target instruction is sometimes asked with the K-slot prompt, so
    'the {C} {S}' under that prompt is not always a no-target case (a warm-started policy
    learned exactly that shortcut), and changing the share changes nothing but the prompt."""
    import dataclasses

    import segcompass.world.scenes as world

    train = generate("train", 400, seed=0)
    single = [s for s in train if len(s.targets) == 1]
    share = np.mean([s.multi_prompt for s in single])
    assert 0.15 < share < 0.35  # multi_prompt_share 0.25
    assert all(s.multi_prompt for s in train if s.family in ("multi", "no_target"))
    assert not any(s.multi_prompt for split in ("testA", "testB", "reason") for s in samples[split]
                   if s.family not in ("multi", "no_target"))
    monkeypatch.setitem(world.SPLITS, "train", dataclasses.replace(world.SPLITS["train"], multi_prompt_share=0.0))
    for s in train[:40]:
        again = make_sample("train", int(s.sample_id.rsplit("-", 1)[1]), seed=0)
        assert again.image.tobytes() == s.image.tobytes() and again.instruction == s.instruction
        assert again.multi_prompt == (s.family in ("multi", "no_target"))


def test_hallucinated_samples_name_an_absent_object_and_have_no_target():
    from segcompass.world.scenes import hallucinated_sample
    from segcompass.world.language import HALLUCINATIONS

    seen = set()
    for index in range(40):
        sample = make_sample("train", index, seed=0)
        twin = hallucinated_sample(sample, np.random.default_rng([0, index]))
        again = hallucinated_sample(sample, np.random.default_rng([0, index]))
        assert twin is not None and (twin.instruction, twin.cot) == (again.instruction, again.cot)
        seen.add(twin.template_id)
        named = parse_answer(twin.cot)
        present = {(o.colour, o.shape) for o in sample.objects}
        assert named and not present & set(named), (twin.instruction, twin.cot)  # names something, all absent
        assert twin.targets == () and twin.target_masks.shape == (0, *sample.image.shape[:2])
        assert twin.multi_prompt and twin.family == "no_target" and twin.image is sample.image
        assert twin.cot.startswith(f"the instruction asks for {twin.instruction} .")
        # near misses: each named object shares its colour or its shape with one in the scene
        assert all(c in {o.colour for o in sample.objects} or s in {o.shape for o in sample.objects}
                   for c, s in named)
    assert seen == set(HALLUCINATIONS)


def test_template_weights_shift_the_draw_within_a_family():
    import collections

    from segcompass.world.scenes import SplitSpec

    from segcompass.world.scenes import NO_TARGET_RELATION_MIX, _draw_template

    families, weights = NO_TARGET_RELATION_MIX
    spec = SplitSpec(9, (2, 7), (0.3, 0.4, 0.3), 0.8, 0.5, families, template_weights=weights)
    rng = np.random.default_rng(0)
    counts = collections.Counter(t.template_id for t in (_draw_template(spec, rng) for _ in range(4000))
                                 if t.family == "no_target")
    ratio = counts["no_target/shape_rel"] / ((counts["no_target/colour_shape"] + counts["no_target/all_colour"]) / 2)
    assert 1.6 < ratio < 2.5, counts  # shape_rel weighted 2 : 1 : 1
    with pytest.raises(ValueError, match="unknown template ids"):
        SplitSpec(9, (2, 3), (0.3, 0.4, 0.3), 0.8, 0.5, {"direct": 1.0}, template_weights={"direct/nope": 2.0})
    with pytest.raises(ValueError, match="must be > 0"):
        SplitSpec(9, (2, 3), (0.3, 0.4, 0.3), 0.8, 0.5, {"direct": 1.0}, template_weights={"direct/colour_shape": 0})
