"""The run folder of bootstrap.py: a stage's model/ and adapter/ read by transformers and PEFT as the model
the project evaluated, one process at a time on a run (a lock holding its pid), the base checked before
anything is written and again on resume, a finished run readable from read-only media, the tiny base written
whole, no stale retry, and a run killed at ten random moments that finishes with the same bytes as an
uninterrupted one."""
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import builtin
import files
import bootstrap as B
import model as M
import run_folder
from conftest import ROOT


def digest(path):
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(path).rglob("*")) if p.is_file()}


def copy_run(smoke_run, root, name="s"):
    shutil.copytree(smoke_run.dir, Path(root) / name)
    return Path(root) / name


def adapter_dir(stage):
    """The stage's adapter folder (in the layout before adapter/ it sat inside model/)."""
    return stage / "adapter" if (stage / "adapter").exists() else stage / "model"


def test_stage_model_loads_in_transformers_and_adapter_in_peft_as_the_evaluated_model(smoke_run):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    d = smoke_run.dir
    x = torch.randint(3, 256, (2, 24))
    for k in (1, 2, 6):       # stage 6's DPO adapter sits on its supervised (SL-CAI) model
        stage = d / f"stage{k}"
        parent = d / "stage6" / "sl" / "model" if k == 6 else smoke_run.model_dir(k - 1)
        ours, _ = M.load(stage / "model")   # the model the project evaluated
        acfg = json.loads((adapter_dir(stage) / "adapter_config.json").read_text())
        assert Path(acfg["base_model_name_or_path"]) == parent.resolve()
        with torch.no_grad():
            want = ours(x)
            merged = transformers.AutoModelForCausalLM.from_pretrained(stage / "model").float().eval()
            assert (merged(input_ids=x).logits - want).abs().max().item() <= 1e-4, f"stage {k} model/"
            on_parent = transformers.AutoModelForCausalLM.from_pretrained(parent).float().eval()
            before = on_parent(input_ids=x).logits
            adapted = peft.PeftModel.from_pretrained(on_parent, adapter_dir(stage)).eval()
            assert (adapted(input_ids=x).logits - want).abs().max().item() <= 1e-4, f"stage {k} adapter/"
            # a few tiny-model steps move the logits little, but they move them (a misnamed adapter moves
            # nothing)
            assert (before - want).abs().max().item() > 1e-6, f"stage {k}: the adapter changes nothing"


# ----------------------------------------------------------------------------- one process per run

def test_a_second_run_on_a_locked_folder_is_refused_with_the_first_ones_pid(smoke_run, tmp_path):
    folder = copy_run(smoke_run, tmp_path)
    before = digest(folder)
    cmd = [sys.executable, str(ROOT / "bootstrap.py"), "--preset", "smoke", "--root", str(tmp_path), "--run",
           "s",
           "--no-gate"]
    fd = run_folder.lock_run(folder)   # this test process is the first run
    try:
        assert (folder / "run.lock").read_text().strip() == str(os.getpid())
        second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        run_folder.unlock_run(fd)
    assert second.returncode != 0, second.stderr
    assert f"in use by another run (pid {os.getpid()}" in second.stderr, second.stderr
    assert digest(folder) == {**before, "run.lock": digest(folder)["run.lock"]}
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("skipped") == 6, again.stderr[-2000:]


def test_a_lock_left_by_a_dead_process_is_taken_over(smoke_run, tmp_path, capsys):
    folder = copy_run(smoke_run, tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / "run.lock").write_text(f"{dead.pid}\n")   # a run killed with SIGKILL leaves its pid behind
    B.run_pipeline(B.PRESETS["smoke"], root=tmp_path, name="s", gate=False)
    assert capsys.readouterr().out.count("skipped") == 6
    assert (folder / "run.lock").read_text() == ""   # released: nobody holds the run


# ----------------------------------------------------------------------------- the base

def test_a_resumed_run_checks_the_base_weights_against_run_json(smoke_run, tmp_path):
    folder = copy_run(smoke_run, tmp_path)
    weights = folder / "tiny-base" / "model.safetensors"
    sd = load_file(weights)
    sd["model.norm.weight"] = sd["model.norm.weight"] * 1.01   # another model, still a valid file
    save_file(sd, weights, metadata={"format": "pt"})
    recorded = json.loads((folder / "run.json").read_text())["base_sha256"]
    with pytest.raises(SystemExit,
                       match=rf"run.json: this run started from base weights with sha256 {recorded}, "
                                         r"but .*tiny-base now has [0-9a-f]{64}: the base model changed"):
        B.run_pipeline(B.PRESETS["smoke"], root=tmp_path, name="s", gate=False)


def test_a_wrong_base_is_refused_before_run_json_is_written(tmp_path):
    with pytest.raises(SystemExit, match=r"--base .*nowhere: not a usable model directory: missing file"):
        B.run_pipeline(B.PRESETS["smoke"], root=tmp_path, name="b", base=str(tmp_path / "nowhere"),
                       stages=[1])
    assert not (tmp_path / "b").exists()   # nothing of the run was written
    good = builtin.tiny_model(tmp_path / "good")   # the corrected --base is accepted, not "another base"
    run = B.Run(tmp_path, "b", B.PRESETS["smoke"], str(good), 0, "cpu", "auto", 0, False, [])
    assert json.loads((run.dir / "run.json").read_text())["base"] == str(good.resolve())


def test_the_tiny_base_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    real = M.save_pretrained

    def killed_halfway(net, tok, path):   # as a kill after the weights and before the tokenizer files
        files.atomic_write(Path(path) / "model.safetensors", lambda p: save_file({"x": torch.zeros(1)}, p))
        raise KeyboardInterrupt
    monkeypatch.setattr(M, "save_pretrained", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        builtin.tiny_model(tmp_path / "tiny")
    monkeypatch.setattr(M, "save_pretrained", real)
    builtin.tiny_model(tmp_path / "tiny")
    builtin.tiny_model(tmp_path / "fresh")
    assert digest(tmp_path / "tiny") == digest(tmp_path / "fresh")
    M.load(tmp_path / "tiny")


# ----------------------------------------------------------------------------- read-only media

def test_a_finished_run_on_read_only_media_prints_its_report_without_writing(smoke_run, tmp_path, monkeypatch,
                                                                            capsys):
    folder = copy_run(smoke_run, tmp_path)
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}
    digests = digest(folder)
    real_open = os.open

    def read_only(path, flags, *a, **kw):   # what a read-only mount answers to any write under the run folder
        if str(path).startswith(str(folder)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a, **kw)
    monkeypatch.setattr(os, "open", read_only)
    B.run_pipeline(B.PRESETS["smoke"], root=tmp_path, name="s", gate=False)
    out = capsys.readouterr()
    assert out.out.count("skipped") == 6 and "# Bootstrapping run `s`" in out.out and "read-only" in out.err
    assert digest(folder) == digests
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")} == before
    # unfinished work cannot be resumed there: a clear error, still no write
    shutil.rmtree(folder / "stage6")
    with pytest.raises(SystemExit, match="is read-only and stages .* are not all done"):
        B.run_pipeline(B.PRESETS["smoke"], root=tmp_path, name="s", gate=False)


# ----------------------------------------------------------------------------- retries

def stage_adapter(stage):
    return load_file(str(adapter_dir(stage) / "adapter_model.safetensors"))


def test_a_restarted_attempt_never_reuses_a_longer_attempts_outputs(smoke_run, tmp_path):
    # a run killed during retry attempt 2 restarts at attempt 1: attempt 2's checkpoint is not attempt 1's
    # result
    folder = copy_run(smoke_run, tmp_path)
    run = B.Run(tmp_path, "s", replace(B.PRESETS["smoke"]), "tiny", 0, "cpu", "auto", 1, False, [])
    rows = files.read_jsonl(folder / "stage1" / "data.jsonl")
    longer = B.train_stage(run, 1, rows, attempt=1)
    assert longer["config"]["epochs"] == 2 * B.PRESETS["smoke"].stage1_epochs
    again = B.train_stage(run, 1, rows, attempt=0)
    assert again["config"]["epochs"] == B.PRESETS["smoke"].stage1_epochs
    want, got = stage_adapter(smoke_run.dir / "stage1"), stage_adapter(folder / "stage1")
    assert all(torch.equal(want[k], got[k]) for k in want)


# ----------------------------------------------------------------------------- chaos

TIMINGS = {"minutes", "seconds", "tokens_per_s", "tokens_per_second"}   # wall-clock measurements
LAUNCH = {"started", "command"}                    # run.json: when and how the run was launched
# its table shows each stage's minutes; built from the files compared
EXCLUDED = {"report.md"}


def _without(obj, keys):
    if isinstance(obj, dict):
        return {k: _without(v, keys) for k, v in obj.items() if k not in keys}
    return [_without(v, keys) for v in obj] if isinstance(obj, list) else obj


def comparable(path):
    """A file's content with its timings left out; everything else byte for byte."""
    keys = TIMINGS | (LAUNCH if path.name == "run.json" else set())
    if path.suffix == ".json":
        return _without(json.loads(path.read_text()), keys)
    if path.suffix == ".jsonl":
        return [_without(json.loads(line), keys) for line in path.read_text().splitlines()]
    if path.name == "state.safetensors":   # the checkpoint's header holds the seconds trained so far
        with safe_open(str(path), "pt") as f:
            state = json.loads(f.metadata()["state"])
        return _without(state, keys), {k: v.numpy().tobytes() for k, v in load_file(path).items()}
    return path.read_bytes()


def run_files(folder):
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}


def test_killed_at_ten_random_moments_the_run_finishes_with_the_same_bytes(smoke_run, tmp_path):
    ref = smoke_run.dir
    aside = tmp_path / "uninterrupted"
    shutil.move(ref, aside)   # the killed run takes the same path: configs record absolute paths
    cmd = [sys.executable, str(ROOT / "bootstrap.py"), "--preset", "smoke", "--root", str(ref.parent),
           "--run", ref.name, "--no-gate"]
    # random moments spread over the whole pipeline: after a random file of a random stage appears (run
    # folder, data made, training logging, adapter published, stage evaluated), plus a random delay of up to
    # half a second
    # (not after stage 6's eval.json: the run ends right after it)
    rng = random.Random(20261130)
    events = [ref / "run.json"] + [ref / f"stage{k}" / name for k in range(1, 7)
                                   for name in ("data.jsonl", "train.jsonl", "adapter", "eval.json")][:-1]
    moments = sorted(rng.sample(range(len(events)), 10))
    log = open(tmp_path / "log", "w")
    try:
        for i in moments:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=log, start_new_session=True)
            deadline = time.time() + 600
            while not events[i].exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.5))
            assert proc.poll() is None, f"finished or failed before the kill at {events[i]}: " + \
                (tmp_path / "log").read_text()[-3000:]
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        want, got = run_files(aside), run_files(ref)
        assert sorted(got) == sorted(want)   # no file missing, no temporary left behind
        for name, path in want.items():
            if Path(name).name not in EXCLUDED:
                assert comparable(got[name]) == comparable(path), name
    finally:
        log.close()
        shutil.rmtree(ref, ignore_errors=True)
        shutil.move(aside, ref)
