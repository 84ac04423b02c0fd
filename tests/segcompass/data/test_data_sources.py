"""Sample sources: the `--data` syntax, one item per expression, the training stream (world as
before, seeded mixtures, epochs), and the bad inputs a real dataset brings (missing image,
unknown split, a ref without a mask) as one-line errors or counted skips."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from loaders_fixtures import build_grefcoco, build_reasonseg, build_refcoco
from saekit.errors import UserError
from segcompass.data.sources import TrainStream, eval_items, open_split, parse_data, parse_data_list
from segcompass.world.scenes import make_sample


@pytest.fixture(scope="module")
def roots(fixtures_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("sources")
    build_reasonseg(fixtures_dir, base / "ReasonSeg" / "val")
    build_reasonseg(fixtures_dir, base / "ReasonSeg" / "train")
    build_reasonseg(fixtures_dir, base / "flat")
    return {"refcoco": build_refcoco(fixtures_dir, base / "refer"),
            "grefcoco": build_grefcoco(fixtures_dir, base / "gref"),
            "reasonseg": base / "ReasonSeg", "flat": base / "flat"}


def test_spec_syntax():
    assert parse_data("world") == ("world", None, 1.0, "world")
    spec = parse_data("refcoco+:/data/refer@0.25")
    assert (spec.kind, spec.path, spec.weight) == ("refcoco+", Path("/data/refer"), 0.25)
    assert parse_data("reasonseg:/a@b").path == Path("/a@b")  # not a number: the '@' is the path's
    assert [s.kind for s in parse_data_list(["world@2", "grefcoco:/g"])] == ["world", "grefcoco"]
    for bad, message in [("coco:/x", "unknown source 'coco'"), ("refcoco", "refcoco needs its folder"),
                         ("world:/x", "the world takes no folder"), ("refcoco:/x@0", "positive number"),
                         ("refcoco:/x@-1", "positive number")]:
        with pytest.raises(UserError, match=message):
            parse_data(bad)


def test_every_expression_is_one_item_and_each_dataset_its_prompt(roots):
    refcoco = open_split(parse_data(f"refcoco:{roots['refcoco']}"), "val")
    items = list(eval_items(refcoco, None))
    # val refs 1 (two sentences), 2 and 5: four expressions, single-object prompt
    assert [i.sample_id for i in items] == ["1#0", "1#1", "2#0", "5#0"]
    assert [i.instruction for i in items[:2]] == ["the bottle", "green bottle on the table"]
    assert not any(i.multi_prompt for i in items) and items[1].meta["sent_id"] == 2
    assert len(list(eval_items(refcoco, 2))) == 2
    gref = list(eval_items(open_split(parse_data(f"grefcoco:{roots['grefcoco']}"), "val"), None))
    assert [len(i.target_masks) for i in gref] == [4, 4, 0, 1] and all(i.multi_prompt for i in gref)
    reason = list(eval_items(open_split(parse_data(f"reasonseg:{roots['reasonseg']}"), "val"), None))
    assert len(reason) == 3 and reason[0].ignore_mask is not None and not reason[0].multi_prompt
    flat = open_split(parse_data(f"reasonseg:{roots['flat']}"), "test")  # a folder of jsons is its only split
    assert flat.size == 3


def test_unknown_split_and_missing_folder_are_one_line_errors(roots, tmp_path):
    with pytest.raises(UserError, match=r"unknown split 'testC'; this file has: testA, testB, train, val"):
        open_split(parse_data(f"refcoco:{roots['refcoco']}"), "testC")
    with pytest.raises(UserError, match=r"no ReasonSeg split 'test'; present: train, val"):
        open_split(parse_data(f"reasonseg:{roots['reasonseg']}"), "test")
    with pytest.raises(UserError, match="unknown world split 'testC'"):
        open_split(parse_data("world"), "testC")
    with pytest.raises(UserError, match="does not exist"):
        open_split(parse_data(f"grefcoco:{tmp_path / 'nowhere'}"), "val")
    with pytest.raises(UserError, match=r"no refs\(google\)\.p; present: refs\(unc\)\.p"):
        open_split(parse_data(f"refcoco:{roots['refcoco']}"), "val", split_by="google")


def test_a_missing_image_is_refused_before_any_sample_is_built(fixtures_dir, tmp_path):
    root = build_refcoco(fixtures_dir, tmp_path / "refer")
    (root / "images/mscoco/images/train2014/COCO_train2014_000000000025.jpg").unlink()
    with pytest.raises(UserError, match=r"COCO_train2014_000000000025\.jpg: image not found; .*refs\(unc\)\.p"):
        open_split(parse_data(f"refcoco:{root}"), "val")
    gref = build_grefcoco(fixtures_dir, tmp_path / "gref")
    (gref / "images/train2014/COCO_train2014_000000000025.jpg").unlink()  # train ref 3's image
    with pytest.raises(UserError, match=r"000000000025\.jpg: image not found; .*grefs\(unc\)\.json \(split train\)"):
        TrainStream([parse_data(f"grefcoco:{gref}")], seed=0, total=4)


def test_world_stream_is_the_world_train_split_as_before():
    stream = TrainStream([parse_data("world")], seed=3, total=10)
    for g in (0, 7, 123):  # positions past `total` too: the world alone needs no draw
        assert stream[g].sample_id == make_sample("train", g, 3).sample_id


def test_mixture_is_seeded_weighted_and_reads_each_dataset_in_epochs(roots):
    specs = parse_data_list([f"refcoco:{roots['refcoco']}@3", f"reasonseg:{roots['reasonseg']}@1"])
    stream = TrainStream(specs, seed=0, total=400)
    again = TrainStream(specs, seed=0, total=400)
    assert [stream[g].sample_id for g in range(40)] == [again[g].sample_id for g in range(40)]
    share = float((stream.choice == 0).mean())
    assert 0.68 < share < 0.82  # weight 3 : 1
    other = TrainStream(specs, seed=1, total=400)
    assert [stream[g].family for g in range(40)] != [other[g].family for g in range(40)]
    # refcoco train has one ref with one sentence; ReasonSeg train three questions: each epoch reads all
    reason = [stream[g].sample_id for g in range(400) if stream.choice[g] == 1]
    for epoch in range(len(reason) // 3):
        assert sorted(reason[3 * epoch:3 * epoch + 3]) == sorted(set(reason))


def test_a_ref_without_a_mask_is_skipped_and_counted_in_training_kept_in_evaluation(fixtures_dir, tmp_path):
    root = build_refcoco(fixtures_dir, tmp_path / "refer")
    refs_path = root / "refcoco" / "refs(unc).p"
    refs = pickle.loads(refs_path.read_bytes())
    for ref in refs:
        if ref["ref_id"] in (2, 5):  # two more training refs
            ref["split"] = "train"
    refs_path.write_bytes(pickle.dumps(refs, protocol=2))
    instances = json.loads((root / "refcoco" / "instances.json").read_text())
    next(a for a in instances["annotations"] if a["id"] == 100)["segmentation"] = []  # ref 0 loses its mask
    (root / "refcoco" / "instances.json").write_text(json.dumps(instances))
    stream = TrainStream([parse_data(f"refcoco:{root}")], seed=0, total=12)
    ids = [stream[g].sample_id for g in range(12)]
    assert "0#0" not in ids and set(ids) == {"2#0", "5#0"}
    assert stream.skipped_empty >= 1
    items = list(eval_items(open_split(parse_data(f"refcoco:{root}"), "train"), None))
    assert "0#0" in [i.sample_id for i in items]  # evaluation keeps it (LISA: an empty target)
    assert not np.asarray(next(i for i in items if i.sample_id == "0#0").target_masks).any()
