"""The run fields the long jobs share, and the one check that a resumed run is the same run.

Every long job (activation cache, SAE training, seg training, GRPO, warm start, world SAM
pretraining) stores `config_record(cfg)` with its checkpoint and calls `check_resume(saved,
cfg, what)` before it continues one. Fields made with `free_on_resume` (where to write, which
device, how many threads, how often to log or checkpoint) may differ between the two runs;
every other field must be what the checkpoint was written with.

Their metrics logs (`MetricsLog`, one JSON line per logged step) are cut back to the resumed
checkpoint's step, so a run killed between a log line and the next checkpoint, or started
again with --no-resume, never leaves the same step twice. `apply_threads` checks and sets
the `threads` field.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from saekit.errors import UserError

_RESUME = "resume"
_FREE = "free"


def free_on_resume(default: Any = dataclasses.MISSING) -> Any:
    """A config field that a resumed run may change because it does not change what the run
    computes: `config_record` leaves it out and `check_resume` skips it."""
    return dataclasses.field(default=default, metadata={_RESUME: _FREE})


def is_free_on_resume(field: dataclasses.Field) -> bool:
    return field.metadata.get(_RESUME) == _FREE


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The fields of a long, resumable job. Subclasses are keyword-only dataclasses too and
    redefine `out` with their default folder (again with `free_on_resume`)."""

    out: Path = free_on_resume()
    """Output folder; re-running on it continues the run there."""
    seed: int = 0
    """Seeds everything random in the run."""
    resume: bool = free_on_resume(True)
    """Resume the run found in `out`."""
    threads: int = free_on_resume(0)
    """torch CPU threads; 0 = all cores."""
    device: str = free_on_resume("auto")
    """auto (cuda if any), cpu, cuda, ..."""


def _json_value(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value.expanduser().resolve())
    if isinstance(value, (tuple, list)):
        return [_json_value(v) for v in value]
    return value


def config_record(cfg: Any, *, free: bool = False) -> dict[str, Any]:
    """The dataclass `cfg` as JSON values (paths absolute, tuples as lists), in field order.
    Fields free on resume are left out unless `free` (a full account of what ran)."""
    return {f.name: _json_value(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
            if free or not is_free_on_resume(f)}


def _same(saved: Any, value: Any) -> bool:
    if isinstance(value, Path) and isinstance(saved, str):  # older records kept paths as given
        return Path(saved).expanduser().resolve() == value.expanduser().resolve()
    return saved == _json_value(value)


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return field.default


def _changes(saved: dict[str, Any], cfg: Any) -> list[str]:
    """What differs between the record `saved` and `cfg`, one phrase per field."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    changes = []
    for name, field in fields.items():
        value = getattr(cfg, name)
        if is_free_on_resume(field):
            continue
        if name in saved:
            if not _same(saved[name], value):
                changes.append(f"field {name!r} was {saved[name]!r}, now {_json_value(value)!r}")
            continue
        default = _default(field)
        if default is dataclasses.MISSING or _json_value(default) != _json_value(value):
            told = "" if default is dataclasses.MISSING else f" (default {_json_value(default)!r})"
            changes.append(f"field {name!r} was not recorded{told}, now {_json_value(value)!r}")
    changes += [f"field {name!r} was {value!r}, now not a setting" for name, value in saved.items()
                if name not in fields]
    return changes


def check_resume(saved: dict[str, Any], cfg: Any, what: str) -> None:
    """A one-line `UserError` unless a run whose checkpoint recorded `saved` (a `config_record`)
    may continue under the config `cfg`; `what` names the job and the checkpoint, e.g.
    "train: runs/x/checkpoint".

    Fields free on resume are skipped. A field that `saved` lacks (added to the config after
    the checkpoint was written) counts as changed only when its value in `cfg` differs from
    the field's default, so an old checkpoint resumes when new fields keep their defaults.
    A recorded field the config no longer has counts as changed.
    """
    changes = _changes(saved, cfg)
    if changes:
        names = {f.name for f in dataclasses.fields(cfg)}
        advice = "use another --out or --no-resume" if "resume" in names else "use another --out"
        raise UserError(f"{what} was written with other settings: {'; '.join(changes)}; {advice}")


def apply_threads(threads: int) -> None:
    """torch's CPU thread count from a run's `threads` field (0: leave torch's default)."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise UserError(f"--threads must be 0 (all cores) or a positive count, got {threads}")
    if threads:
        import torch

        torch.set_num_threads(threads)


def truncate_log(path: str | Path, step: int) -> dict[str, Any] | None:
    """Keep the lines of the JSONL log `path` whose "step" is <= `step` (the step a resumed run
    restarts from; 0 for a fresh run) and drop the rest, a line cut short by a kill included.
    The file is rewritten atomically (created empty if missing); returns the last kept record."""
    from saekit.atomic import atomic_write_text

    path = Path(path)
    kept: list[str] = []
    if path.is_file() and step > 0:
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                if record["step"] > step:
                    break  # steps only grow: the rest is after the checkpoint too
            except (json.JSONDecodeError, KeyError, TypeError):
                break  # a line cut short by the interruption
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))
    return json.loads(kept[-1]) if kept else None


class MetricsLog:
    """A run's metrics.jsonl: cut back to `resumed_step` on opening (`truncate_log`), then
    appended one line per logged step; `last` is the newest record."""

    def __init__(self, path: str | Path, resumed_step: int):
        self.path = Path(path)
        self.last: dict[str, Any] | None = truncate_log(self.path, resumed_step)

    def append(self, line: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(line) + "\n")
        self.last = line
