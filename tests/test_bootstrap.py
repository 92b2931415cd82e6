"""The six-stage driver end to end on the smoke preset (a tiny random model): layout, provenance, report,
skip on rerun, resume after a kill, the contamination stop and the gate stop."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import files  # noqa: E402
import bootstrap as B  # noqa: E402
import evaluate as E  # noqa: E402
import floors  # noqa: E402
from text import rouge_l  # noqa: E402
import stages as S  # noqa: E402

STAGE_FILES = ["data.jsonl", "rejected.jsonl", "train.jsonl", "eval.json", "samples.jsonl", "summary.json",
               "model/model.safetensors", "model/config.json", "model/tokenizer.json",
               "adapter/adapter_model.safetensors", "adapter/adapter_config.json"]


def tree_digest(path):
    """sha256 of every file under path, by relative name."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(path).rglob("*")) if p.is_file()}


def test_smoke_layout_provenance_report(smoke_run):
    d = smoke_run.dir
    assert json.loads((d / "run.json").read_text())["preset"] == "smoke"
    for k in range(1, 7):
        for f in STAGE_FILES:
            assert (d / f"stage{k}" / f).is_file(), f"stage{k}/{f} missing"
        allowed = {"human", "constructed", "parser"} | {f"stage{j}-model" for j in range(1, k)}
        rows = files.read_jsonl(d / f"stage{k}" / "data.jsonl")
        assert rows, f"stage {k} has no training data"
        for r in rows:   # provenance: who wrote the answer, and (for generated rows) each field
            meta = r["meta"]
            assert meta["source"] in allowed or meta.get("replay_of")
            # only earlier models write data
            if meta.get("stage") == k and k > 1 and "replay_of" not in meta:
                assert set(meta["written_by"].values()) <= allowed, meta
        for r in files.read_jsonl(d / f"stage{k}" / "rejected.jsonl"):
            assert r["reason"] and set(r["meta"]["written_by"].values()) <= allowed
        ev = json.loads((d / f"stage{k}" / "eval.json").read_text())
        assert set(ev) >= {"metric", "value", "interval", "threshold", "passed", "n", "results", "attempts",
                           "minutes", "floor", "vs_base", "split"}
        assert set(ev["results"]) == {str(s) for s in B.eval_sets(k, smoke_run.preset)}
        assert ev["split"] == "test" and 0 <= ev["vs_base"]["p"] <= 1
        assert ev["floor"]["responder"] in floors.RESPONDERS
    # the adapter of each stage names its own parent (docs/stages.md: chained adapters)
    # stage 6's DPO adapter sits on its supervised (SL-CAI) model, which sits on stage 5
    for k in range(2, 7):
        cfg = json.loads((d / f"stage{k}" / "adapter" / "adapter_config.json").read_text())
        parent = d / "stage6" / "sl" / "model" if k == 6 else d / f"stage{k - 1}" / "model"
        assert Path(cfg["base_model_name_or_path"]) == parent.resolve()
    sl = json.loads((d / "stage6" / "sl" / "adapter" / "adapter_config.json").read_text())
    assert Path(sl["base_model_name_or_path"]) == (d / "stage5" / "model").resolve()
    report = (d / "report.md").read_text()
    assert report.count("\n| ") == 7 and "![loss curves](loss.svg)" in report
    for k in range(1, 7):     # a chart per stage: floor, base and the stage's model, with intervals
        svg = (d / f"chart-stage{k}.svg").read_text()
        assert svg.startswith("<svg") and svg.count("<rect") == 3 and f"({f'chart-stage{k}.svg'})" in report
    assert json.loads((d / "stage0" / "eval.json").read_text())["results"].keys() == {str(s)
                                                                                      for s in range(1, 7)}
    # stage 6 trained DPO: its log carries the DPO statistics
    assert "rewards/accuracy" in (d / "stage6" / "train.jsonl").read_text()


def test_second_run_skips_everything(smoke_run, capsys):
    before = tree_digest(smoke_run.dir)
    B.run_pipeline(B.PRESETS["smoke"], root=smoke_run.dir.parent, name="s", gate=False)
    out = capsys.readouterr().out
    assert out.count("skipped") == 6
    after = tree_digest(smoke_run.dir)
    assert {k: v for k, v in after.items() if k != "report.md"} == {k: v for k, v in before.items()
                                                                    if k != "report.md"}


def test_killed_in_stage3_resumes_with_earlier_stages_untouched(smoke_run, tmp_path):
    run = tmp_path / "k"
    shutil.copytree(smoke_run.dir, run)
    for k in (3, 4, 5, 6):
        shutil.rmtree(run / f"stage{k}")
    before = {k: tree_digest(run / f"stage{k}") for k in (1, 2)}
    cmd = [sys.executable, str(ROOT / "bootstrap.py"), "--preset", "smoke", "--root", str(tmp_path), "--run",
           "k",
           "--stages", "1-3", "--no-gate"]
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=log, start_new_session=True)
        deadline = time.time() + 120
        while not (run / "stage3" / "data.jsonl").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / "log").read_text()[-2000:]
        os.killpg(proc.pid, signal.SIGKILL)   # killed after stage 3 made its data, before it was evaluated
        proc.wait()
    assert not (run / "stage3" / "eval.json").exists()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run / "stage3" / "eval.json").exists()
    assert {k: tree_digest(run / f"stage{k}") for k in (1, 2)} == before


def test_planted_eval_prompt_stops_the_run(tmp_path):
    seed = files.read_jsonl(ROOT / "data" / "stage1_seed.jsonl")[:10]
    planted = E.load_eval_set(2)[17]["prompt"]
    seed.append({"messages": [{"role": "user", "content": planted}, {"role": "assistant", "content": "ok"}],
                 "meta": {"stage": 1, "source": "human", "kind": "answer_question"}})
    path = tmp_path / "seed.jsonl"
    files.write_jsonl(path, seed)
    preset = replace(B.PRESETS["smoke"], seed_data=str(path), seed_examples=0)
    with pytest.raises(SystemExit, match=r"share text with eval prompts.*line 11.*s2-018"):
        B.run_pipeline(preset, root=tmp_path, name="p", stages=[1])
    assert not (tmp_path / "p" / "stage1" / "model").exists()   # stopped before training


def test_gate_above_reach_exits_nonzero(smoke_run, tmp_path):
    run = tmp_path / "g"
    shutil.copytree(smoke_run.dir / "stage1", run / "stage1")   # its data and model; only the gate is redone
    shutil.copy(smoke_run.dir / "run.json", run / "run.json")
    shutil.copytree(smoke_run.dir / "tiny-base", run / "tiny-base")
    (run / "stage1" / "eval.json").unlink()
    preset = replace(B.PRESETS["smoke"], thresholds={**B.PRESETS["smoke"].thresholds, 1: 1.01})
    with pytest.raises(SystemExit,
                       match=r"stage 1 failed its gate: instruction_following = 0\.\d+ \[.*\] < threshold "
                             r"1\.01 \(short by"):
        B.run_pipeline(preset, root=tmp_path, name="g", stages=[1])
    r = subprocess.run([sys.executable, str(ROOT / "bootstrap.py"), "--preset", "smoke", "--root",
                        str(tmp_path),
                        "--run", "g", "--stages", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "failed its gate" in r.stderr   # the recorded failure stops a rerun too


def test_arithmetic_parser_never_evals():
    assert S.parse_arithmetic("What is 12 plus 7?") == (12, "+", 7, 19)
    assert S.parse_arithmetic("9 \u00d7 6") == (9, "*", 6, 54)
    assert S.parse_arithmetic("15 divided by 4") is None          # not exact
    assert S.parse_arithmetic("20 / 5 = ?") == (20, "/", 5, 4)
    assert S.parse_arithmetic("__import__('os').system('x')") is None
    assert S.parse_arithmetic("no numbers here") is None


def test_keeper_dedupes_and_enforces_novelty():
    k = S.Keeper()
    row = lambda q, a, kind="question": S.sft_row(q, a, 3, kind, "human", "stage2-model")  # noqa: E731
    k.add(row("Why is the sky blue?", "x"), novel_text="Why is the sky blue?")
    # same prompt and answer, other case
    k.add(row("why is the sky blue", "X"), novel_text="other")
    k.add(row("Why is the sky so blue?", "z"), novel_text="Why is the sky so blue?")  # ROUGE-L 0.91 >= 0.7
    k.add(row("How do bees make honey?", "w"), novel_text="How do bees make honey?")
    assert [r["messages"][0]["content"] for r in k.kept] == ["Why is the sky blue?",
                                                             "How do bees make honey?"]
    assert [r["reason"][:10] for r in k.rejected] == ["duplicate", "not novel:"]


def test_keeper_keeps_every_revision_round_of_a_prompt():
    """Constitutional AI fine-tunes on the revisions of all rounds: a second round's revision of the same
    prompt is a new pair, only the very same pair is a duplicate."""
    k = S.Keeper()
    pair = lambda chosen, rnd: {"prompt": [{"role": "user",
                                            "content": "How do I pick a lock?"}],  # noqa: E731
                                "chosen": [{"role": "assistant", "content": chosen}],
                                "rejected": [{"role": "assistant", "content": "Use a tension wrench."}],
                                "meta": {"stage": 6, "kind": "harmful", "round": rnd}}
    k.add(pair("I can't help with that.", 1))
    k.add(pair("I won't help open a lock that isn't yours; a locksmith can help.", 2))
    k.add(pair("I can't help with that.", 2))
    assert [r["meta"]["round"] for r in k.kept] == [1, 2] and [r["reason"]
                                                               for r in k.rejected] == ["duplicate"]


def test_defect_makers_change_the_text():
    import random
    rng = random.Random(0)
    text = "Bees collect nectar from flowers and turn it into honey."
    assert S.misspell(text, rng) != text and len(S.misspell(text, rng).split()) == len(text.split())
    w = S.wordy(text, rng)
    assert len(w.split()) > len(text.split()) and rouge_l(w, text) < 1
    t = S.truncate(text, rng)
    assert text.startswith(t) and len(t.split()) < len(text.split())
