"""The guards of runs/NAME: a lock that keeps a second run out of the folder, and the checks that a run starts
from a usable base model and resumes from the same base weights it started with."""
import errno
import fcntl
import os
from pathlib import Path

import files
import model as M


def sha256_of(path):
    return files.weights_sha256(path)


def check_base(base):
    """A --base that names a directory must hold a readable model config and weights; checked before
    anything of the run is written, so that a corrected --base is not then refused as "another base"."""
    if base in ("default", "tiny"):
        return
    path = Path(base)
    try:
        M.load_config(path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--base {base}: not a usable model directory: {e}") from None
    if not (list(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists()):
        raise SystemExit(f"--base {base}: no model.safetensors (or sharded index) in {path}")


def check_base_sha256(meta, recorded, base):
    """A resumed run continues from the same base weights it started with (run.json records their sha256)."""
    want = recorded.get("base_sha256")
    if want and (got := sha256_of(base)) != want:
        raise SystemExit(f"{meta}: this run started from base weights with sha256 {want}, but {base} now has "
                         f"{got}: the base model changed. Restore it, or start a new --run.")


def lock_run(folder):
    """Hold runs/NAME/run.lock for this process: an exclusive flock on a file that holds our pid. A second
    run on the folder is refused with the first one's pid. The kernel drops the lock of a process that dies,
    so a lock file left by a killed run is simply taken over. Returns the open descriptor, or None on
    read-only media."""
    path = folder / "run.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise SystemExit(f"{folder} is in use by another run (pid {holder}, lock {path}); "
                         "wait for it to finish, "
                         "or stop that process and run again") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    os.fsync(fd)
    return fd


def unlock_run(fd):
    if fd is not None:
        os.ftruncate(fd, 0)   # an empty lock file: nobody holds the run
        os.close(fd)
