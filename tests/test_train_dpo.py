"""train_dpo.py on a tiny random model: the loss by hand, policy = reference at the start, learning a
preference, exact resume, precomputed references, and the errors a user meets on bad pairs."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_sft import log, tiny_base, write_jsonl  # noqa: E402

import model as M  # noqa: E402
import train_dpo as D  # noqa: E402
import train  # noqa: E402


def pairs(n=20):
    return [{"prompt": f"colour {i}?", "chosen": f"blue {i}", "rejected": f"red {i}"} for i in range(n)]


def cfg_for(tmp_path, base, **kw):
    d = dict(base=str(base), out=str(tmp_path / "out"), epochs=2, lr=1e-3, lora_r=8, lora_alpha=16,
             batch_size=2, max_len=64, precision="fp32", device="cpu", warmup=0, eval_frac=0.0,
             save_every=1000)


    return D.DPOConfig(**{**d, **kw})


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("base"))


def test_dpo_loss_equals_the_formula_by_hand():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-3.0, -5.0, -4.0, -4.5))
    h = (-3.0 - -5.0) - (-4.0 - -4.5)  # 1.5
    sig = lambda z: 1 / (1 + math.exp(-z))
    losses, c, r = D.dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert abs(losses.item() + math.log(sig(0.5 * h))) < 1e-6
    assert abs(c.item() - 0.5 * 1.0) < 1e-6 and abs(r.item() - 0.5 * -0.5) < 1e-6
    losses, _, _ = D.dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.2)
    want = -0.8 * math.log(sig(0.5 * h)) - 0.2 * math.log(sig(-0.5 * h))
    assert abs(losses.item() - want) < 1e-6
    losses, _, _ = D.dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo")
    assert abs(losses.item() - (h - 1 / (2 * 0.5)) ** 2) < 1e-6


def test_response_mask_covers_the_answer_and_its_end_of_turn_only(base):
    _, tok = M.load(base)
    ex = D.dpo_example(tok, 100)({"prompt": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "yo"},
                                             {"role": "user", "content": "and?"}], "chosen": "good",
                                  "rejected": "bad"})
    for k, want in (("chosen", "good"), ("rejected", "bad")):
        e = ex[k]
        targets = [t for t, m in zip(e["ids"], e["mask"]) if m]  # the earlier "yo" turn is prompt, not target
        assert tok.decode(targets[:-1]) == want and targets[-1] == 258


def test_first_step_policy_equals_reference_loss_is_ln2_and_rewards_zero(tmp_path, base):
    for pre in (False, True):
        cfg = cfg_for(tmp_path, base, max_steps=1, precompute_ref=pre, out=str(tmp_path / f"o{pre}"))
        D.train(cfg, pairs(6))
        first = log(cfg)[0]
        assert abs(first["loss"] - math.log(2)) < 1e-4
        assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margin"] == 0.0


def test_twenty_pairs_reach_full_accuracy_growing_margin_and_greedy_moves_to_chosen(tmp_path, base):
    rows = pairs(20)
    cfg = cfg_for(tmp_path, base, epochs=6, lr=2e-3, batch_size=4, beta=0.1, lora_r=16, lora_alpha=32)
    s = D.train(cfg, rows)
    steps = log(cfg)
    assert steps[-1]["rewards/accuracy"] == 1.0 and steps[-1]["running/rewards/accuracy"] > 0.9
    assert steps[-1]["rewards/margin"] > steps[0]["rewards/margin"] + 1.0
    assert s["train_loss"] < 0.1
    parent, tok = M.load(base)
    tuned, _ = M.load(Path(cfg.out) / "model")
    batch = D.collate_pairs([D.dpo_example(tok, 64)(r) for r in rows], tok.pad_id)
    with torch.no_grad():
        before, after = (train.policy_logprobs(m, batch) for m in (parent, tuned))
    n = len(rows)
    # chosen gained on rejected, every pair
    assert ((after[:n] - after[n:]) > (before[:n] - before[n:])).all()
    ids, _ = tok.encode_chat([{"role": "user", "content": "colour 3?"}], add_generation_prompt=True)
    x = torch.tensor([ids])
    with torch.no_grad():
        first = [m(x)[0, -1] for m in (parent, tuned)]
    b, r = tok.encode("b")[0], tok.encode("r")[0]  # the answers' first tokens
    assert (first[1][b] - first[1][r]) > (first[0][b] - first[0][r]) and first[1][b] > first[1][r]


def test_resume_is_exact(tmp_path, base, monkeypatch):
    rows = pairs(8)
    full = D.train(cfg_for(tmp_path, base, out=str(tmp_path / "full"), epochs=3, save_every=3), rows)
    cfg = cfg_for(tmp_path, base, out=str(tmp_path / "killed"), epochs=3, save_every=3)
    real = train.save_checkpoint

    def save_then_die(path, model, opt, scaler, state):
        real(path, model, opt, scaler, state)
        if state["step"] == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        D.train(cfg, rows)
    monkeypatch.setattr(train, "save_checkpoint", real)
    resumed = D.train(cfg, rows)
    a, b = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors"))
            for d in ("full", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a) and resumed["train_loss"] == full["train_loss"]


def test_precomputed_reference_gives_the_same_training(tmp_path, base):
    rows = pairs(6)
    on = D.train(cfg_for(tmp_path, base, out=str(tmp_path / "pre"), precompute_ref=True), rows)
    off = D.train(cfg_for(tmp_path, base, out=str(tmp_path / "live")), rows)
    assert len(json.loads((tmp_path / "pre" / "ref_logps.json").read_text())) == 6
    assert abs(on["train_loss"] - off["train_loss"]) < 1e-5


def test_bad_pairs_error_with_file_and_line_or_are_counted_when_asked(tmp_path, base):
    good = json.dumps(pairs(1)[0])
    bad = {"missing field": {"prompt": "p", "chosen": "a"},
           "identical": {"prompt": "p", "chosen": "a", "rejected": "a"},
           "empty chosen response": {"prompt": "p", "chosen": "  ", "rejected": "a"}}
    for what, row in bad.items():
        p = tmp_path / "d.jsonl"
        p.write_text(f"{good}\n{good}\n{json.dumps(row)}\n")
        with pytest.raises(ValueError, match=f"d.jsonl:3: .*{what}"):
            D.train(cfg_for(tmp_path, base, data=str(p)))
    rows = pairs(4) + list(bad.values())
    s = D.train(cfg_for(tmp_path, base, data=write_jsonl(tmp_path / "m.jsonl", rows), skip_bad=True,
                        max_steps=1))
    assert s["dropped"]["bad"] == 3
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        D.train(cfg_for(tmp_path, base, data=str(tmp_path / "e.jsonl"), out=str(tmp_path / "e")))


def test_cli_has_the_dpo_flags_with_help():
    cfg = train.parse_config(D.DPOConfig, ["--data", "x", "--out", "y", "--beta", "0.3", "--loss-type", "ipo",
                                       "--precompute-ref"])
    assert cfg.beta == 0.3 and cfg.loss_type == "ipo" and cfg.precompute_ref and cfg.lr == D.DPOConfig.lr
