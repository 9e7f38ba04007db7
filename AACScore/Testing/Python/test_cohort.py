"""Work lists for batch runs and the resumable results table."""

from __future__ import annotations

import csv

import pytest

from AACScoreLib.io.cohort import collect, parse_shard
from AACScoreLib.errors import AACScoreError
from AACScoreLib.io.results_file import COLUMNS, ResultsFile


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_collect_expands_folders_skips_derived_files_and_reads_csv_lists(tmp_path):
    a = _touch(tmp_path / "cohort" / "a.dcm")
    b = _touch(tmp_path / "cohort" / "sub" / "b.png")
    _touch(tmp_path / "cohort" / "a_labels.png")
    _touch(tmp_path / "cohort" / "notes.txt")
    c = _touch(tmp_path / "other" / "c.dcm")
    mask = _touch(tmp_path / "other" / "c_mask.png")
    listing = tmp_path / "list.csv"
    listing.write_text("file,labels\nother/c.dcm,other/c_mask.png\n")
    items = collect([tmp_path / "cohort", listing, a])
    assert [item.image.resolve() for item in items] == sorted(p.resolve() for p in (a, b, c))
    assert {item.image.name: item.labels for item in items}["c.dcm"].resolve() == mask.resolve()


def test_shards_partition_the_cohort(tmp_path):
    files = [_touch(tmp_path / f"img{i:02d}.dcm") for i in range(10)]
    shards = [collect([tmp_path], parse_shard(f"{i}/3")) for i in range(3)]
    seen = [item.image.name for shard in shards for item in shard]
    assert sorted(seen) == sorted(f.name for f in files) and len(seen) == len(set(seen))


@pytest.mark.parametrize("text", ["3/3", "-1/2", "a/b", "1", "0/0"])
def test_bad_shards_are_refused(text):
    with pytest.raises(AACScoreError, match="shard"):
        parse_shard(text)


def test_csv_list_without_file_column_is_refused(tmp_path):
    listing = tmp_path / "list.csv"
    listing.write_text("path\nx.dcm\n")
    with pytest.raises(AACScoreError, match="list.csv.*'file' column"):
        collect([listing])


def test_results_file_resumes_and_is_always_complete(tmp_path):
    path = tmp_path / "results.csv"
    with ResultsFile(path, min_interval=0) as results:
        results.add({"file": "a.dcm", "aac24": 3.25, "category": "no/mild", "status": "ok", "message": ""})
        results.add({"file": "b.dcm", "status": "error", "message": "b.dcm: empty file"})
    reopened = ResultsFile(path)
    assert reopened.done("a.dcm") and reopened.done("b.dcm") and not reopened.done("c.dcm")
    assert not reopened.done("b.dcm", retry_errors=True)
    with open(path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert list(rows[0]) == list(COLUMNS)
    assert rows[0]["aac24"] == "3.250" and rows[1]["status"] == "error"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_results_file_keeps_previous_table_when_a_save_fails(tmp_path, monkeypatch):
    path = tmp_path / "results.csv"
    with ResultsFile(path, min_interval=0) as results:
        results.add({"file": "a.dcm", "status": "ok"})
    before = path.read_text()
    results = ResultsFile(path, min_interval=0)

    def broken_writer(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(csv, "DictWriter", broken_writer)
    with pytest.raises(OSError):
        results.add({"file": "b.dcm", "status": "ok"})
    assert path.read_text() == before
