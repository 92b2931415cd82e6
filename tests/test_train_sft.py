"""train_sft.py on a tiny random model: the masked loss by hand, accumulation, learning, exact resume,
torchrun against one process, outputs PEFT can read, and the errors a user meets on bad data."""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import builtin  # noqa: E402
import files  # noqa: E402
import model as M  # noqa: E402
import train  # noqa: E402
import train_sft as sft  # noqa: E402

IM_END = 258


def tiny_base(path, pad="<|endoftext|>", seed=0):
    """The tiny random model, its embeddings large enough that the tied head can be confident."""
    return builtin.tiny_model(path, seed=seed, pad=pad, embed_std=0.25, weight_std=0.05)


def qa_rows(n=20):
    return [{"messages": [{"role": "user", "content": f"code {i}?"},
                          {"role": "assistant",
                           "content": f"It is {chr(97 + i % 26)}{i * 7 % 10}."}]} for i in range(n)]


def write_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cfg_for(tmp_path, base, **kw):
    d = dict(base=str(base), out=str(tmp_path / "out"), epochs=2, lr=3e-3, lora_r=8, lora_alpha=16,
             batch_size=4, max_len=64, precision="fp32", device="cpu", warmup=2, eval_frac=0.0,
             save_every=1000)
    return sft.SFTConfig(**{**d, **kw})


def log(cfg):
    return [json.loads(line) for line in Path(cfg.out, "train.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("base"))


@pytest.mark.parametrize("pad", ["<|endoftext|>", "<|im_end|>"])
def test_loss_equals_hand_masked_cross_entropy_and_end_of_turn_is_a_target(tmp_path, pad):
    # pad == end-of-turn is the TRL #976 trap: masking by id would drop every <|im_end|> target
    net, tok = M.load(tiny_base(tmp_path, pad=pad))
    M.apply_lora(net, 4, 8)
    rows = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}],
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a longer question?"},
             {"role": "assistant", "content": "ok"}]]
    ex = [sft.sft_example(tok, 100)({"messages": m}) for m in rows]
    batch = train.collate(ex, tok.pad_id)
    assert batch["tokens"].shape == (2, max(len(e["ids"]) for e in ex))
    for e, lm, am in zip(ex, batch["loss_mask"], batch["attention_mask"]):
        n = len(e["ids"])
        assert lm[n:].sum() == 0 and am[n:].sum() == 0 and am[:n].all()        # pads: no loss, no attention
        targets = [t for t, m in zip(e["ids"], e["mask"]) if m]
        assert tok.decode(targets[:-1]) in ("hello there", "ok") and targets[-1] == IM_END
    with torch.no_grad():
        got = sft.sft_loss(net, batch)[0] / sft.sft_count(batch)
        total, count = 0.0, 0
        for e in ex:  # each row alone, unpadded, by the formula
            ids = torch.tensor([e["ids"]])
            logp = F.log_softmax(net(ids)[0].double(), -1)
            for t in range(1, len(e["ids"])):
                if e["mask"][t]:
                    total, count = total - logp[t - 1, e["ids"][t]].item(), count + 1
    assert count == sft.sft_count(batch)
    assert abs(got.item() - total / count) < 1e-5


def test_fused_logprobs_and_gradient_equal_full_logits(base):
    net, tok = M.load(base)
    M.apply_lora(net, 4, 8)
    torch.nn.init.normal_(net.model.layers[0].self_attn.q_proj.lora_B.weight)
    batch = train.collate([sft.sft_example(tok, 100)(r) for r in qa_rows(3)], tok.pad_id)
    args = batch["tokens"][:, 1:], batch["loss_mask"][:, 1:]
    grads = []
    for fused in (True, False):
        lp = train.policy_logprobs(net, batch) if fused else train.sequence_logprobs(
            net(batch["tokens"], attention_mask=batch["attention_mask"])[:, :-1], *args)
        lp.sum().backward()
        grads.append((lp.detach(), [p.grad.clone() for p in M.lora_parameters(net)]))
        net.zero_grad()
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads[0][1], grads[1][1]))


def test_truncation_drops_rows_without_a_target_and_counts_them(tmp_path, base):
    rows = qa_rows(6) + [{"messages": [{"role": "user", "content": "x" * 200},
                                       {"role": "assistant", "content": "y"}]}]
    s = sft.train(cfg_for(tmp_path, base, max_len=40, max_steps=1), rows)
    assert s["dropped"] == {"bad": 0, "no_target": 1}
    with pytest.raises(ValueError, match="no usable rows"):
        sft.train(cfg_for(tmp_path, base, max_len=10, out=str(tmp_path / "o2")), rows)


def test_length_buckets_keep_padding_under_a_tenth_and_visit_every_row_once(tmp_path):
    tok = M.load_tokenizer(tiny_base(tmp_path))
    rows = files.read_jsonl(ROOT / "data" / "stage1_seed.jsonl")
    lengths = [len(tok.encode_chat(r["messages"])[0]) for r in rows]
    for bs in (4, 8, 16):
        epochs = [train.epoch_batches(lengths, bs, 0, e) for e in range(2)]
        # seeded, new each epoch
        assert epochs[0] != epochs[1] and epochs[0] == train.epoch_batches(lengths, bs, 0, 0)
        for batches in epochs:
            assert sorted(i for b in batches for i in b) == list(range(len(rows)))
            cells = sum(max(lengths[i] for i in b) * len(b) for b in batches)
            assert 1 - sum(lengths) / cells < 0.10


def test_logged_tokens_are_target_tokens(tmp_path, base):
    rows = [{"messages": [{"role": "user", "content": "q" * (10 + 7 * i)},
                          {"role": "assistant", "content": "ab" * (1 + i)}]}
            for i in range(6)]
    cfg = cfg_for(tmp_path, base, epochs=2, batch_size=4, max_len=128)
    s = sft.train(cfg, rows)
    _, tok = M.load(base)
    ids, masks = zip(*(tok.encode_chat(r["messages"]) for r in rows))
    assert max(map(len, ids)) < 128 and sum(map(len, ids)) > 3 * sum(map(sum, masks))  # mostly prompt tokens
    assert s["tokens"] == 2 * sum(sum(m[1:]) for m in masks)
    steps = log(cfg_for(tmp_path, base))
    assert len(steps) == s["steps"] and all(r["tokens_per_s"] > 0 for r in steps)


def test_get_lr_warms_up_then_decays_by_cosine_to_the_floor():
    cfg = sft.SFTConfig(lr=1.0, warmup=4, min_lr_ratio=0.1)
    lrs = [train.get_lr(s, cfg, 20) for s in range(21)]
    assert lrs[:4] == sorted(lrs[:4]) and lrs[3] < 1.0 and lrs[4] == 1.0
    assert lrs[4:] == sorted(lrs[4:], reverse=True) and abs(lrs[20] - 0.1) < 1e-12


def test_grad_accumulation_equals_one_batch_k_times_larger(tmp_path, base):
    # 4 rows of different lengths: one step is the whole set either way, so the updates must agree
    rows = [{"messages": [{"role": "user", "content": "q" * (1 + 5 * i)},
                          {"role": "assistant", "content": "a" * (2 + 9 * i)}]}
            for i in range(4)]
    big = sft.train(cfg_for(tmp_path, base, batch_size=4, grad_accum=1, epochs=3, out=str(tmp_path / "big")),
                    rows)
    acc = sft.train(cfg_for(tmp_path, base, batch_size=1, grad_accum=4, epochs=3, out=str(tmp_path / "acc")),
                    rows)


    assert big["steps"] == acc["steps"] == 3
    a, b = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("big", "acc"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    la, lb = ([r["loss"] for r in log(sft.SFTConfig(out=str(tmp_path / d)))] for d in ("big", "acc"))
    assert max(abs(x - y) for x, y in zip(la, lb)) <= 1e-5


def test_twenty_examples_are_learned_and_greedy_reproduces_an_answer(tmp_path, base):
    rows = qa_rows(20)
    cfg = cfg_for(tmp_path, base, epochs=60, lr=3e-3, lora_r=16, lora_alpha=32, warmup=5)
    s = sft.train(cfg, rows)
    assert s["train_loss"] < 0.1
    net, tok = M.load(Path(cfg.out) / "model")  # the merged model, as written
    for row in rows[:3]:
        ids, _ = tok.encode_chat(row["messages"][:1], add_generation_prompt=True)
        x = torch.tensor([ids])
        with torch.no_grad():
            for _ in range(12):
                nxt = net(x)[0, -1].argmax()
                x = torch.cat([x, nxt.view(1, 1)], 1)
                if nxt.item() == IM_END:
                    break
        assert tok.decode(x[0, len(ids):].tolist()) == row["messages"][1]["content"]


def test_outputs_are_a_merged_model_and_a_peft_adapter_naming_its_parent(tmp_path, base):
    cfg = cfg_for(tmp_path, base, max_steps=3, lr=1e-2)
    sft.train(cfg, qa_rows(8))
    out = Path(cfg.out)
    acfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == str(Path(base).resolve()) and acfg["r"] == 8
    assert json.loads((out / "train_config.json").read_text())["lr"] == 1e-2
    assert sorted(p.name for p in (out / "model").iterdir()) == ["config.json", "model.safetensors",
                                                                 "tokenizer.json",
                                                                  # no adapter files beside
                                                                  "tokenizer_config.json"]
    merged, _ = M.load(out / "model")
    parent, _ = M.load(base)
    x = torch.randint(0, 259, (2, 20))
    with torch.no_grad():
        ref = parent(x)
        with_adapter = M.load_adapter(parent, out / "adapter")(x)
        got = merged(x)
    assert (with_adapter - ref).abs().max() > 1e-3  # the adapter changes the outputs (peft #1579)
    assert torch.allclose(got, with_adapter, atol=1e-5)
    peft = pytest.importorskip("peft")
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    pm = peft.PeftModel.from_pretrained(hf, out / "adapter").eval()
    merged_hf = transformers.AutoModelForCausalLM.from_pretrained(out / "model").eval()
    with torch.no_grad():
        assert torch.allclose(pm(input_ids=x).logits, got, atol=1e-4)
        assert torch.allclose(merged_hf(input_ids=x).logits, got, atol=1e-4)


class Killed(Exception):
    pass


def test_resume_after_kill_gives_the_same_adapter_and_a_finished_run_is_not_redone(tmp_path, base,
                                                                                    monkeypatch):

    rows = qa_rows(10)
    kw = dict(epochs=3, batch_size=3, save_every=2, lora_dropout=0.1)  # dropout: RNG must line up too
    full = sft.train(cfg_for(tmp_path, base, out=str(tmp_path / "full"), **kw), rows)
    cfg = cfg_for(tmp_path, base, out=str(tmp_path / "killed"), **kw)
    real = train.save_checkpoint

    def save_then_die(path, model, opt, scaler, state):
        real(path, model, opt, scaler, state)
        if state["step"] == 4:
            raise Killed  # killed right after the step-4 checkpoint

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        sft.train(cfg, rows)
    monkeypatch.setattr(train, "save_checkpoint", real)
    assert not (Path(cfg.out) / "adapter").exists()
    resumed = sft.train(cfg, rows)
    a, b = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors"))
            for d in ("full", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["steps"] == full["steps"] and resumed["train_loss"] == full["train_loss"]
    assert [r["step"] for r in log(cfg)] == list(range(1, full["steps"] + 1))
    assert [r["loss"] for r in log(cfg)] == [r["loss"] for r in log(replace(cfg, out=str(tmp_path / "full")))]
    monkeypatch.setattr(sft, "setup", lambda cfg: pytest.fail("a finished run was redone"))
    assert sft.train(cfg, rows)["steps"] == full["steps"]


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, base):
    cfg = cfg_for(tmp_path, base, lr=1e30, warmup=0, save_every=1, max_steps=6)
    with pytest.raises(RuntimeError,
                       match=r"loss is (nan|inf).*last checkpoint whose weights are all finite is kept"):
        sft.train(cfg, qa_rows(8))
    from safetensors import safe_open
    with safe_open(str(Path(cfg.out) / "checkpoint" / "state.safetensors"), "pt") as f:
        step = json.loads(f.metadata()["state"])["step"]
    assert 1 <= step < 6 and len(log(cfg)) == step


def test_bad_data_errors_name_the_file_and_line(tmp_path, base):
    good = json.dumps(qa_rows(1)[0])
    cases = {"not JSON": f"{good}\n{{oops\n",
             "no assistant turn": f'{good}\n\n{{"messages": [{{"role": "user", "content": "hi"}}]}}\n',
             "unknown role": f'{good}\n{{"messages": [{{"role": "bot", "content": "hi"}}, '
                             f'{{"role": "assistant", "content": "x"}}]}}\n'}
    for what, text in cases.items():
        p = tmp_path / "d.jsonl"
        p.write_text(text)
        line = 3 if what == "no assistant turn" else 2
        with pytest.raises(ValueError, match=f"d.jsonl:{line}: .*{what}"):
            sft.train(cfg_for(tmp_path, base, data=str(p)))
    p.write_text(f"{good}\n[1, 2]\n")
    with pytest.raises(ValueError, match="d.jsonl:2: expected a JSON object"):
        files.read_jsonl(p)
    p.write_text(f"{good}\n\n{good}\n")
    assert files.read_jsonl(p) == [json.loads(good)] * 2
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        sft.train(cfg_for(tmp_path, base, data=str(tmp_path / "e.jsonl")))
    p.write_text(f"{good}\n{{oops\n{good}\n")
    s = sft.train(cfg_for(tmp_path, base, data=str(p), skip_bad=True, max_steps=1,
                          out=str(tmp_path / "skip")))
    assert s["dropped"]["bad"] == 1


def test_cli_flags_come_from_the_config_with_help_and_defaults():
    out = subprocess.run([sys.executable, str(ROOT / "train_sft.py"), "--help"], capture_output=True,
                         text=True,
                         check=True).stdout
    for f in sft.SFTConfig.__dataclass_fields__:
        assert "--" + f.replace("_", "-") in out
    cfg = train.parse_config(sft.SFTConfig, ["--data", "x", "--out", "y", "--lora-r", "4", "--overwrite"])
    assert cfg.lora_r == 4 and cfg.overwrite is True and cfg.lr == sft.SFTConfig.lr


def test_torchrun_two_processes_match_one_process_with_twice_the_accumulation(tmp_path, base):
    rows = [{"messages": [{"role": "user", "content": "q" * (1 + i % 5)},
                          {"role": "assistant", "content": "ab" * (1 + i)}]}
            for i in range(11)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    kw = dict(data=data, batch_size=2, epochs=2, lora_dropout=0.0)
    one = cfg_for(tmp_path, base, grad_accum=2, out=str(tmp_path / "one"), **kw)
    sft.train(one)
    two = cfg_for(tmp_path, base, grad_accum=1, out=str(tmp_path / "two"), **kw)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(two).items() if not isinstance(v, bool)
             and v != ""]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "train_sft.py"), *flags], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    l1, l2 = log(one), log(two)
    assert len(l1) == len(l2) == 6
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(l1, l2)) <= 1e-4
    a, b = (load_file(str(Path(c.out) / "adapter" / "adapter_model.safetensors")) for c in (one, two))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4


def test_activation_checkpointing_gives_the_same_update(tmp_path, base):
    outs = []
    for ckpt in (False, True):
        cfg = cfg_for(tmp_path, base, grad_checkpoint=ckpt, max_steps=2, out=str(tmp_path / f"c{ckpt}"))
        sft.train(cfg, qa_rows(8))
        outs.append(load_file(str(Path(cfg.out) / "adapter" / "adapter_model.safetensors")))
    assert max((outs[0][k] - outs[1][k]).abs().max().item() for k in outs[0]) <= 1e-6
