"""train_sft.py and train_dpo.py never report stale results as new and never keep or publish a broken model:
an output folder is reused only by the training that wrote it (same settings, data and base), the weights are
checked after every update (non-finite, collapsed), and the small things: a torn log line, non-UTF-8 data,
the output layout, file modes and strict JSON. (Refusals are train_sft.StaleOutput, a ValueError; stops are
train_sft.TrainingStopped, a RuntimeError.)"""
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import files
import model as M
import train_dpo as D
import train
import train_sft as sft
from test_train_sft import cfg_for, log, qa_rows, tiny_base, write_jsonl


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("base"))


def adapter(out):
    path = Path(out) / "adapter" / "adapter_model.safetensors"
    # (or the old layout)
    return load_file(str(path if path.exists() else Path(out) / "adapter_model.safetensors"))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def other_rows():
    return [{"messages": [{"role": "user", "content": f"name {i}?"},
                          {"role": "assistant", "content": f"Name {chr(65 + i)}."}]} for i in range(8)]


# ----------------------------------------------------------------------------- resume only what matches

def test_other_data_in_a_finished_output_folder_is_refused_not_reused(tmp_path, base, capsys):
    # the issue's case: the same command with --data b.jsonl silently kept a.jsonl's adapter and exited 0
    a, b = write_jsonl(tmp_path / "a.jsonl", qa_rows(8)), write_jsonl(tmp_path / "b.jsonl", other_rows())
    out = tmp_path / "o"
    flags = ["--base", str(base), "--out", str(out), "--max-steps", "2", "--lr", "1e-2", "--lora-r", "4",
             "--precision", "fp32", "--device", "cpu", "--eval-frac", "0"]
    sft.main(flags + ["--data", a])
    first = adapter(out)
    with pytest.raises(SystemExit) as e:
        sft.main(flags + ["--data", b])
    assert e.value.code != 0 and "data sha256" in str(e.value) and "--overwrite" in str(e.value)
    assert same(adapter(out), first)
    sft.main(flags + ["--data", b, "--overwrite"])   # starts over: b's adapter, as in a fresh folder
    sft.main([*flags[:2], *flags[4:], "--out", str(tmp_path / "fresh"), "--data", b])
    assert same(adapter(out), adapter(tmp_path / "fresh")) and not same(adapter(out), first)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fingerprint"]["data_sha256"] == files.sha256_file(b)
    capsys.readouterr()


def test_other_settings_or_base_are_refused_and_rows_count_as_data(tmp_path, base):
    cfg = cfg_for(tmp_path, base, max_steps=2)
    sft.train(cfg, qa_rows(8))
    with pytest.raises(ValueError, match=r"lr 0.003 \(now 0.001\)"):
        sft.train(cfg_for(tmp_path, base, max_steps=2, lr=1e-3), qa_rows(8))
    with pytest.raises(ValueError, match="data sha256"):   # rows given in memory are fingerprinted too
        sft.train(cfg, qa_rows(9))
    other = tiny_base(tmp_path / "base2", seed=1)
    with pytest.raises(ValueError, match="base weights sha256"):
        sft.train(cfg_for(tmp_path, other, max_steps=2), qa_rows(8))
    assert sft.train(cfg, qa_rows(8))["steps"] == 2   # the same training is still reused


def test_a_checkpoint_of_another_training_is_not_resumed(tmp_path, base, monkeypatch):
    # a bootstrap retry trains longer into the same folder: its checkpoint must not be resumed as a shorter
    # run
    rows = qa_rows(12)
    real = train.save_checkpoint

    def die_at_4(path, model, opt, scaler, state):
        real(path, model, opt, scaler, state)
        if state["step"] == 4:
            raise KeyboardInterrupt
    monkeypatch.setattr(train, "save_checkpoint", die_at_4)
    with pytest.raises(KeyboardInterrupt):
        sft.train(cfg_for(tmp_path, base, epochs=6, batch_size=3, save_every=2), rows)
    monkeypatch.setattr(train, "save_checkpoint", real)
    with pytest.raises(ValueError, match=r"checkpoint comes from another training: epochs 6 \(now 2\)"):
        sft.train(cfg_for(tmp_path, base, epochs=2, batch_size=3, save_every=2), rows)
    assert not (tmp_path / "out" / "adapter").exists()


def test_an_output_folder_of_the_older_layout_or_foreign_files_is_refused(tmp_path, base):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"steps": 3, "config": {}}))   # an older version's summary
    with pytest.raises(ValueError, match="no fingerprint"):
        sft.train(cfg_for(tmp_path, base, max_steps=1), qa_rows(4))
    (out / "summary.json").unlink()
    (out / "model").mkdir()   # someone else's model folder: never replaced silently
    with pytest.raises(ValueError, match="already holds model"):
        sft.train(cfg_for(tmp_path, base, max_steps=1), qa_rows(4))


def test_dpo_output_folder_is_fingerprinted_too(tmp_path, base):
    pairs = [{"prompt": f"colour {i}?", "chosen": f"blue {i}", "rejected": f"red {i}"} for i in range(6)]
    cfg = D.DPOConfig(base=str(base), out=str(tmp_path / "o"), epochs=1, lr=1e-3, lora_r=4, lora_alpha=8,
                      batch_size=2, max_len=64, precision="fp32", device="cpu", warmup=0, eval_frac=0.0)
    D.train(cfg, pairs)
    with pytest.raises(ValueError, match=r"beta 0.1 \(now 0.2\)"):
        D.train(D.DPOConfig(**{**cfg.__dict__, "beta": 0.2}), pairs)


# ------------------------------------------------------------------------- weights checked after every update


def poison_update_at(monkeypatch, step):
    """Make the optimizer's `step`-th update write a NaN into the adapter (as --lr inf did)."""
    real, calls = torch.optim.AdamW.step, [0]

    def poisoned(self, *a, **kw):
        out = real(self, *a, **kw)
        calls[0] += 1
        if calls[0] == step:
            with torch.no_grad():
                self.param_groups[0]["params"][1].view(-1)[0] = float("nan")
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)


def published(out):
    """What a finished training leaves in <out> (in this layout or the older one-folder layout)."""
    names = ("model", "adapter", "summary.json", "model.safetensors", "adapter_model.safetensors")
    return [n for n in names if (Path(out) / n).exists()]


def test_non_finite_weights_stop_the_run_and_the_last_finite_checkpoint_is_kept(tmp_path, base, monkeypatch):
    poison_update_at(monkeypatch, 3)
    cfg = cfg_for(tmp_path, base, save_every=1, max_steps=6)
    with pytest.raises(RuntimeError, match=r"step 3: the update made the adapter weights NaN or Inf.*"
                                                r"all finite is kept: .*state.safetensors \(step 2\)"):
        sft.train(cfg, qa_rows(8))
    ckpt = Path(cfg.out) / "checkpoint" / "state.safetensors"
    with safe_open(str(ckpt), "pt") as f:
        assert json.loads(f.metadata()["state"])["step"] == 2
    assert all(torch.isfinite(t).all() for k, t in load_file(ckpt).items() if t.is_floating_point())
    assert published(cfg.out) == []


def test_a_non_finite_first_update_publishes_nothing(tmp_path, base, monkeypatch):
    poison_update_at(monkeypatch, 1)   # --max-steps 1 used to publish a NaN model and exit 0
    cfg = cfg_for(tmp_path, base, max_steps=1)
    with pytest.raises(RuntimeError, match="no checkpoint was written"):
        sft.train(cfg, qa_rows(8))
    assert published(cfg.out) == [] and not (Path(cfg.out) / "checkpoint").exists()


def test_a_collapse_to_a_uniform_guess_stops_the_run(tmp_path, base):
    # lr 1e9: from step 2 on the loss is ln(vocab) and the gradient 0; it used to publish a dead model, exit 0
    cfg = cfg_for(tmp_path, base, lr=1e9, warmup=0, max_steps=10, save_every=1)
    with pytest.raises(RuntimeError, match=r"collapsed: the loss has sat at ln\(vocab\) = 5.557.*\(step 1\), "
                                                r"but the update of step 1 had already collapsed it"):
        sft.train(cfg, qa_rows(8))
    steps = [r["step"] for r in log(cfg)]
    assert steps == list(range(1, train.COLLAPSE_STEPS + 2))   # stopped after COLLAPSE_STEPS dead steps
    assert published(cfg.out) == []
    with safe_open(str(Path(cfg.out) / "checkpoint" / "state.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["state"])["step"] == 1   # the dead steps were not checkpointed


def test_the_collapse_of_a_dpo_policy_is_caught_too(tmp_path, base):
    pairs = [{"prompt": f"colour {i}?", "chosen": f"blue {i}", "rejected": f"red {i}"} for i in range(8)]
    cfg = D.DPOConfig(base=str(base), out=str(tmp_path / "o"), epochs=5, lr=1e9, lora_r=4, lora_alpha=8,
                      batch_size=2, max_len=64, precision="fp32", device="cpu", warmup=0, eval_frac=0.0)
    with pytest.raises(RuntimeError, match="collapsed"):
        D.train(cfg, pairs)
    assert published(cfg.out) == []


# ----------------------------------------------------------------------------- the small things

def test_a_torn_last_log_line_is_dropped_on_resume(tmp_path, base, monkeypatch):
    rows = qa_rows(10)
    kw = dict(epochs=3, batch_size=3, save_every=2)
    full = sft.train(cfg_for(tmp_path, base, out=str(tmp_path / "full"), **kw), rows)
    cfg = cfg_for(tmp_path, base, out=str(tmp_path / "killed"), **kw)
    real = train.save_checkpoint

    def die_at_4(path, model, opt, scaler, state):
        real(path, model, opt, scaler, state)
        if state["step"] == 4:
            raise KeyboardInterrupt
    monkeypatch.setattr(train, "save_checkpoint", die_at_4)
    with pytest.raises(KeyboardInterrupt):
        sft.train(cfg, rows)
    monkeypatch.setattr(train, "save_checkpoint", real)
    with open(Path(cfg.out) / "train.jsonl", "a") as f:
        f.write('{"step": 5, "epoch": 1, "lo')   # killed in the middle of a log write
    resumed = sft.train(cfg, rows)
    assert [r["step"] for r in log(cfg)] == list(range(1, full["steps"] + 1))
    assert resumed["train_loss"] == full["train_loss"] and same(adapter(cfg.out), adapter(tmp_path / "full"))


def test_non_utf8_data_lines_name_file_and_line_and_honour_skip_bad(tmp_path, base):
    good = json.dumps(qa_rows(1)[0]).encode()
    p = tmp_path / "d.jsonl"
    p.write_bytes(good + b"\n" + b'{"messages": "caf\xe9"}\n' + good + b"\n")   # latin-1, not UTF-8
    with pytest.raises(ValueError, match=r"d.jsonl:2: not UTF-8"):
        sft.train(cfg_for(tmp_path, base, data=str(p)))
    s = sft.train(cfg_for(tmp_path, base, data=str(p), skip_bad=True, max_steps=1,
                          out=str(tmp_path / "skip")))
    assert s["dropped"]["bad"] == 1


def test_outputs_are_two_folders_with_ordinary_modes_and_strict_json(tmp_path, base):
    old = os.umask(0o022)
    try:
        cfg = cfg_for(tmp_path, base, max_steps=2, eval_frac=0.3)
        sft.train(cfg, qa_rows(8))
        train.write_summary(cfg, {"train_loss": float("nan"), "eval_loss": float("inf")}, {"bad": 0})
    finally:
        os.umask(old)
    out = Path(cfg.out)
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoint", "model", "summary.json",
                                                      "train.jsonl", "train_config.json"]
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json",
                                                                   "adapter_model.safetensors"]
    for p in out.rglob("*"):
        assert os.stat(p).st_mode & 0o777 == (0o755 if p.is_dir() else 0o644), p
    text = (out / "summary.json").read_text()
    summary = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert summary["train_loss"] is None and summary["eval_loss"] is None


def test_a_bf16_training_merges_its_adapter_folder_into_the_full_precision_parent(tmp_path, base):
    # the path CUDA takes: weights trained over a bf16 copy, merged into the fp32 parent read from disk
    cfg = cfg_for(tmp_path, base, max_steps=2, lr=1e-2, precision="bf16")
    sft.train(cfg, qa_rows(8))
    merged, _ = M.load(Path(cfg.out) / "model")
    parent, _ = M.load(base)
    x = torch.randint(0, 259, (2, 16))
    with torch.no_grad():
        before = parent(x)
        want = M.load_adapter(parent, Path(cfg.out) / "adapter")(x)
        got = merged(x)
    assert merged.lm_head.weight.dtype == torch.float32
    assert (want - before).abs().max() > 1e-3 and (got - want).abs().max() <= 1e-5
