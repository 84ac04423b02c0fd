"""Image-text sources on tiny files written here, in the real layouts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from saekit.errors import UserError
from saekit.sources import ImageTextSample, SourceStats, open_source


def _png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def plain_jsonl(tmp_path: Path) -> Path:
    """Six lines: four good images (one grey-level, one with id/response), one missing
    file (line 3), one corrupt file (line 5)."""
    _png(tmp_path / "img" / "a.png", (255, 0, 0))
    _png(tmp_path / "img" / "b.png", (0, 255, 0))
    Image.new("L", (8, 8), 128).save(tmp_path / "img" / "grey.png")
    _png(tmp_path / "img" / "d.png", (0, 0, 255))
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return _write_jsonl(tmp_path / "data.jsonl", [
        {"image": "img/a.png", "text": "a red square"},
        {"image": "img/b.png", "text": "green", "id": "sample-b", "response": "it is green"},
        {"image": "img/missing.png", "text": "nothing here"},
        {"image": str(tmp_path / "img" / "grey.png"), "text": "grey, absolute path"},
        {"image": "img/corrupt.png", "text": "broken"},
        {"image": "img/d.png", "text": "blue"},
    ])


def test_plain_jsonl_reads_in_order_and_counts_skips(plain_jsonl: Path, caplog) -> None:
    source = open_source(plain_jsonl)
    with caplog.at_level(logging.WARNING, logger="saekit.sources"):
        samples = list(source)
    assert source.kind == "jsonl"
    assert [s.text for s in samples] == ["a red square", "green", "grey, absolute path", "blue"]
    assert [s.sample_id for s in samples] == ["data.jsonl:1", "sample-b", "data.jsonl:4", "data.jsonl:6"]
    assert samples[1].response == "it is green" and samples[0].response is None
    assert all(isinstance(s, ImageTextSample) and s.image.mode == "RGB" for s in samples)
    assert np.asarray(samples[0].image)[0, 0].tolist() == [255, 0, 0]
    assert np.asarray(samples[2].image)[0, 0].tolist() == [128, 128, 128]
    assert source.stats.to_dict() == {"seen": 6, "used": 4,
                                      "skipped": {"missing_image": 1, "unreadable_image": 1}}
    messages = [r.getMessage() for r in caplog.records]
    assert any("line 3" in m and "missing.png" in m for m in messages)
    assert any("line 5" in m and "corrupt.png" in m for m in messages)
    assert list(source) == samples  # re-iterable, same order (PIL images compare by pixels)
    assert source.stats.used == 4  # a second pass starts from fresh counts


def test_strict_names_the_file(plain_jsonl: Path) -> None:
    with pytest.raises(UserError, match=r"line 3.*missing\.png"):
        list(open_source(plain_jsonl, strict=True))


def test_max_samples_and_resume_from_a_record(plain_jsonl: Path) -> None:
    source = open_source(plain_jsonl, max_samples=3)
    items = list(source.iter_from(0))
    assert [i.record for i in items] == [0, 1, 3]
    assert source.stats.used == 3
    # Resuming after record 1 with the counts of that moment gives the same tail and counts.
    full = open_source(plain_jsonl)
    all_items = list(full.iter_from(0))
    resumed = open_source(plain_jsonl)
    tail = list(resumed.iter_from(2, SourceStats(seen=2, used=2)))
    assert [i.record for i in tail] == [i.record for i in all_items[2:]]
    assert resumed.stats == full.stats


def test_malformed_lines_name_file_and_line(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", (1, 2, 3))
    bad_json = _write_jsonl(tmp_path / "bad.jsonl", [{"image": "a.png", "text": "ok"}, "{oops"])
    with pytest.raises(UserError, match=r"bad\.jsonl line 2: not valid JSON"):
        list(open_source(bad_json))
    bad_text = _write_jsonl(tmp_path / "bad2.jsonl", [{"image": "a.png", "text": 3}])
    with pytest.raises(UserError, match=r"bad2\.jsonl line 1: field 'text' must be a string"):
        list(open_source(bad_text))
    unknown = _write_jsonl(tmp_path / "unknown.jsonl", [{"picture": "a.png"}])
    with pytest.raises(UserError, match=r"unknown\.jsonl line 1: expected an 'image' field"):
        open_source(unknown)
    with pytest.raises(UserError, match="data not found"):
        open_source(tmp_path / "nope.jsonl")


def _obelics_doc(images: list, texts: list, url: str) -> dict:
    """A record in the published OBELICS layout (metadata fields are JSON strings)."""
    meta = [None if img is None else {"src": img, "alt_text": ""} for img in images]
    return {"images": images, "texts": texts, "metadata": json.dumps(meta),
            "general_metadata": json.dumps({"url": url, "warc_filename": "x.warc.gz"})}


def _obelics_rows(tmp_path: Path) -> list[dict]:
    _png(tmp_path / "pics" / "one.png", (10, 20, 30))
    _png(tmp_path / "pics" / "two.png", (40, 50, 60))
    return [
        # text before the first image is not used; text after it, up to the next image, is
        _obelics_doc([None, "pics/one.png", None, None, "pics/two.png", None],
                     ["intro", None, "first para", "second para", None, "after two"], "u1"),
        _obelics_doc([None], ["text only"], "u2"),                                # no image
        _obelics_doc(["https://cdn.example.com/x.jpg", None], [None, "web"], "u3"),  # URL
        _obelics_doc([None, "pics/two.png"], ["caption before", None], "u4"),     # no text after
        _obelics_doc(["pics/two.png", None], [None, "two's text"], "u5"),
    ]


def test_obelics_jsonl_first_image_and_following_text(tmp_path: Path, caplog) -> None:
    path = _write_jsonl(tmp_path / "obelics.jsonl", _obelics_rows(tmp_path))
    source = open_source(path)
    with caplog.at_level(logging.WARNING, logger="saekit.sources"):
        samples = list(source)
    assert source.kind == "obelics-jsonl"
    assert [s.text for s in samples] == ["first para\n\nsecond para", "two's text"]
    assert np.asarray(samples[0].image)[0, 0].tolist() == [10, 20, 30]
    assert source.stats.to_dict() == {"seen": 5, "used": 2,
                                      "skipped": {"no_image": 1, "no_text": 1, "url_image": 1}}
    assert any("line 3" in r.getMessage() and "cdn.example.com" in r.getMessage()
               and "does not download" in r.getMessage() for r in caplog.records)
    with pytest.raises(UserError, match=r"line 3: image is a URL"):
        list(open_source(path, strict=True))


def test_obelics_malformed_document(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "o.jsonl", [_obelics_doc([None, None], ["a"], "u")])
    with pytest.raises(UserError, match=r"o\.jsonl line 1: OBELICS 'images' \(2\) and 'texts' \(1\)"):
        list(open_source(path))
    both = _write_jsonl(tmp_path / "o2.jsonl", [{"images": ["a.png"], "texts": ["b"]}])
    with pytest.raises(UserError, match=r"line 1: OBELICS position 0 must hold exactly one"):
        list(open_source(both))


def test_datasets_dir_plain_with_corrupt_bytes(tmp_path: Path, caplog) -> None:
    import datasets

    good = Image.new("RGB", (9, 7), (200, 100, 50))
    rows = {"image": [good, {"bytes": b"garbage", "path": "bad.jpg"}, good],
            "caption": ["first", "corrupt", "third"]}
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(UserError, match="expected columns 'image' and 'text'"):
        open_source(tmp_path / "ds")
    source = open_source(tmp_path / "ds", text_column="caption")
    with caplog.at_level(logging.WARNING, logger="saekit.sources"):
        samples = list(source)
    assert source.kind == "datasets"
    assert [s.text for s in samples] == ["first", "third"]
    assert [s.sample_id for s in samples] == ["ds:0", "ds:2"]
    assert samples[0].image.size == (9, 7)
    assert np.asarray(samples[1].image)[0, 0].tolist() == [200, 100, 50]
    assert source.stats.skipped == {"unreadable_image": 1}
    assert any("row 1" in r.getMessage() and "bad.jpg" in r.getMessage() for r in caplog.records)
    with pytest.raises(UserError, match=r"ds row 1: cannot decode image bad\.jpg"):
        list(open_source(tmp_path / "ds", text_column="caption", strict=True))


def test_datasets_dir_obelics_columns(tmp_path: Path) -> None:
    import datasets

    rows = _obelics_rows(tmp_path)
    # Published layout: images as strings (URLs or, after fetching, local paths), and a
    # DatasetDict with one split; relative paths resolve against the folder given.
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(columns)})
    dd.save_to_disk(str(tmp_path / "obelics_dd"))
    (tmp_path / "obelics_dd" / "pics").symlink_to(tmp_path / "pics")
    source = open_source(tmp_path / "obelics_dd")
    assert source.kind == "obelics-datasets"
    assert [s.text for s in source] == ["first para\n\nsecond para", "two's text"]
    assert source.stats.skipped == {"no_image": 1, "no_text": 1, "url_image": 1}
    # Images embedded as an Image sequence (bytes in the arrow file).
    img = Image.new("RGB", (5, 5), (7, 8, 9))
    features = datasets.Features({"images": datasets.List(datasets.Image()),
                                  "texts": datasets.List(datasets.Value("string"))})
    embedded = datasets.Dataset.from_dict(
        {"images": [[None, img, None]], "texts": [["before", None, "after"]]}, features=features)
    embedded.save_to_disk(str(tmp_path / "obelics_embedded"))
    (sample,) = list(open_source(tmp_path / "obelics_embedded"))
    assert sample.text == "after" and np.asarray(sample.image)[0, 0].tolist() == [7, 8, 9]
