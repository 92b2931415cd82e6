"""Files: one JSONL reader with file:line errors, one atomic writer, strict JSON, and content hashes.

Every file the project writes goes through `atomic_write` (a temporary file in the same folder, then a
rename), so a killed process never leaves half a file that a later run would trust.
"""
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path


def need_file(path):
    """The path, which must exist: else an error naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"missing file: {path}")
    return path


def umask():
    """The process's umask (read by setting it, then restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _leftovers(path):
    """Temporaries a killed writer of `path` left beside it (the names atomic_write and atomic_dir give
    them)."""
    pat = re.compile(rf"\.{re.escape(path.name)}\.[A-Za-z0-9_]{{8}}\.tmp")
    return [p for p in path.parent.iterdir() if pat.fullmatch(p.name)] if path.parent.is_dir() else []


def _clear_leftovers(path):
    for p in _leftovers(path):
        remove(p)


def remove(p):
    """Delete a file or a folder (a link to a folder is a file); a missing one is fine."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write):
    """Write through a temporary file in the same folder, then rename: never a half-written file.
    The file gets the permissions of an ordinary new file (0666 less the umask), not mkstemp's 0600."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())   # after the write: a writer that recreates the file resets its mode
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _clear_leftovers(path)


def atomic_text(path, text):
    """Write UTF-8 text atomically (see atomic_write)."""
    atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8"))


@contextmanager
def atomic_dir(path):
    """Build a folder in a temporary sibling and swap it in at the end: readers see the old folder or the
    whole new one, never a half-written one; on an error nothing is published."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~umask())
        if path.exists():   # moved aside onto an empty temporary (rename may replace an empty folder)
            os.replace(path, tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _clear_leftovers(path)


def finite_json(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def json_text(obj, **kw):
    """Strict JSON: NaN and infinities become null (bare NaN is not JSON, and other readers refuse it)."""
    return json.dumps(finite_json(obj), allow_nan=False, **kw)


def read_json(path):
    """A JSON object from a file; a missing, undecodable or malformed file is an error naming it."""
    path = need_file(path)
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


# (path, inode, size, mtime, ctime) -> sha256: a file is hashed once per process unless it changes
_HASHED = {}


def sha256_file(path):
    """The sha256 of a file's bytes, remembered while the file is unchanged."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _HASHED:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASHED[key] = h.hexdigest()
    return _HASHED[key]


def weights_sha256(path):
    """One sha256 for a model directory's weights: over the sha256 of each *.safetensors file, in name
    order."""
    h = hashlib.sha256()
    for f in sorted(Path(path).glob("*.safetensors")):
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def located_jsonl(source, keep_bad=False, name=None):
    """[(where, row)] with where = "file:line", from a path or an open binary file (`name` names it); a line
    that is not UTF-8 or not JSON is an error naming it (with keep_bad, the error takes the row's place, for
    the caller to count). Blank lines are skipped."""
    name, out = name or source, []
    with (open(source, "rb") if isinstance(source, (str, Path)) else nullcontext(source)) as f:
        for n, raw in enumerate(f, 1):
            row = _parse_line(raw, f"{name}:{n}", keep_bad)
            if row is not BLANK:
                out.append((f"{name}:{n}", row))
    return out


BLANK = object()   # what _parse_line returns for an empty line


def _parse_line(raw, where, keep_bad):
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        row = ValueError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start} of the line)")
    else:
        if not line.strip():
            return BLANK
        try:
            row = json.loads(line)  # a valid non-object (a list, a number) is the caller's to refuse
        except json.JSONDecodeError as e:
            row = ValueError(f"{where}: not JSON ({e.msg})")
    if isinstance(row, ValueError) and not keep_bad:
        raise row
    return row


def read_jsonl(path):
    """The rows of a JSONL file; a line that is not a JSON object is an error naming file:line."""
    rows = []
    for where, row in located_jsonl(path):
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def write_jsonl(path, rows):
    atomic_text(path, "".join(json_text(r, ensure_ascii=False) + "\n" for r in rows))


def write_json(path, obj):
    """Strict JSON, indented, through the atomic writer: a reader never sees half a file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_text(path, json_text(obj, indent=2, ensure_ascii=False) + "\n")
