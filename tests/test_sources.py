"""Data files on a machine without the data folder: fetched once from their source, checked, cached."""
import csv
import hashlib
import io
import json
import os
import shutil

import pytest

from common import sources
from common.data import load_pairs, load_prompts
from common.io import DataError
from common.sources import SOURCES, advbench_jsonl, data_file, resolve_data_dir

REAL = resolve_data_dir()
HH = "hh_rlhf/harmless-base_test.jsonl.gz"


@pytest.fixture
def no_data_folder(tmp_path, monkeypatch):
    """No data folder, an empty cache and no hub mirror yet."""
    monkeypatch.setenv("SPPRM_DATA_DIR", str(tmp_path / "no-such-folder"))
    monkeypatch.setenv("SPPRM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SPPRM_HUB_MIRROR", raising=False)
    return tmp_path


def hub_mirror(tmp_path, content):
    path = tmp_path / "mirror" / "Anthropic" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    return tmp_path / "mirror"


def test_manifest_checksums_are_the_sources():
    """Every source's checksum is the data folder's MANIFEST.tsv entry of that file."""
    with open(os.path.join(REAL, "MANIFEST.tsv"), encoding="utf-8") as f:
        manifest = {row["path"].removeprefix("./"): row["sha256"] for row in csv.DictReader(f, delimiter="\t")}
    for relpath, source in SOURCES.items():
        assert manifest[relpath] == source.sha256, relpath


def test_hh_rlhf_from_a_hub_mirror_equals_the_data_folder(no_data_folder, monkeypatch):
    expected = load_pairs("hh-rlhf:train", data_dir=REAL)
    with open(os.path.join(REAL, HH), "rb") as f:
        mirror = hub_mirror(no_data_folder, f.read())
    monkeypatch.setenv("SPPRM_HUB_MIRROR", str(mirror))
    got = load_pairs("hh-rlhf:train")
    assert len(got) == 2000 and got == expected
    cached = no_data_folder / "cache" / "data" / HH
    assert cached.is_file()
    # fetched once: without the mirror the cached copy serves
    shutil.rmtree(mirror)
    assert load_pairs("hh-rlhf:heldout") == load_pairs("hh-rlhf:heldout", data_dir=REAL)


def test_a_fetched_file_with_another_checksum_is_refused_and_not_kept(no_data_folder, monkeypatch):
    monkeypatch.setenv("SPPRM_HUB_MIRROR", str(hub_mirror(no_data_folder, b"not the real file")))
    with pytest.raises(DataError, match="sha256 .* is not the expected"):
        load_pairs("hh-rlhf:train")
    assert not (no_data_folder / "cache" / "data" / HH).exists()


def test_a_missing_mirror_file_names_the_file_and_where_to_put_it(no_data_folder, monkeypatch):
    monkeypatch.setenv("SPPRM_HUB_MIRROR", str(no_data_folder / "empty-mirror"))
    with pytest.raises(DataError) as e:
        load_pairs("hh-rlhf:train")
    assert "harmless-base_test.jsonl.gz: no such file" in str(e.value) and "put the file there" in str(e.value)


def test_a_file_without_a_source_says_where_to_put_it(no_data_folder):
    with pytest.raises(DataError, match="gsm8k/dev.jsonl: no such file, and it has no public source"):
        load_prompts("gsm8k:dev")


def test_advbench_is_rebuilt_from_its_csv(no_data_folder, monkeypatch):
    """The data folder's AdvBench JSONL is a re-encoding of the CSV upstream ships: rebuilt from a CSV made of
    its rows, it is byte for byte the same file (checked against the manifest's sha256 on the way)."""
    with open(os.path.join(REAL, "advbench", "harmful_behaviors.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=["goal", "target"])
    writer.writeheader()
    writer.writerows({"goal": r["goal"], "target": r["target"]} for r in rows)
    upstream = no_data_folder / "harmful_behaviors.csv"
    upstream.write_text(buffer.getvalue(), encoding="utf-8", newline="")
    assert hashlib.sha256(advbench_jsonl(upstream.read_bytes())).hexdigest() == \
        SOURCES["advbench/harmful_behaviors.jsonl"].sha256
    moved = {**SOURCES, "advbench/harmful_behaviors.jsonl": sources.Source(
        SOURCES["advbench/harmful_behaviors.jsonl"].sha256, url=upstream.as_uri(), convert=advbench_jsonl)}
    monkeypatch.setattr(sources, "SOURCES", moved)
    got = load_prompts("advbench")
    assert got == load_prompts("advbench", data_dir=REAL)
    assert data_file("advbench/harmful_behaviors.jsonl").startswith(str(no_data_folder / "cache"))


def test_an_unreachable_source_is_one_clear_error(no_data_folder, monkeypatch):
    moved = {**SOURCES, "mt_bench/question.jsonl": sources.Source("0" * 64, url=(no_data_folder / "gone").as_uri())}
    monkeypatch.setattr(sources, "SOURCES", moved)
    with pytest.raises(DataError, match=r"mt_bench/question.jsonl: no such file, and fetching it failed"):
        load_prompts("mt-bench")
