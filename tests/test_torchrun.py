"""bootstrap.py under torchrun: two processes (gloo, CPU) make the data one process makes, evaluate their
shares of the prompts to the same answers, train with DDP and resume; the share and gather helpers keep the
order of the whole list."""
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ranks  # noqa: E402


def test_shares_gathered_come_back_in_the_order_of_the_whole_list():
    assert ranks.my_share(list("abcde"), 0, 2) == ["a", "c", "e"]
    assert ranks.my_share(list("abcde"), 1, 2) == ["b", "d"]
    assert ranks.in_order([["a", "c", "e"], ["b", "d"]]) == list("abcde")
    for n in range(9):                       # uneven lengths, empty shares (n < world) included
        items = [f"p{i}" for i in range(n)]
        for world in (1, 2, 3, 4):
            parts = [ranks.my_share(items, rank, world) for rank in range(world)]
            assert sorted(x for p in parts for x in p) == sorted(items)   # each item in exactly one share
            assert ranks.in_order(parts) == items
    # one process: all of it
    assert ranks.my_share(list("abc")) == list("abc") and ranks.gather_in_order(["x"]) == ["x"]


def torchrun(tmp_path, name, *args):
    # --standalone: a free port, so that other torchrun jobs on the machine do not collide with this one;
    # "--": torchrun's parser would take bootstrap's --run for an abbreviation of its own --run-path
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--",
           str(ROOT / "bootstrap.py"), "--preset", "smoke", "--root", str(tmp_path), "--run", name,
           "--device", "cpu", "--no-gate", *args]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r, time.time() - t0


def test_two_processes_make_the_data_of_one_train_with_ddp_and_resume(smoke_run, tmp_path):
    """A copy of the one-process smoke run with stage 1 only, without the base model's results: two processes
    make stage 2's data with the same stage-1 model (greedy and sampled calls, each process half of every
    call), measure the base model again (greedy and sampled answers, split the same way), train stage 2 with
    DDP and go on to stage 3. Stage 2's data and the base model's answers are byte for byte those of one
    process. Training differs (a step takes a micro-batch on each process), so the stage-3 data made by the
    stage-2 model differ too: only data made by the same model are compared."""
    one, run = smoke_run.dir, tmp_path / "two"
    shutil.copytree(one, run, ignore=shutil.ignore_patterns("run.lock"))
    for k in (0, 2, 3, 4, 5, 6):
        shutil.rmtree(run / f"stage{k}")
    r, seconds = torchrun(tmp_path, "two", "--stages", "2-3")
    print(f"2 processes, stages 2-3 and the base model's evaluation: {seconds:.1f} s")
    for f in ("stage2/data.jsonl", "stage2/rejected.jsonl", "stage0/samples.jsonl"):
        assert (run / f).read_bytes() == (one / f).read_bytes(), f
    assert json.loads((run / "stage0/eval.json").read_text())["results"] == \
        json.loads((one / "stage0/eval.json").read_text())["results"]
    assert r.stdout.count("stage 2: passed") + r.stdout.count("stage 2: failed") == 1   # one process logs
    # DDP: a step took one micro-batch on each process, two in all, so an epoch took half the steps
    steps_one = json.loads((one / "stage2/summary.json").read_text())["steps"]
    steps_two = json.loads((run / "stage2/summary.json").read_text())["steps"]
    assert steps_two == math.ceil(steps_one / 2) and steps_one > 1
    # resumed after losing stage 3's eval.json: data and training reused, the evaluation answers the same
    ev = json.loads((run / "stage3/eval.json").read_text())
    skip = ("eval.json", "report.md")
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name not in skip}
    (run / "stage3/eval.json").unlink()
    r, _ = torchrun(tmp_path, "two", "--stages", "2-3")
    assert "stage 2: done before" in r.stdout and "stage 3: done before" not in r.stdout
    assert {p: p.read_bytes() for p in files} == files
    assert json.loads((run / "stage3/eval.json").read_text())["results"] == ev["results"]
