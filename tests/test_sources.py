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
from common.sources import SOURCES, advbench_jsonl, data_file, fetch_all, fetch_report
from conftest import real_data_dir

HH = "hh_rlhf/harmless-base_test.jsonl.gz"


class RealData:
    """The real data files laid out as the data folder (conftest.real_data_dir), found when first used."""

    def __fspath__(self):
        return real_data_dir()

    def __str__(self):
        return real_data_dir()


REAL = RealData()


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
    if not os.path.exists(os.path.join(REAL, "MANIFEST.tsv")):
        pytest.skip("no data folder here (its files come from the cache, which has no MANIFEST.tsv)")
    with open(os.path.join(REAL, "MANIFEST.tsv"), encoding="utf-8") as f:
        manifest = {row["path"].removeprefix("./"): row["sha256"] for row in csv.DictReader(f, delimiter="\t")}
    for relpath, source in SOURCES.items():
        assert manifest[relpath] == source.sha256, relpath


def test_hh_rlhf_from_a_hub_mirror_equals_the_data_folder(no_data_folder, monkeypatch):
    expected = load_pairs("hh-rlhf:train", data_dir=str(REAL))
    with open(os.path.join(REAL, HH), "rb") as f:
        mirror = hub_mirror(no_data_folder, f.read())
    monkeypatch.setenv("SPPRM_HUB_MIRROR", str(mirror))
    got = load_pairs("hh-rlhf:train")
    assert len(got) == 2000 and got == expected
    cached = no_data_folder / "cache" / "data" / HH
    assert cached.is_file()
    # fetched once: without the mirror the cached copy serves
    shutil.rmtree(mirror)
    assert load_pairs("hh-rlhf:heldout") == load_pairs("hh-rlhf:heldout", data_dir=str(REAL))


def test_a_fetched_file_with_another_checksum_is_refused_and_not_kept(no_data_folder, monkeypatch):
    monkeypatch.setenv("SPPRM_HUB_MIRROR", str(hub_mirror(no_data_folder, b"not the real file")))
    with pytest.raises(DataError, match="sha256 .* is not the expected"):
        load_pairs("hh-rlhf:train")
    assert not (no_data_folder / "cache" / "data" / HH).exists()


def test_a_missing_mirror_file_names_the_file_and_where_to_put_it(no_data_folder, monkeypatch):
    monkeypatch.setenv("SPPRM_HUB_MIRROR", str(no_data_folder / "empty-mirror"))
    with pytest.raises(DataError) as e:
        load_pairs("hh-rlhf:train")
    message = str(e.value)
    assert message.startswith(f"{HH}: no such file in the data folder ({no_data_folder / 'no-such-folder'}, which "
                              "does not exist) or the cache, and fetching it failed (")
    for way_out in ("`make data`", "SPPRM_DATA_DIR", "SPPRM_HUB_MIRROR"):
        assert way_out in message


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
    assert got == load_prompts("advbench", data_dir=str(REAL))
    assert data_file("advbench/harmful_behaviors.jsonl").startswith(str(no_data_folder / "cache"))


def test_an_unreachable_source_is_one_clear_error(no_data_folder, monkeypatch):
    moved = {**SOURCES, "mt_bench/question.jsonl": sources.Source("0" * 64, url=(no_data_folder / "gone").as_uri())}
    monkeypatch.setattr(sources, "SOURCES", moved)
    with pytest.raises(DataError, match=r"mt_bench/question.jsonl: no such file in the data folder .* and "
                                        "fetching it failed"):
        load_prompts("mt-bench")


GSM8K_TEST = "gsm8k/test.jsonl"


def cached_copy(no_data_folder, relpath):
    """The real file put in the cache as a fetch would have (no data folder in this test)."""
    cached = no_data_folder / "cache" / "data" / relpath
    cached.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(os.path.join(REAL, relpath), cached)
    return cached


def changed(path, content):
    """Write new content with another modification time (a size-preserving edit within the same second too)."""
    before = os.stat(path).st_mtime_ns
    path.write_bytes(content)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def test_a_cached_file_cut_at_a_line_end_is_refused_not_read(no_data_folder):
    cached = cached_copy(no_data_folder, GSM8K_TEST)
    assert len(load_prompts("gsm8k")) == 1319
    lines = cached.read_bytes().splitlines(keepends=True)
    changed(cached, b"".join(lines[:-100]))  # whole lines lost: every row left still parses
    with pytest.raises(DataError) as e:
        load_prompts("gsm8k")
    message = str(e.value)
    assert message.startswith(f"{cached}: sha256 {hashlib.sha256(cached.read_bytes()).hexdigest()} is not the "
                              f"expected {SOURCES[GSM8K_TEST].sha256}")
    assert "delete it and run `make data`" in message and "\n" not in message


def test_a_cached_file_altered_after_it_was_fetched_is_refused(no_data_folder):
    cached = cached_copy(no_data_folder, GSM8K_TEST)
    original = cached.read_bytes()
    changed(cached, original.replace(b"How many", b"How much"))  # prompts changed, rows and lines as they were
    assert original.count(b"How many") > 50
    with pytest.raises(DataError, match=r"test.jsonl: sha256 \w+ is not the expected"):
        load_prompts("gsm8k")
    changed(cached, original)  # put back: read again
    assert len(load_prompts("gsm8k")) == 1319


def test_the_data_folder_is_checked_against_its_manifest(tmp_path, monkeypatch):
    """A data folder file must match the folder's MANIFEST.tsv entry (a file this tool has no source for too) and,
    for a known file, the source's checksum."""
    folder = tmp_path / "data"
    (folder / "gsm8k").mkdir(parents=True)
    monkeypatch.setenv("SPPRM_CACHE", str(tmp_path / "cache"))
    dev = b'{"question": "What is 2+2?", "answer": "#### 4"}\n'
    (folder / "gsm8k" / "dev.jsonl").write_bytes(dev)
    manifest = folder / "MANIFEST.tsv"
    manifest.write_text(f"path\tbytes\tsha256\n./gsm8k/dev.jsonl\t{len(dev)}\t{hashlib.sha256(dev).hexdigest()}\n")
    assert load_prompts("gsm8k:dev", data_dir=str(folder))[0]["prompt"] == "What is 2+2?"
    changed(folder / "gsm8k" / "dev.jsonl", dev.replace(b"2+2", b"2+3"))
    with pytest.raises(DataError) as e:
        load_prompts("gsm8k:dev", data_dir=str(folder))
    assert f"({manifest})" in str(e.value) and "restore the original" in str(e.value)
    # a known file that is not the original: refused by its source's checksum, with or without a manifest entry
    shutil.copyfile(os.path.join(REAL, GSM8K_TEST), folder / GSM8K_TEST)
    assert len(load_prompts("gsm8k", data_dir=str(folder))) == 1319
    changed(folder / GSM8K_TEST, (folder / GSM8K_TEST).read_bytes()[:-1000])
    with pytest.raises(DataError, match=r"\(common/sources.py\): .* restore the original from https://"):
        load_prompts("gsm8k", data_dir=str(folder))


def test_the_real_data_folder_matches_its_manifest():
    if not os.path.exists(os.path.join(REAL, "MANIFEST.tsv")):
        pytest.skip("no data folder here (its files come from the cache, which has no MANIFEST.tsv)")
    for relpath in sources.folder_manifest(REAL):
        assert data_file(relpath, str(REAL)) == os.path.join(REAL, relpath)


def test_each_file_is_hashed_once_per_process(no_data_folder, monkeypatch):
    cached_copy(no_data_folder, GSM8K_TEST)
    calls = []
    monkeypatch.setattr(sources, "sha256_file", lambda path: calls.append(path) or SOURCES[GSM8K_TEST].sha256)
    for _ in range(3):
        load_prompts("gsm8k", limit=1)
    assert len(calls) == 1


def test_named_sets_record_their_files_checksums_in_manifests(monkeypatch):
    import argparse

    from common.io import NAMED_SET_CHECKSUMS, input_checksums, make_manifest

    args = argparse.Namespace(seed=0)
    load_pairs("hh-rlhf:heldout")
    load_prompts("gsm8k:heldout")
    manifest = make_manifest("out.jsonl", args, inputs=["hh-rlhf:heldout", "gsm8k:heldout"])
    assert manifest["inputs"]["hh-rlhf:heldout"] == SOURCES[HH].sha256
    assert manifest["inputs"]["gsm8k:heldout"] == {
        "gsm8k/example_model_solutions.jsonl": SOURCES["gsm8k/example_model_solutions.jsonl"].sha256,
        GSM8K_TEST: SOURCES[GSM8K_TEST].sha256}
    # checksums listed before the set is read (04 does so) are filled in when the manifest is written
    monkeypatch.delitem(NAMED_SET_CHECKSUMS, "mt-bench", raising=False)  # not read yet in this process
    listed = input_checksums(["mt-bench"])
    assert listed == {"mt-bench": None}
    load_prompts("mt-bench")
    assert make_manifest("out.jsonl", args, inputs=listed)["inputs"] == {
        "mt-bench": SOURCES["mt_bench/question.jsonl"].sha256}


def fetchable(no_data_folder, monkeypatch):
    """hh-rlhf's file on a hub mirror, to be fetched into the cache."""
    with open(os.path.join(REAL, HH), "rb") as f:
        monkeypatch.setenv("SPPRM_HUB_MIRROR", str(hub_mirror(no_data_folder, f.read())))


def leftovers(folder):
    return [str(p) for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_a_full_disk_while_keeping_a_fetched_file_is_one_error_and_leaves_nothing(no_data_folder, monkeypatch):
    import errno

    fetchable(no_data_folder, monkeypatch)
    real_fsync = os.fsync

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(DataError) as e:
        load_pairs("hh-rlhf:train")
    cached = no_data_folder / "cache" / "data" / HH
    assert str(e.value).startswith(f"{cached}: cannot keep the fetched file in the data cache (No space left on "
                                   "device)") and "SPPRM_CACHE" in str(e.value)
    assert leftovers(no_data_folder / "cache") == []
    monkeypatch.setattr(os, "fsync", real_fsync)  # space again: the same call fetches and keeps it
    assert len(load_pairs("hh-rlhf:train")) == 2000 and leftovers(no_data_folder / "cache") == [str(cached)]


def test_a_cache_that_cannot_be_written_is_one_error_and_leaves_nothing(no_data_folder, monkeypatch):
    fetchable(no_data_folder, monkeypatch)
    (no_data_folder / "a-file").write_text("")
    monkeypatch.setenv("SPPRM_CACHE", str(no_data_folder / "a-file" / "cache"))  # a folder under a file
    with pytest.raises(DataError, match=r"the data cache cannot be made \(.*a-file/cache: Not a directory\); set "
                                        "SPPRM_CACHE to a writable folder"):
        load_pairs("hh-rlhf:train")
    # a read-only cache folder (as root, chmod does not stop writes: the same refusal is simulated)
    data = no_data_folder / "ro" / "data"
    data.mkdir(parents=True)
    monkeypatch.setenv("SPPRM_CACHE", str(no_data_folder / "ro"))
    data.chmod(0o555)
    if os.access(data, os.W_OK):
        import tempfile

        real_mkstemp = tempfile.mkstemp

        def read_only(*args, dir=None, **kwargs):
            if str(dir).startswith(str(data)):
                raise PermissionError(13, "Permission denied", dir)
            return real_mkstemp(*args, dir=dir, **kwargs)
        monkeypatch.setattr(tempfile, "mkstemp", read_only)
    try:
        with pytest.raises(DataError, match=r"cannot keep the fetched file in the data cache \(Permission denied\)"):
            load_pairs("hh-rlhf:train")
    finally:
        data.chmod(0o755)
    assert leftovers(no_data_folder / "ro") == []


def test_make_data_tries_every_file_and_prints_one_table(no_data_folder, monkeypatch):
    """make data (python -m common.sources) goes on past a file it cannot fetch: one line a file (fetched, cached,
    missing and why), the counts, and one line of ways out that names the network, SPPRM_DATA_DIR and
    SPPRM_HUB_MIRROR."""
    fetchable(no_data_folder, monkeypatch)  # HH-RLHF from a hub mirror
    cached_copy(no_data_folder, GSM8K_TEST)
    gone = (no_data_folder / "gone").as_uri()
    unreachable = {relpath: sources.Source(s.sha256, url=f"{gone}/{relpath}", convert=s.convert)
                   for relpath, s in SOURCES.items() if relpath not in (HH, GSM8K_TEST)}
    monkeypatch.setattr(sources, "SOURCES", {HH: SOURCES[HH], GSM8K_TEST: SOURCES[GSM8K_TEST], **unreachable})
    report = fetch_all()
    assert [r[:2] for r in report[:2]] == [(HH, "fetched"), (GSM8K_TEST, "cached")]
    assert [r[1] for r in report[2:]] == ["missing"] * 6  # every file tried, none stops the rest
    assert "No such file" in report[2][2]  # why, in a few words
    table, ways = fetch_report(report)
    lines = table.splitlines()
    assert lines[0] == f"data folder: {no_data_folder / 'no-such-folder'} (does not exist)"
    row = next(line for line in lines if line.startswith("gsm8k/train.jsonl "))
    assert row.split()[1] == "missing" and "No such file" in row
    assert lines[-1] == "8 files: 1 fetched, 1 cached, 6 missing"
    assert ways.startswith("6 of 8 data files missing or refused: run `make data` once where huggingface.co and "
                           "raw.githubusercontent.com can be reached") and "\n" not in ways
    assert "SPPRM_DATA_DIR" in ways and "SPPRM_HUB_MIRROR" in ways
    # the second time every file that came is cached; nothing is fetched again
    assert [r[1] for r in fetch_all()[:2]] == ["cached", "cached"]


def test_prompts_after_an_offset_are_the_next_ones_in_order():
    """04 --offset: fresh prompts after those earlier runs decoded (Table 1 sized by power)."""
    every = load_prompts("hh-rlhf:heldout", data_dir=str(REAL))
    assert load_prompts("hh-rlhf:heldout", data_dir=str(REAL), offset=192, limit=5) == every[192:197]
    assert load_prompts("hh-rlhf:heldout", data_dir=str(REAL), offset=300) == every[300:] and len(every) == 307
