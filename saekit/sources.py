"""Image–text data sources: plain JSONL, OBELICS interleaved documents, `datasets` folders.

Every source yields `ImageTextSample`s in one fixed order. Records whose image is
missing, unreadable or a URL (nothing is downloaded) are skipped with a warning that
names the file and record, and counted in `source.stats`; with `strict=True` they
stop the run with a `UserError` instead.

OBELICS (HuggingFaceM4/OBELICS) stores one web document per row: `images` and `texts`
are parallel lists in which exactly one of the two is non-null at each position
(`images` holds URLs in the published data), plus the strings `metadata` (a JSON list,
one entry per position) and `general_metadata` (a JSON dict with the document URL).
As in the paper (after SAE-V), a document gives one sample: its first image and the
text paragraphs that follow it up to the next image.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

from PIL import Image

from saekit.errors import UserError

log = logging.getLogger(__name__)

# Reasons a record is skipped; the keys of `SourceStats.skipped`.
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
URL_IMAGE = "url_image"
NO_IMAGE = "no_image"
NO_TEXT = "no_text"
IMAGE_PROBLEMS = (MISSING_IMAGE, UNREADABLE_IMAGE, URL_IMAGE)  # fatal under strict=True

WARNINGS_PER_REASON = 20  # after this many, a reason is only counted (a 10%-broken crawl
                          # must not bury the progress bar under a million lines)
DATASETS_READ_ROWS = 64   # rows pulled from an arrow table at a time


class ImageTextSample(NamedTuple):
    """One image with its text, ready for `saekit.inputs.build_batch`."""

    sample_id: str
    """Stable id: the record's own `id`, else `<file>:<line>` / `<dataset dir>:<row>`."""
    image: Image.Image
    """The decoded image, RGB."""
    text: str
    """The prompt text (for OBELICS: the paragraphs after the first image)."""
    response: str | None
    """An optional response appended after the prompt (tagged RESPONSE in capture)."""


class SourceItem(NamedTuple):
    """A sample with the position of the record it came from (for resuming)."""

    record: int
    """0-based index of the record in the underlying file or table (lines count blank ones)."""
    sample: ImageTextSample


@dataclasses.dataclass
class SourceStats:
    """Counts of records read, samples yielded, and records skipped by reason."""

    seen: int = 0
    used: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "used": self.used, "skipped": dict(sorted(self.skipped.items()))}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SourceStats":
        return cls(seen=int(data["seen"]), used=int(data["used"]), skipped=dict(data["skipped"]))


class _Skip(Exception):
    """A record that gives no sample; `reason` is one of the skip reasons above."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# A record reader yields (record index, raw record dict, where) from a start record;
# `where` names the record in messages ("data.jsonl line 7").
RecordReader = Callable[[int], Iterator[tuple[int, dict[str, Any], str]]]
# A record parser turns a raw record into a sample or raises _Skip / UserError.
RecordParser = Callable[[int, dict[str, Any], str], ImageTextSample]


class Source:
    """An ordered, re-iterable stream of `ImageTextSample`s with skip statistics."""

    def __init__(self, *, kind: str, path: Path, read: RecordReader, parse: RecordParser,
                 n_records: int | None, strict: bool, max_samples: int | None,
                 details: dict[str, Any]):
        self.kind = kind
        self.path = path
        self.n_records = n_records
        self.strict = strict
        self.max_samples = max_samples
        self.stats = SourceStats()
        self._read = read
        self._parse = parse
        self._details = details
        self._warned: dict[str, int] = {}

    def describe(self) -> dict[str, Any]:
        """What this source is, for manifests: kind, path, record count, column names."""
        return {"kind": self.kind, "path": str(self.path), "n_records": self.n_records,
                "strict": self.strict, "max_samples": self.max_samples, **self._details}

    def __iter__(self) -> Iterator[ImageTextSample]:
        return (item.sample for item in self.iter_from(0))

    def iter_from(self, record: int, stats: SourceStats | None = None) -> Iterator[SourceItem]:
        """Yield samples from record `record` on, counting into `stats` (fresh if None).

        A resumed run passes the record after the last one it used and the stats it had
        then, so its counts and `max_samples` limit continue as if it never stopped.
        """
        self.stats = SourceStats.from_dict(stats.to_dict()) if stats else SourceStats()
        self._warned = {}
        if self.max_samples is not None and self.stats.used >= self.max_samples:
            return
        for index, raw, where in self._read(record):
            self.stats.seen += 1
            try:
                sample = self._parse(index, raw, where)
            except _Skip as skip:
                self._skip(skip)
                continue
            self.stats.used += 1
            yield SourceItem(index, sample)
            if self.max_samples is not None and self.stats.used >= self.max_samples:
                return

    def _skip(self, skip: _Skip) -> None:
        if self.strict and skip.reason in IMAGE_PROBLEMS:
            raise UserError(f"{skip} (strict mode: fix or remove the record, or drop --strict)")
        self.stats.skipped[skip.reason] = self.stats.skipped.get(skip.reason, 0) + 1
        shown = self._warned.get(skip.reason, 0)
        if shown < WARNINGS_PER_REASON:
            log.warning("skipped: %s", skip)
        elif shown == WARNINGS_PER_REASON:
            log.warning("further '%s' records are counted in the stats but not reported",
                        skip.reason)
        self._warned[skip.reason] = shown + 1


# ---------------------------------------------------------------------------- images

def _is_url(ref: str) -> bool:
    return ref.split("://", 1)[0].lower() in ("http", "https", "ftp", "s3", "gs")


def load_image_file(path: Path, where: str) -> Image.Image:
    """Open an image file as RGB; a missing or undecodable file raises `_Skip`."""
    if not path.is_file():
        raise _Skip(MISSING_IMAGE, f"{where}: image file not found: {path}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # convert() decodes fully, so truncation shows here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise _Skip(UNREADABLE_IMAGE, f"{where}: cannot decode image {path}: {err}") from None


def _load_image_bytes(data: bytes, name: str, where: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise _Skip(UNREADABLE_IMAGE, f"{where}: cannot decode image {name}: {err}") from None


def load_image_ref(ref: Any, base: Path, where: str) -> Image.Image:
    """Decode an image given as a path (relative to `base`), URL, bytes, PIL image, or a
    `datasets` Image struct `{"bytes": ..., "path": ...}`."""
    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    if isinstance(ref, (bytes, bytearray)):
        return _load_image_bytes(bytes(ref), "<bytes>", where)
    if isinstance(ref, dict) and ("bytes" in ref or "path" in ref):
        if ref.get("bytes"):
            return _load_image_bytes(ref["bytes"], ref.get("path") or "<bytes>", where)
        ref = ref.get("path")
    if ref is None or ref == "":
        raise _Skip(NO_IMAGE, f"{where}: the record has no image")
    if isinstance(ref, str):
        if _is_url(ref):
            raise _Skip(URL_IMAGE, f"{where}: image is a URL, which saekit does not download: "
                                   f"{ref} (fetch the images first, e.g. with img2dataset, and "
                                   "give local paths)")
        path = Path(ref).expanduser()
        return load_image_file(path if path.is_absolute() else base / path, where)
    raise UserError(f"{where}: image must be a path, URL or image bytes, got {type(ref).__name__}")


# ----------------------------------------------------------------------- parsing rows

def _text_field(raw: dict[str, Any], key: str, where: str, *, required: bool) -> str | None:
    value = raw.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _plain_parser(base: Path, image_column: str, text_column: str, default_id: Callable[[int], str]
                  ) -> RecordParser:
    def parse(index: int, raw: dict[str, Any], where: str) -> ImageTextSample:
        if image_column not in raw:
            raise UserError(f"{where}: no '{image_column}' field (fields: {sorted(raw)})")
        text = _text_field(raw, text_column, where, required=True)
        response = _text_field(raw, "response", where, required=False)
        sample_id = str(raw["id"]) if raw.get("id") is not None else default_id(index)
        image = load_image_ref(raw[image_column], base, where)
        return ImageTextSample(sample_id, image, text or "", response)
    return parse


def obelics_first_image_text(images: list[Any], texts: list[Any], where: str) -> tuple[int, str]:
    """The position of a document's first image and the paragraphs after it, up to the
    next image, joined by blank lines. Raises `_Skip` if there is no image or no text."""
    if not isinstance(images, list) or not isinstance(texts, list):
        raise UserError(f"{where}: OBELICS 'images' and 'texts' must be lists")
    if len(images) != len(texts):
        raise UserError(f"{where}: OBELICS 'images' ({len(images)}) and 'texts' ({len(texts)}) "
                        "must be parallel lists of the same length")
    for pos, (img, txt) in enumerate(zip(images, texts)):
        if (img is None) == (txt is None):
            raise UserError(f"{where}: OBELICS position {pos} must hold exactly one of an image "
                            "and a text (the other null)")
    first = next((pos for pos, img in enumerate(images) if img is not None), None)
    if first is None:
        raise _Skip(NO_IMAGE, f"{where}: document has no image")
    paragraphs: list[str] = []
    for img, txt in zip(images[first + 1:], texts[first + 1:]):
        if img is not None:
            break
        if not isinstance(txt, str):
            raise UserError(f"{where}: OBELICS texts must be strings, got {type(txt).__name__}")
        if txt.strip():
            paragraphs.append(txt)
    if not paragraphs:
        raise _Skip(NO_TEXT, f"{where}: no text follows the document's first image")
    return first, "\n\n".join(paragraphs)


def _obelics_parser(base: Path, default_id: Callable[[int], str]) -> RecordParser:
    def parse(index: int, raw: dict[str, Any], where: str) -> ImageTextSample:
        for key in ("images", "texts"):
            if key not in raw:
                raise UserError(f"{where}: OBELICS record has no '{key}' list")
        first, text = obelics_first_image_text(raw["images"], raw["texts"], where)
        sample_id = str(raw["id"]) if raw.get("id") is not None else default_id(index)
        image = load_image_ref(raw["images"][first], base, where)
        return ImageTextSample(sample_id, image, text, None)
    return parse


# -------------------------------------------------------------------------- readers

def _jsonl_reader(path: Path) -> RecordReader:
    def read(start: int) -> Iterator[tuple[int, dict[str, Any], str]]:
        with path.open("r", encoding="utf-8") as handle:
            for index, line in enumerate(handle):
                if index < start or not line.strip():
                    continue
                where = f"{path} line {index + 1}"
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{where}: not valid JSON: {err.msg} (column {err.colno})") from None
                if not isinstance(raw, dict):
                    raise UserError(f"{where}: expected a JSON object, got {type(raw).__name__}")
                yield index, raw, where
    return read


def _first_jsonl_record(path: Path) -> dict[str, Any]:
    for _, raw, _ in _jsonl_reader(path)(0):
        return raw
    raise UserError(f"{path}: the JSONL file holds no records")


def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def open_jsonl(path: Path, *, strict: bool = False, image_column: str = "image",
               text_column: str = "text", max_samples: int | None = None) -> Source:
    """A JSONL file of plain `{"image", "text"}` lines or of OBELICS documents (detected
    from the first record: `images` + `texts` lists mean OBELICS)."""
    first = _first_jsonl_record(path)
    base = path.parent
    default_id = lambda index: f"{path.name}:{index + 1}"  # noqa: E731 - line number, 1-based
    if "images" in first and "texts" in first:
        kind, parse, details = "obelics-jsonl", _obelics_parser(base, default_id), {}
    elif image_column in first:
        kind = "jsonl"
        parse = _plain_parser(base, image_column, text_column, default_id)
        details = {"image_column": image_column, "text_column": text_column}
    else:
        raise UserError(f"{path} line 1: expected an '{image_column}' field (plain image-text "
                        f"JSONL) or 'images' + 'texts' lists (OBELICS); found fields "
                        f"{sorted(first)}")
    return Source(kind=kind, path=path, read=_jsonl_reader(path), parse=parse,
                  n_records=_count_lines(path), strict=strict, max_samples=max_samples,
                  details=details)


def _load_datasets_dir(path: Path):
    import datasets  # heavy import, only for this kind of source

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise UserError(f"{path} holds the splits {sorted(loaded)}: point --data at one of "
                            f"them, e.g. {path / sorted(loaded)[0]}")
        split = next(iter(loaded))
        return loaded[split], split
    return loaded, None


def _datasets_reader(table, path: Path) -> RecordReader:
    def read(start: int) -> Iterator[tuple[int, dict[str, Any], str]]:
        # Raw arrow rows: Image features arrive as {"bytes", "path"} structs, decoded by us
        # one at a time so that a corrupt image skips a row instead of killing the run.
        for chunk_start in range(start, table.num_rows, DATASETS_READ_ROWS):
            rows = table[chunk_start:chunk_start + DATASETS_READ_ROWS].to_pylist()
            for offset, raw in enumerate(rows):
                index = chunk_start + offset
                yield index, raw, f"{path} row {index}"
    return read


def open_datasets_dir(path: Path, *, strict: bool = False, image_column: str = "image",
                      text_column: str = "text", max_samples: int | None = None) -> Source:
    """A Hugging Face `datasets` folder written by `save_to_disk` (a Dataset, or a
    DatasetDict with one split). OBELICS columns (`images`, `texts`) are detected."""
    dataset, split = _load_datasets_dir(path)
    columns = list(dataset.column_names)
    table = dataset.with_format("arrow")
    default_id = lambda index: f"{path.name}:{index}"  # noqa: E731 - row number, 0-based
    details: dict[str, Any] = {"split": split, "columns": columns}
    if "images" in columns and "texts" in columns:
        kind, parse = "obelics-datasets", _obelics_parser(path, default_id)
    elif image_column in columns and text_column in columns:
        kind = "datasets"
        parse = _plain_parser(path, image_column, text_column, default_id)
        details.update(image_column=image_column, text_column=text_column)
    else:
        raise UserError(f"{path}: expected columns '{image_column}' and '{text_column}' (set "
                        f"--image-column/--text-column) or OBELICS 'images' + 'texts'; "
                        f"found {columns}")
    return Source(kind=kind, path=path, read=_datasets_reader(table, path), parse=parse,
                  n_records=dataset.num_rows, strict=strict, max_samples=max_samples,
                  details=details)


def open_source(spec: str | Path, *, strict: bool = False, image_column: str = "image",
                text_column: str = "text", max_samples: int | None = None) -> Source:
    """Open image-text data, detecting its kind.

    - a `.jsonl` file of `{"image": path, "text": str}` lines (optional `id`, `response`;
      relative paths resolve against the file's folder), or of OBELICS documents;
    - a folder written by `datasets.save_to_disk` (`dataset_info.json`/`state.json`, or
      `dataset_dict.json` with one split), plain or OBELICS columns.
    """
    path = Path(spec).expanduser().resolve()
    if max_samples is not None and max_samples < 1:
        raise UserError(f"max_samples must be >= 1, got {max_samples}")
    kwargs = dict(strict=strict, image_column=image_column, text_column=text_column,
                  max_samples=max_samples)
    if path.is_dir():
        markers = ("dataset_info.json", "state.json", "dataset_dict.json")
        if any((path / name).is_file() for name in markers):
            return open_datasets_dir(path, **kwargs)
        raise UserError(f"{path}: a data folder must be a `datasets.save_to_disk` folder "
                        "(with dataset_info.json and state.json); give a .jsonl file otherwise")
    if path.is_file():
        return open_jsonl(path, **kwargs)
    raise UserError(f"data not found: {path} (give a .jsonl file or a datasets folder)")
