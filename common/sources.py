"""Where each data file comes from: the data folder, else this machine's cache, else its public source.

The named data sets (common/data.py) read files by their path inside the data folder (`--data-dir`, else
$SPPRM_DATA_DIR, else ../shared/data beside the repository). A file that is not there is fetched once from
its public source, checked against its SHA-256 (the data folder's MANIFEST.tsv), and kept under
$SPPRM_CACHE/data (default ~/.cache/sp-prm/data), laid out as the data folder; later reads take it from there.
`make data` (python -m common.sources) tries every file ahead of time and prints one table: where each file
is (data folder, cache, fetched now) or why it is missing, then the ways out when one is.

Every read checks the file again, once per process: its SHA-256 must be its source's and, in the data folder,
the folder's MANIFEST.tsv entry. A file cut or altered since is refused, never read: a changed cache file is
not fetched again behind the user's back (something changed it; on a machine offline a fetch would fail anyway),
the message says to delete it and run `make data`.

Hub files are read from $SPPRM_HUB_MIRROR/<repo>/<file> when that variable is set (a local copy laid out as
the hub: offline machines, tests), else downloaded with huggingface_hub. Other files come from a pinned commit of
their repository (AdvBench from its main branch: no commit is pinned, and the checksum refuses another version).
"""
import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from common.io import DataError, atomic_open, cache_dir, sha256_file

DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")
HUB_MIRROR_ENV = "SPPRM_HUB_MIRROR"
HOSTS = "huggingface.co and raw.githubusercontent.com"  # where the public sources are
WAYS_OUT = (f"run `make data` once where {HOSTS} can be reached (the files are kept in the cache, $SPPRM_CACHE), "
            "or set SPPRM_DATA_DIR to a folder that has them (laid out as the data folder), or SPPRM_HUB_MIRROR "
            "to a local copy of the hub's files (FOLDER/Anthropic/hh-rlhf/harmless-base/test.jsonl.gz)")
log = logging.getLogger("data")


class FetchFailed(DataError):
    """A data file that is in neither the data folder nor the cache and could not be fetched; `reason` says why
    in a few words (make data's table shows it)."""

    def __init__(self, message, reason):
        super().__init__(message)
        self.reason = reason


def resolve_data_dir(data_dir=None):
    """--data-dir, else $SPPRM_DATA_DIR, else ../shared/data beside the repository."""
    path = data_dir or os.environ.get("SPPRM_DATA_DIR") or DEFAULT_DATA_DIR
    return os.path.normpath(path)


def advbench_jsonl(csv_bytes):
    """AdvBench's harmful_behaviors.csv (goal,target) as the data folder's JSONL: one
    {"id": "advbench-NNN", "goal", "target"} a line, in the CSV's order."""
    rows = list(csv.DictReader(io.StringIO(csv_bytes.decode("utf-8"), newline="")))
    return "".join(json.dumps({"id": f"advbench-{i:03d}", "goal": r["goal"], "target": r["target"]}) + "\n"
                   for i, r in enumerate(rows)).encode("utf-8")


@dataclass(frozen=True)
class Source:
    sha256: str                 # of the file as the data folder holds it
    hub: tuple = None           # (data set repo, file) on the Hugging Face hub
    url: str = None             # else a file at a pinned commit
    convert: object = None      # bytes -> bytes, when the data folder holds a re-encoding
    origin: str = ""            # what the file is, for messages
    license: str = ""           # the data set's licence (docs/data-and-models.md; the data folder's licenses/)

    def where(self):
        return f"hub data set {self.hub[0]}, file {self.hub[1]}" if self.hub else self.url

    def fetch(self):
        """The file's bytes from its source (a DataError that says where to put it when that fails)."""
        if self.hub:
            repo, name = self.hub
            mirror = os.environ.get(HUB_MIRROR_ENV)
            if mirror:
                path = os.path.join(mirror, repo, name)
                if not os.path.isfile(path):
                    raise FetchFailed(f"{path}: no such file (${HUB_MIRROR_ENV} mirror of {repo})",
                                      reason=f"not in ${HUB_MIRROR_ENV}: {path}")
                with open(path, "rb") as f:
                    return f.read()
            from huggingface_hub import hf_hub_download

            hub_log = logging.getLogger("huggingface_hub")
            level = hub_log.level
            hub_log.setLevel(logging.ERROR)  # its retries print each failed try; the error below says it once
            try:
                with open(hf_hub_download(repo, name, repo_type="dataset"), "rb") as f:
                    return f.read()
            except Exception as e:  # hub errors have many types (offline, gated, HTTP); all mean "not fetched"
                cause = _root_cause(e)
                raise FetchFailed(f"cannot download {name} of {repo} from the hub: {cause}",
                                  reason=f"huggingface.co ({repo}): {cause}") from None
            finally:
                hub_log.setLevel(level)
        try:
            with urllib.request.urlopen(self.url, timeout=120) as response:
                raw = response.read()
        except (urllib.error.URLError, OSError, ValueError) as e:
            cause = _root_cause(e)
            raise FetchFailed(f"cannot download {self.url}: {cause}",
                              reason=f"{urllib.parse.urlsplit(self.url).netloc or self.url}: {cause}") from None
        return self.convert(raw) if self.convert else raw


def _root_cause(e):
    """The first line of the innermost exception: "[Errno -2] Name or service not known", not the hub's paragraph
    about its local cache."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    reason = getattr(e, "reason", None)  # urllib's URLError wraps the socket error
    text = str(reason if isinstance(reason, BaseException) else e).strip()
    return text.splitlines()[0] if text else type(e).__name__


GSM8K = ("https://raw.githubusercontent.com/openai/grade-school-math/3101c7d5072418e28b9008a6636bde82a006892c/"
         "grade_school_math/data/")
DOVE = "https://raw.githubusercontent.com/Hritikbansal/dove/02e53a0a2f5662432de43ec2f3c7618e0270bc9d/data/"
FASTCHAT = "https://raw.githubusercontent.com/lm-sys/FastChat/0e6d3e4beaab66f4d3f93db72541a4abab8af28d/"
SOURCES = {
    "hh_rlhf/harmless-base_test.jsonl.gz": Source(
        "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03",
        hub=("Anthropic/hh-rlhf", "harmless-base/test.jsonl.gz"), origin="HH-RLHF harmless-base test split",
        license="MIT"),
    "gsm8k/train.jsonl": Source("17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
                                url=GSM8K + "train.jsonl", origin="GSM8K train", license="MIT"),
    "gsm8k/test.jsonl": Source("3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
                               url=GSM8K + "test.jsonl", origin="GSM8K test", license="MIT"),
    "gsm8k/example_model_solutions.jsonl": Source(
        "4bc62db838f8418365d51c627bd66294cbdca9fb7f01519cb13f0dce8c51580b",
        url=GSM8K + "example_model_solutions.jsonl", origin="GSM8K model solutions", license="MIT"),
    "advbench/harmful_behaviors.jsonl": Source(
        "7b5dc08a6874ded63b329a9863a7792ab7c563364be9c7febbdffbb322a93a2a",
        url="https://raw.githubusercontent.com/llm-attacks/llm-attacks/main/data/advbench/harmful_behaviors.csv",
        convert=advbench_jsonl, origin="AdvBench harmful behaviours (CSV re-encoded as JSONL)", license="MIT"),
    "dove_tldr_helpful/tldr_test.jsonl": Source("6247365b610a708f077c4a45ffb194cf596d9e507fb48bf841b1dba2fec92fa6",
                                                url=DOVE + "tldr/test.json", origin="TL;DR test posts", license="MIT"),
    "dove_tldr_helpful/anthropic_helpful_test.jsonl": Source(
        "43d653ff3bd9e1ef5cdda869c9ea91283331e4b775b098eb850ea7dd52c1b857",
        url=DOVE + "anthropic_helpful/test.jsonl", origin="HH helpful test prompts", license="MIT"),
    "mt_bench/question.jsonl": Source("119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7",
                                      url=FASTCHAT + "fastchat/llm_judge/data/mt_bench/question.jsonl",
                                      origin="MT-Bench questions", license="Apache-2.0"),
}


def data_cache_dir():
    return os.path.join(cache_dir(), "data")


def data_file(relpath, data_dir=None):
    """The path of a data file, its SHA-256 checked: in the data folder, else in the cache, else fetched into
    the cache. The checksum it had is recorded for the manifests (see recording_files)."""
    folder = resolve_data_dir(data_dir)
    local = os.path.join(folder, relpath)
    if os.path.exists(local):
        return _checked(local, relpath, folder)
    try:
        cached = os.path.join(data_cache_dir(), relpath)
    except OSError as e:
        raise DataError(f"{local}: no such file, and the data cache cannot be made ({e.filename}: {e.strerror or e}); "
                        "set SPPRM_CACHE to a writable folder, or put the file there") from None
    if os.path.exists(cached):
        return _checked(cached, relpath)
    source = SOURCES.get(relpath)
    if source is None:
        raise DataError(f"{local}: no such file, and it has no public source this tool can fetch: put it there "
                        "(or point --data-dir / SPPRM_DATA_DIR at a folder that has it)")
    log.info("%s: not in the data folder; fetching it once from %s", relpath, source.where())
    try:
        content = source.fetch()
    except FetchFailed as e:
        where = folder if os.path.isdir(folder) else f"{folder}, which does not exist"
        raise FetchFailed(f"{relpath}: no such file in the data folder ({where}) or the cache, and fetching it "
                          f"failed ({e}). Ways out: {WAYS_OUT}", reason=e.reason) from None
    digest = hashlib.sha256(content).hexdigest()
    if digest != source.sha256:
        raise DataError(f"{relpath} from {source.where()}: sha256 {digest} is not the expected {source.sha256} "
                        f"(another version of the file?); nothing was kept. Put the right file at {local}")
    try:
        with atomic_open(cached, "wb") as f:  # a failed write leaves neither the file nor its temporary
            f.write(content)
    except OSError as e:
        raise DataError(f"{cached}: cannot keep the fetched file in the data cache ({e.strerror or e}); free some "
                        "space or make the folder writable (or set SPPRM_CACHE to another folder), or put the file "
                        f"at {local}") from None
    log.info("%s: kept in %s", relpath, cached)
    return _checked(cached, relpath)


# A data file is hashed once per process: the stages and the tests read the same files many times, and a
# file changed in between has another size or modification time, so it is hashed again.
_HASHED = {}        # (path, size, mtime_ns) -> sha256
_RECORDERS = []     # the dicts of the recording_files blocks open now


def _checked(path, relpath, folder=None):
    """`path` when its SHA-256 is the one its source (SOURCES) and, in the data folder, the folder's MANIFEST.tsv
    give; a DataError naming the file, both checksums and what to do otherwise. A file neither names is taken
    as it is (its checksum is still recorded)."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = sha256_file(path)
    found = _HASHED[key]
    expected = []
    if relpath in SOURCES:
        expected.append(("common/sources.py", SOURCES[relpath].sha256))
    listed = folder_manifest(folder).get(relpath) if folder else None
    if listed:
        expected.append((os.path.join(folder, "MANIFEST.tsv"), listed))
    for where, sha256 in expected:
        if found != sha256:
            if folder is None:  # a cache file: it was checked when it was fetched, so it changed since
                todo = ("it changed after it was fetched (altered or cut); delete it and run `make data` to fetch it "
                        "again")
            else:
                origin = f" from {SOURCES[relpath].where()}" if relpath in SOURCES else ""
                todo = (f"the data folder holds another version of the file or an altered one; restore the original"
                        f"{origin}, or point --data-dir / SPPRM_DATA_DIR at a folder that has it")
            raise DataError(f"{path}: sha256 {found} is not the expected {sha256} ({where}): {todo}")
    for files in _RECORDERS:
        files[relpath] = found
    return path


@contextlib.contextmanager
def recording_files():
    """Collect {relpath: sha256} of every data file read inside the block (common/data.py records what a named
    set was made of, for the manifests)."""
    files = {}
    _RECORDERS.append(files)
    try:
        yield files
    finally:
        _RECORDERS.remove(files)


_MANIFESTS = {}     # (MANIFEST.tsv path, mtime_ns) -> {relpath: sha256}


def folder_manifest(folder):
    """{relpath: sha256} of a data folder's MANIFEST.tsv (path, bytes, sha256 columns); {} without one."""
    path = os.path.join(folder, "MANIFEST.tsv")
    try:
        key = (path, os.stat(path).st_mtime_ns)
    except FileNotFoundError:
        return {}
    if key not in _MANIFESTS:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        if rows and not {"path", "sha256"} <= set(rows[0]):
            raise DataError(f"{path}: expected the columns path and sha256 (tab-separated), got {sorted(rows[0])}")
        _MANIFESTS[key] = {row["path"].removeprefix("./"): row["sha256"].strip().lower() for row in rows
                           if row["path"] and row["sha256"]}
    return _MANIFESTS[key]


def fetch_all(data_dir=None):
    """Every known data file, fetched where missing: [(relpath, status, where it is or why it is not)], status
    "data folder", "cached", "fetched" or "missing" (fetching failed), or "refused" (a file that is not the
    original, a cache that cannot be written)."""
    folder = resolve_data_dir(data_dir)
    report = []
    for relpath in SOURCES:
        found_before = os.path.exists(os.path.join(folder, relpath)), _in_cache(relpath)
        try:
            path = data_file(relpath, data_dir)
        except FetchFailed as e:
            report.append((relpath, "missing", e.reason))
            continue
        except DataError as e:
            report.append((relpath, "refused", str(e)))
            continue
        status = "data folder" if found_before[0] else "cached" if found_before[1] else "fetched"
        report.append((relpath, status, path))
    return report


def _in_cache(relpath):
    try:
        return os.path.exists(os.path.join(data_cache_dir(), relpath))
    except OSError:  # no cache can be made: data_file says so
        return False


def fetch_report(report, data_dir=None):
    """make data's table: one line a file, then the counts; and the one line of ways out when a file is missing
    (None when every file is there)."""
    width = max(len(relpath) for relpath, _, _ in report)
    lines = [f"data folder: {resolve_data_dir(data_dir)}"
             + ("" if os.path.isdir(resolve_data_dir(data_dir)) else " (does not exist)"),
             f"cache:       {os.path.join(os.environ.get('SPPRM_CACHE') or '~/.cache/sp-prm', 'data')}", "",
             f"{'file':{width}s}  {'licence':10s}  {'status':11s}  where it is, or why it is not"]
    lines += [f"{relpath:{width}s}  {SOURCES[relpath].license if relpath in SOURCES else '?':10s}  {status:11s}  "
              f"{detail}" for relpath, status, detail in report]
    counts = {}
    for _, status, _ in report:
        counts[status] = counts.get(status, 0) + 1
    lines += ["", f"{len(report)} files: " + ", ".join(f"{n} {status}" for status, n in counts.items())]
    bad = sum(n for status, n in counts.items() if status in ("missing", "refused"))
    ways = None
    if bad:
        ways = f"{bad} of {len(report)} data files missing or refused: {WAYS_OUT}"
    return "\n".join(lines), ways


if __name__ == "__main__":
    from common.io import run_main

    def main():
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")  # the table says it all
        data_dir = sys.argv[1] if len(sys.argv) > 1 else None
        print("make data: every data file from the data folder, else the cache, else its public source (where the "
              "hub cannot be reached it retries for about half a minute) ...", flush=True)
        table, ways = fetch_report(fetch_all(data_dir), data_dir)
        print(table, flush=True)
        if ways:
            raise DataError(ways)

    run_main(main)
