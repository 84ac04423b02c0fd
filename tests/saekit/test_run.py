"""The one resume check every long job calls: what counts as a change, and what the error says."""

import dataclasses
from pathlib import Path

import pytest

from saekit.errors import UserError
from saekit.run import RunConfig, check_resume, config_record, free_on_resume


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobConfig(RunConfig):
    data: Path
    """Input."""
    out: Path = free_on_resume(Path("runs/job"))
    """Output folder."""
    lr: float = 0.001
    """Learning rate."""
    layers: tuple[int, ...] = (1, 2)
    """Layers."""
    log_every: int = free_on_resume(10)
    """Log interval."""


def test_record_holds_json_values_without_the_free_fields(tmp_path):
    cfg = JobConfig(data=tmp_path / "d", out=tmp_path / "o")
    assert config_record(cfg) == {"seed": 0, "data": str((tmp_path / "d").resolve()), "lr": 0.001,
                                  "layers": [1, 2]}
    assert set(config_record(cfg, free=True)) == {f.name for f in dataclasses.fields(cfg)}


def test_free_fields_may_change_and_the_same_config_resumes(tmp_path):
    saved = config_record(JobConfig(data=tmp_path / "d"))
    check_resume(saved, JobConfig(data=tmp_path / "d", out=tmp_path / "elsewhere", resume=True, threads=3,
                                  device="cpu", log_every=1), "job: ckpt")


def test_a_changed_field_is_named_with_both_values_on_one_line(tmp_path):
    saved = config_record(JobConfig(data=tmp_path / "d"))
    with pytest.raises(UserError) as err:
        check_resume(saved, JobConfig(data=tmp_path / "d", lr=0.002, seed=1), "job: ckpt")
    message = str(err.value)
    assert "\n" not in message and message.startswith("job: ckpt was written with other settings")
    assert "field 'lr' was 0.001, now 0.002" in message and "field 'seed' was 0, now 1" in message
    assert message.endswith("use another --out or --no-resume")


def test_a_path_recorded_as_given_matches_the_same_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_resume({"seed": 0, "data": "d", "lr": 0.001, "layers": [1, 2]}, JobConfig(data=tmp_path / "d"), "job")


def test_a_field_added_since_counts_only_when_it_is_not_at_its_default(tmp_path):
    saved = config_record(JobConfig(data=tmp_path / "d"))
    del saved["lr"]  # a checkpoint written before `lr` existed
    check_resume(saved, JobConfig(data=tmp_path / "d"), "job: ckpt")
    with pytest.raises(UserError, match=r"field 'lr' was not recorded \(default 0.001\), now 0.5"):
        check_resume(saved, JobConfig(data=tmp_path / "d", lr=0.5), "job: ckpt")
    del saved["data"]  # no default to compare against: a change
    with pytest.raises(UserError, match="field 'data' was not recorded, now"):
        check_resume(saved, JobConfig(data=tmp_path / "d"), "job: ckpt")


def test_a_recorded_field_the_config_no_longer_has_is_a_change(tmp_path):
    saved = config_record(JobConfig(data=tmp_path / "d")) | {"momentum": 0.9}
    with pytest.raises(UserError, match="field 'momentum' was 0.9, now not a setting"):
        check_resume(saved, JobConfig(data=tmp_path / "d"), "job: ckpt")


def test_a_config_without_resume_advises_another_out_only():
    @dataclasses.dataclass(frozen=True)
    class Plain:
        out: Path = free_on_resume(Path("o"))
        lr: float = 1.0

    with pytest.raises(UserError, match=r"field 'lr' was 2.0, now 1.0; use another --out$"):
        check_resume({"lr": 2.0}, Plain(), "plain: o")
