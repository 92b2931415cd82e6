"""Run the smoke preset and print one sha256 per output file, timings stripped: a refactor must leave every
line of the output unchanged.

    python bench/smoke_hashes.py > before.txt      # on the old commit
    python bench/smoke_hashes.py > after.txt       # on the new one
    diff before.txt after.txt                      # empty: byte-identical outputs

The run goes to a fixed folder (absolute paths are written into adapter configs, so the folder must not move
between the two runs). Wall-clock fields (minutes, seconds, tokens/s, the start time) and report.md's minutes
column are removed before hashing; every other byte of every file counts, safetensors tensors included.
"""
import contextlib
import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TIMING_KEYS = {"minutes", "seconds", "tokens_per_s", "tokens_per_second", "started", "command"}


def untimed(obj):
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [untimed(v) for v in obj]
    return obj


def digest(path):
    raw = path.read_bytes()
    if path.suffix == ".json":
        raw = json.dumps(untimed(json.loads(raw)), sort_keys=True).encode()
    elif path.suffix == ".jsonl":
        raw = "\n".join(json.dumps(untimed(json.loads(line)), sort_keys=True)
                        for line in raw.decode().splitlines() if line.strip()).encode()
    elif path.name == "report.md":   # the table's minutes and tokens/s columns
        text = re.sub(r"\| [\d.]+ \+ [\d.]+ \+ [\d.]+ \|", "| minutes |", raw.decode())
        raw = re.sub(r"\| (?:[\d.]+ / [\d.]+ / [\d.]+|-) \|", "| tok/s |", text).encode()
    elif path.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if "state" in meta:   # a training checkpoint's JSON header holds its seconds
                meta = {**meta, "state": json.dumps(untimed(json.loads(meta["state"])), sort_keys=True)}
            h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
            for k in sorted(f.keys()):
                t = f.get_tensor(k)
                h.update(k.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
                h.update(t.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
        return h.hexdigest()
    return hashlib.sha256(raw).hexdigest()


def main():
    import bootstrap as B
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/smoke_hashes")
    shutil.rmtree(root, ignore_errors=True)
    with contextlib.redirect_stdout(sys.stderr):   # the pipeline's progress lines, kept out of the hashes
        run = B.run_pipeline(B.PRESETS["smoke"], root=root, name="s", gate=False)
    for p in sorted(run.dir.rglob("*")):
        if p.is_file() and p.name != "run.lock":
            print(f"{digest(p)}  {p.relative_to(run.dir)}")


if __name__ == "__main__":
    main()
