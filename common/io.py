"""JSONL in and out, atomic writes, resumable appends, manifests and clean error exits.

Every stage reads and writes JSON Lines (one object a line, UTF-8). Bad input is reported as
`file:line: field: problem` and never leaves a half-written output behind.
"""
import contextlib
import hashlib
import json
import os
import platform
import sys
import tempfile
import time


DEVICES = ("auto", "cpu", "cuda")
DTYPE_NAMES = ("auto", "fp32", "bf16", "fp16")


# The RM input budget in tokens: the one default of every stage's --max-length. Wherever a trained RM is
# read (02, 04, 05) the length it was trained with (the manifest 03 writes beside it) comes first.
DEFAULT_MAX_LENGTH = 1024


def add_max_length_arg(parser, trained=True):
    """--max-length, the same flag in every stage; trained: it defaults to the RM's own training value."""
    parser.add_argument("--max-length", type=positive_int, default=None if trained else DEFAULT_MAX_LENGTH,
                        help="RM input tokens (truncation rule: docs/scoring.md); default: "
                             + (f"the RM's training --max-length, else {DEFAULT_MAX_LENGTH}" if trained
                                else str(DEFAULT_MAX_LENGTH)))


def add_device_args(parser):
    """--device and --dtype, the same in every stage (resolved by common.models.device_setup)."""
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto: CUDA when present (under torchrun/deepspeed the rank's own GPU, LOCAL_RANK), "
                             "else the CPU")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="auto",
                        help="auto: fp32 on the CPU; bf16 on a GPU that supports it, else fp16")


def cache_dir():
    """$SPPRM_CACHE, else ~/.cache/sp-prm: converted model weights, fetched data files."""
    root = os.environ.get("SPPRM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sp-prm")
    os.makedirs(root, exist_ok=True)
    return root


class DataError(Exception):
    """Bad input data; the message names the file, the line and the field."""


def read_jsonl(path, required=(), nonempty=(), strings=(), ids=(), on_error="raise", stats=None):
    """Yield (line_number, object) for each non-blank line of a JSONL file.

    required: keys that must be present; nonempty: keys whose value must be a non-empty string;
    strings: keys whose value must be a string (possibly empty); ids: keys whose value, where present, must be
    a string or an integer (an id; null, a number with a fraction, a list or an object is none).
    on_error="raise" stops at the first bad line with a DataError; "skip" counts it in
    stats["skipped"] (and the reasons in stats["skip_reasons"]) and goes on.
    """
    stats = stats if stats is not None else {}
    stats.setdefault("read", 0)
    stats.setdefault("skipped", 0)
    stats.setdefault("skip_reasons", {})
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            stats["read"] += 1
            try:
                obj = _parse_line(raw, path, lineno, required, nonempty, strings, ids)
            except DataError as e:
                if on_error == "raise":
                    raise
                stats["skipped"] += 1
                reason = str(e).split(": ", 2)[-1]
                stats["skip_reasons"][reason] = stats["skip_reasons"].get(reason, 0) + 1
                continue
            yield lineno, obj


def _parse_line(raw, path, lineno, required, nonempty, strings=(), ids=()):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno}: line is not valid UTF-8 (byte {e.start})") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    except ValueError as e:
        raise DataError(f"{path}:{lineno}: {e}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    for key in required:
        if key not in obj or obj[key] is None:
            raise DataError(f"{path}:{lineno}: field '{key}': missing")
    for key in strings:
        if key not in obj or obj[key] is None:
            raise DataError(f"{path}:{lineno}: field '{key}': missing")
        if not isinstance(obj[key], str):
            raise DataError(f"{path}:{lineno}: field '{key}': expected a string, got {type(obj[key]).__name__}")
    for key in nonempty:
        value = obj.get(key)
        if value is None:
            raise DataError(f"{path}:{lineno}: field '{key}': missing")
        if not isinstance(value, str):
            raise DataError(f"{path}:{lineno}: field '{key}': expected a string, got {type(value).__name__}")
        if not value.strip():
            raise DataError(f"{path}:{lineno}: field '{key}': empty")
    for key in ids:
        value = obj.get(key, "")
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise DataError(f"{path}:{lineno}: field '{key}': expected a string or an integer, got {_json_type(value)}")
    return obj


def _json_type(value):
    """A value's type as JSON names it."""
    if value is None:
        return "null"
    return {bool: "true/false", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)


def _reject_constant(name):
    raise ValueError(f"{name} is not a JSON number (no NaN or infinity may pass through a stage)")


def dumps(obj):
    return json.dumps(obj, ensure_ascii=False, allow_nan=False)


@contextlib.contextmanager
def atomic_open(path, mode="w"):
    """Write to a temporary file beside `path` and rename it into place only on success."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; an output gets the usual mode
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_jsonl(path, rows):
    with atomic_open(path) as f:
        for row in rows:
            f.write(dumps(row) + "\n")


def write_json(path, obj):
    with atomic_open(path) as f:
        json.dump(obj, f, ensure_ascii=False, allow_nan=False, indent=2)
        f.write("\n")


class ResumableJsonlWriter:
    """Append rows one by one (flushed), so a killed run loses at most the row in flight.

    With resume=True the rows already in the file are kept and their keys are returned by
    `done_keys`; a torn last line (the process died mid-write) is cut off first. With
    resume=False an existing file is replaced.
    """

    def __init__(self, path, key="id", resume=False):
        self.path = path
        self.key = key
        self.done = set()
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        if resume and os.path.exists(path):
            self._repair_and_load()
            self.f = open(path, "a", encoding="utf-8")
        else:
            self.f = open(path, "w", encoding="utf-8")

    def _repair_and_load(self):
        with open(self.path, "rb") as f:
            data = f.read()
        keep = data.rfind(b"\n") + 1  # drop a torn, unterminated last line
        good = 0
        for line in data[:keep].splitlines(keepends=True):
            if not line.strip():  # a blank line is not the end of the rows
                good += len(line)
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                break
            self.done.add(_row_key(obj, self.key))
            good += len(line)
        if good != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def write(self, row):
        self.f.write(dumps(row) + "\n")
        self.f.flush()
        self.done.add(_row_key(row, self.key))

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _row_key(row, key):
    if isinstance(key, (tuple, list)):
        return tuple(row.get(k) for k in key)
    return row.get(key)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# The checksums of the named data sets read in this process (common/data.py records them): the sha256 of the
# set's data file, or {file: sha256} for a set made of several. A manifest gets them when it is written, so a
# stage that lists its inputs before reading them records the files it read.
NAMED_SET_CHECKSUMS = {}


def input_checksums(paths):
    """{path: sha256} of the input files, taken when they are read: a named set's (hh-rlhf:heldout) is its data
    file's once it has been read; None for a model, a hub data set or a named set not read yet."""
    return {p: sha256_file(p) if os.path.isfile(p) else NAMED_SET_CHECKSUMS.get(p) for p in paths if p}


def check_output_differs(output, *inputs, folder=False, claim=True):
    """Refuse an output that is one of the inputs (it would be overwritten, and its checksum recorded wrong), a
    file output that is a folder, and an output another run is writing (see claim_output; claim=False: the
    caller is a rank that does not write it)."""
    target = os.path.realpath(output)
    for p in inputs:
        if p and os.path.exists(p) and os.path.realpath(p) == target:
            raise DataError(f"{output}: the output is the input {p}; choose another output path")
    if not folder and os.path.isdir(output):
        raise DataError(f"{output}: is a folder; give the path of a file to write")
    if claim:
        claim_output(output)


_CLAIMED = {}


def claim_output(output):
    """Hold an exclusive lock on OUTPUT.lock until this process exits (the system releases it when the process
    ends, killed or not): a second run writing the same output is refused at once, naming the output and the
    process that holds it."""
    import atexit
    import fcntl

    path = os.path.abspath(output).rstrip("/") + ".lock"
    if path in _CLAIMED:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip()
            os.close(fd)
            raise DataError(f"{output}: another run is writing it (lock {path}"
                            + (f", held by process {holder}" if holder else "") + "); wait for it to finish or give "
                            "another output") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file that its last holder removed while we waited for it
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _CLAIMED[path] = fd

    def release():
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
    atexit.register(release)


def write_manifest(output_path, args, inputs=(), extra=None, resolved=None):
    """Write the manifest of `output_path` beside it (OUTPUT.manifest.json, or manifest.json in a folder)."""
    manifest = make_manifest(output_path, args, inputs, extra, resolved)
    base = output_path.rstrip("/")
    path = os.path.join(base, "manifest.json") if os.path.isdir(base) else base + ".manifest.json"
    write_json(path, manifest)
    return path


def make_manifest(output_path, args, inputs=(), extra=None, resolved=None):
    """What produced `output_path`: arguments, seed, versions, input checksums.

    inputs: paths (hashed now) or a dict from `input_checksums`, taken when the inputs were read.
    resolved: values the stage settled after parsing (a default by model family, the device and dtype of
    `common.models.device_fields`): the manifest's args record them as they acted.
    """
    import torch
    import transformers

    arguments = {**vars(args), **(resolved or {})}
    checksums = dict(inputs) if isinstance(inputs, dict) else input_checksums(inputs)
    checksums = {p: NAMED_SET_CHECKSUMS.get(p) if sha256 is None else sha256 for p, sha256 in checksums.items()}
    manifest = {
        "output": os.path.abspath(output_path),
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "args": {k: v for k, v in arguments.items() if _jsonable(v)},
        "seed": getattr(args, "seed", None),
        "inputs": checksums,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if arguments.get("resolved_device"):  # what the stage ran on (common.models.device_fields)
        manifest.update(device=arguments["resolved_device"], dtype=arguments["resolved_dtype"])
    if extra:
        manifest.update(extra)
    return manifest


def _jsonable(v):
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def run_main(main):
    """Run a stage's main(); an expected failure (DataError: bad input, a model that cannot be loaded, a judge
    that fails) becomes one clear line on stderr and exit status 2, never a traceback."""
    try:
        main()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)


# ------------------------------------------------------------------------------------------ argument types
# argparse checks numbers with these before any model loads: a bad value is a one-line usage error.

def _number(kind, text, ok, what):
    import argparse

    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if isinstance(value, float) and value != value:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return value


def positive_int(text):
    return _number(int, text, lambda v: v > 0, "an integer > 0")


def non_negative_int(text):
    return _number(int, text, lambda v: v >= 0, "an integer >= 0")


def positive_float(text):
    return _number(float, text, lambda v: 0 < v < float("inf"), "a finite number > 0")


def non_negative_float(text):
    return _number(float, text, lambda v: 0 <= v < float("inf"), "a finite number >= 0")


def finite_float(text):
    return _number(float, text, lambda v: abs(v) < float("inf"), "a finite number")


def fraction(text):
    return _number(float, text, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def probability(text):
    return _number(float, text, lambda v: 0 < v <= 1, "a number in (0, 1]")


def prefix_lengths(text):
    """A comma list of token counts t >= 1, e.g. 5,10,20."""
    import argparse

    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("expected a comma list of integers >= 1, e.g. 5,10,20")
    return [_number(int, p, lambda v: v >= 1, "prefix lengths >= 1") for p in parts]
