"""generate.py: cached greedy against a cache-free loop and transformers, batching against single
prompts, the sampling math against hand computation, stop handling on scripted models, and the CLI."""
import copy
import io
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import files  # noqa: E402
import builtin  # noqa: E402
import generate as G  # noqa: E402
import sampling  # noqa: E402
import model as M  # noqa: E402
from test_model import make_hf, transformers  # noqa: E402,F401  (transformers: skips this file without it)

PROMPTS = ["What is the capital of France?", "Name three colours.",
           [{"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Is ice cold?"}]]


def greedy_no_cache(net, ids, n, stop_ids):
    """The obvious reference: recompute the whole sequence for every new token."""
    x, out = torch.tensor([ids]), []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(net(x)[0, -1].argmax())
            if nxt in stop_ids:
                break
            out.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], 1)
    return out


def chat_ids(tok, prompts):
    return [tok.encode_chat(p, add_generation_prompt=True)[0] for p in prompts]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """2 layers, dim 64, byte vocabulary; weights wide enough that greedy text varies from token to token."""
    path = tmp_path_factory.mktemp("tiny")
    make_hf(path, "llama3_rope")  # untied: with tied embeddings a random model mostly repeats its last token
    net, tok = M.load(path)
    torch.manual_seed(0)
    with torch.no_grad():  # transformers' init (std 0.02) gives near-uniform logits
        for n, p in net.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.5 / p.shape[1] ** 0.5 if "embed" not in n else 1.0)
    M.save_pretrained(net, tok, path)
    return path, net, tok


@pytest.fixture(scope="module")
def default():
    net, tok = M.load(builtin.default_base())
    return net, tok


# ----------------------------------------------------------------------------- cache, batching, transformers


def test_choice_logprobs_equal_the_unpadded_next_token_distribution(tiny):
    """The judge's A/B reading: in a left-padded batch, each prompt's option log-probs equal a plain forward
    pass."""
    _, net, tok = tiny
    prompts = PROMPTS + ["x"]
    got = G.choice_logprobs(net, tok, prompts, ["A", "B"], batch_size=3)
    a, b = tok.encode("A")[0], tok.encode("B")[0]
    for ids, row in zip(chat_ids(tok, prompts), got):
        with torch.no_grad():
            ref = net(torch.tensor([ids]))[0, -1].log_softmax(-1)
        assert row == pytest.approx([ref[a].item(), ref[b].item()], abs=1e-4)


def test_tiny_greedy_with_cache_equals_greedy_without(tiny):
    _, net, tok = tiny
    for ids in chat_ids(tok, PROMPTS):
        out = G.generate_batch(net, tok, [ids], max_new_tokens=24)[0][0]
        assert out == greedy_no_cache(net, ids, 24, tok.stop_ids)
        assert len(set(out)) > 5  # a varied continuation, not one token repeated
    assert all(layer.self_attn.kv_cache is None for layer in net.model.layers)  # cleared afterwards


def test_tiny_batch_of_mixed_lengths_equals_each_prompt_alone(tiny):
    _, net, tok = tiny
    ids = chat_ids(tok, PROMPTS + ["x"])
    assert len({len(i) for i in ids}) == len(ids)  # every row padded differently
    batched, _ = G.generate_batch(net, tok, ids, max_new_tokens=20)
    assert batched == [G.generate_batch(net, tok, [i], max_new_tokens=20)[0][0] for i in ids]
    # and through the public function, whose length sort must restore the order
    texts = G.generate(net, tok, PROMPTS + ["x"], max_new_tokens=20, batch_size=3)
    assert texts == [tok.decode(o) for o in batched]


def test_default_greedy_with_cache_equals_greedy_without(default):
    net, tok = default
    ids = chat_ids(tok, PROMPTS)
    for i in ids:
        want = greedy_no_cache(net, i, 12, tok.stop_ids)
        assert G.generate_batch(net, tok, [i], max_new_tokens=12)[0][0] == want


def test_default_batch_equals_each_prompt_alone(default):
    net, tok = default
    ids = chat_ids(tok, PROMPTS)
    batched, _ = G.generate_batch(net, tok, ids, max_new_tokens=16)
    assert batched == [G.generate_batch(net, tok, [i], max_new_tokens=16)[0][0] for i in ids]


def test_default_greedy_equals_transformers(default):
    net, tok = default
    prompts = ["What is the capital of France?", "Write a haiku about rain.",
               "How many legs does a spider have?",
               "Give me a tip for sleeping well.", "Translate 'good morning' into Spanish."]
    ids = chat_ids(tok, prompts)
    ours, texts = G.generate_batch(net, tok, ids, max_new_tokens=24)
    hf = transformers.AutoModelForCausalLM.from_pretrained(builtin.default_base(), dtype=torch.float32).eval()
    for i, o in zip(ids, ours):
        with torch.no_grad():
            seq = hf.generate(torch.tensor([i]), do_sample=False, max_new_tokens=24,
                              eos_token_id=tok.stop_ids,
                              pad_token_id=tok.pad_id)[0, len(i):].tolist()
        assert o == [t for t in seq if t not in tok.stop_ids]
    assert "Paris" in texts[0]


DEMOS = ("Here are examples of good answers.\nQ: What colour is the sky?\nA: Blue.\n"
         "Q: How many legs has a cat?\nA: Four.\nQ: What is frozen water?\nA: Ice.\nNow answer:\n")


def fed_tokens(net):
    """Wrap net.forward to count the tokens it is given (positions computed), cache rows included."""
    count = [0]
    real = net.forward

    def forward(tokens, *a, **kw):
        count[0] += tokens.numel()
        return real(tokens, *a, **kw)
    net.forward = forward
    return count


def ending_tokenizer(tok, outs):
    """A copy of tok whose stop ids include a token the model writes often, so rows end at different steps."""
    from collections import Counter
    common = Counter(t for o in outs for t in set(o[2:])).most_common(1)[0][0]
    ending = copy.copy(tok)
    ending.stop_ids = tok.stop_ids + [common]
    return ending


def test_continuous_batching_equals_each_prompt_alone_and_refills_rows(tiny):
    """7 prompts through 3 cache rows: rows end at different steps and waiting prompts take their place;
    every answer equals that prompt decoded alone, and static batches give the same tokens."""
    _, net, tok = tiny
    prompts = PROMPTS + ["x", "Count to ten.", "Tell me about the sea, the wind and the rain.", "Why?"]
    ids = chat_ids(tok, prompts)
    tok2 = ending_tokenizer(tok, G.generate_batch(net, tok, ids, max_new_tokens=30)[0])
    alone = [G.generate_batch(net, tok2, [i], max_new_tokens=30)[0][0] for i in ids]
    # rows really end at different steps
    assert len({len(a) for a in alone}) >= 4 and min(map(len, alone)) < 30
    sizes = []
    real = net.forward
    net.forward = lambda tokens, *a, **kw: sizes.append(tokens.shape) or real(tokens, *a, **kw)
    try:
        cont, _ = G.generate_batch(net, tok2, ids, max_new_tokens=30, batch_size=3)
    finally:
        del net.forward
    assert cont == alone
    prefills = [s[0] for s in sizes if s[1] > 1]
    assert sum(prefills) == len(ids) and len(prefills) > 2  # prompts were admitted as rows freed up
    assert all(s[0] <= 3 for s in sizes)
    static, _ = G.generate_batch(net, tok2, ids, max_new_tokens=30, batch_size=3, continuous=False)
    assert static == alone


def test_shared_prefix_is_computed_once_and_changes_no_token(tiny):
    _, net, tok = tiny
    prompts = [DEMOS + q for q in ("Q: What is the capital of France?\nA:", "Q: Name a fruit.\nA:",
                                   "Q: Is fire hot?\nA:", "Q: 2+2?\nA:")]
    ids = chat_ids(tok, prompts)
    p = G.common_prefix(ids)
    assert p >= len(tok.encode(DEMOS))
    counts = {}
    for share in (False, True):
        count = fed_tokens(net)
        try:
            counts[share] = (G.generate(net, tok, prompts, max_new_tokens=12, batch_size=2,
                                        share_prefix=share), count[0])
        finally:
            del net.forward
    assert counts[True][0] == counts[False][0] == [G.generate(net, tok, [q], max_new_tokens=12)[0]
                                                   for q in prompts]
    assert counts[False][1] - counts[True][1] >= 3 * p - 3  # the prefix was fed once instead of 4 times
    assert G.common_prefix([[1, 2, 3], [1, 2, 3]]) == 2 and G.common_prefix([[5, 1], [4, 1]]) == 0
    assert G.common_prefix([[1, 2, 3]]) == 0  # a single prompt has nothing to share


def test_choice_logprobs_with_a_shared_prefix_equal_plain_forwards(tiny):
    _, net, tok = tiny
    prompts = [DEMOS + f"Which is better, A or B? {q}" for q in ("A: yes B: no", "A: 1 B: 22", "A B", "B A")]
    got = G.choice_logprobs(net, tok, prompts, ["A", "B"], batch_size=3)
    a, b = tok.encode("A")[0], tok.encode("B")[0]
    for ids, row in zip(chat_ids(tok, prompts), got):
        with torch.no_grad():
            ref = net(torch.tensor([ids]))[0, -1].log_softmax(-1)
        assert row == pytest.approx([ref[a].item(), ref[b].item()], abs=1e-4)


def test_prompts_longer_than_the_context_are_cut_from_the_left_and_new_tokens_capped(tiny):
    _, net, tok = tiny
    ctx = net.config.max_position_embeddings  # 256
    long = "x" * 300 + " What now?"
    ids = chat_ids(tok, [long])[0]
    with pytest.warns(UserWarning, match="1 prompt.*context of 256.*cut off"):
        out, _ = G.generate_batch(net, tok, [ids], max_new_tokens=10)
    # room for one token
    assert out[0] == G.generate_batch(net, tok, [ids[-(ctx - 1):]], max_new_tokens=1)[0][0]
    near = ids[-(ctx - 4):]
    out, _ = G.generate_batch(net, tok, [near], max_new_tokens=10)
    assert 0 < len(out[0]) <= 4 and out[0] == greedy_no_cache(net, near, 4, tok.stop_ids)


def test_default_shared_few_shot_prefix_and_continuous_batching_equal_each_prompt_alone(default):
    net, tok = default
    prompts = [DEMOS + q for q in ("Q: What is the capital of France?\nA:", "Q: Name a fruit.\nA:",
                                   "Q: What do bees make?\nA:", "Q: What is two plus two?\nA:", "Q: Hi!\nA:")]
    ids = chat_ids(tok, prompts)
    alone = [G.generate_batch(net, tok, [i], max_new_tokens=12, share_prefix=False)[0][0] for i in ids]
    shared, _ = G.generate_batch(net, tok, ids, max_new_tokens=12, batch_size=2)
    assert shared == alone and G.common_prefix(ids) > 40


# ----------------------------------------------------------------------------- sampling math by hand

PROBS = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])


def kept(logits):
    return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())


def test_top_p_keeps_tokens_whose_mass_above_is_below_p():
    logits = PROBS.log()
    # mass above each token: 0, 0.5, 0.5+0.2=0.7, 0.85, 0.95
    assert kept(sampling.top_p_filter(logits, 0.75)) == {0, 1, 2}  # 0.7 < 0.75 keeps the third
    assert kept(sampling.top_p_filter(logits, 0.6)) == {0, 1}      # 0.7 >= 0.6 drops it
    assert kept(sampling.top_p_filter(logits, 0.3)) == {0}         # 0.5 >= 0.3: the top token alone
    assert kept(sampling.top_p_filter(logits, 0.0)) == {0}         # never empty
    assert kept(sampling.top_p_filter(logits, 1.0)) == {0, 1, 2, 3, 4}
    perm = torch.tensor([3, 0, 4, 2, 1])                    # same distribution, shuffled vocabulary
    assert kept(sampling.top_p_filter(logits[:, perm], 0.75)) == {1, 4, 3}
    # survivors keep their logits: renormalised they are 0.5/0.85, 0.2/0.85, 0.15/0.85
    p = sampling.top_p_filter(logits, 0.75).softmax(-1)[0]
    assert torch.allclose(p[:3], torch.tensor([0.5, 0.2, 0.15]) / 0.85)


def test_top_p_among_candidates_equals_the_full_sort_and_falls_back_when_they_hold_too_little():
    torch.manual_seed(0)
    peaked = torch.randn(6, 5000) * 4           # the top 256 hold p: the fast path
    flat = torch.randn(6, 5000) * 0.1           # they do not: the whole vocabulary is sorted
    for logits in (peaked, flat, torch.cat([peaked[:3], flat[:3]])):  # and a batch of both kinds
        for p in (0.3, 0.9, 0.95):
            fast = sampling.top_p_filter(logits, p)
            full = sampling.top_p_filter(logits, p, candidates=logits.shape[-1])
            finite = torch.isfinite(fast)
            assert torch.equal(finite, torch.isfinite(full)) and torch.equal(fast[finite], logits[finite])
    # the fallback kept more than the candidates
    assert torch.isfinite(sampling.top_p_filter(flat, 0.95)).sum() > 6 * 256


def test_draw_follows_the_distribution_and_never_picks_a_zero():
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sampling.draw(probs, g), minlength=5) / 20000
    assert counts[1] == counts[4] == 0 and (counts - probs[0]).abs().max() < 0.015
    assert torch.equal(sampling.draw(probs[:50], torch.Generator().manual_seed(3)),
                       sampling.draw(probs[:50], torch.Generator().manual_seed(3)))


def test_top_k_and_temperature():
    logits = PROBS.log()
    assert kept(sampling.top_k_filter(logits, 2)) == {0, 1}
    assert kept(sampling.top_k_filter(logits, None)) == {0, 1, 2, 3, 4}


def test_sample_next_is_greedy_at_temperature_zero_and_respects_filters():
    logits = PROBS.log().repeat(200, 1)
    assert sampling.sample_next(logits, 0.0).eq(0).all()
    g = torch.Generator().manual_seed(0)
    draws = sampling.sample_next(logits, 1.0, top_p=0.6, generator=g)
    assert set(draws.tolist()) == {0, 1}  # only the nucleus is ever drawn, and both of it


# ----------------------------------------------------------------------------- scripted models

class Identity(torch.nn.Module):
    """The scripted model's head: its hidden states already are logits (generate reads the device from
    weight)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, h):
        return h


class Scripted(torch.nn.Module):
    """A stand-in decoder whose next-token logits are a function of the last token fed in."""

    def __init__(self, logits_after, vocab=259):
        super().__init__()
        self.lm_head = Identity()
        self.config = SimpleNamespace(vocab_size=vocab, max_position_embeddings=512)
        self.logits_after, self.batch_sizes, self.cache = logits_after, [], None

    def setup_cache(self, batch, max_len, dtype=None):
        self.cache = (batch, max_len)

    def clear_cache(self):
        self.cache = None

    def copy_cache_rows(self, src, dst, n):
        pass

    def keep_cache_rows(self, order, lens):
        pass

    def forward(self, tokens, start=None, rows=None, last_only=False, hidden=False):
        self.batch_sizes.append(tokens.shape[0])
        if last_only:
            tokens = tokens[:, -1:]
        return torch.stack([torch.stack([self.logits_after(t) for t in row]) for row in tokens.tolist()])


def one_hot(i, vocab=259):
    x = torch.zeros(vocab)
    x[i % vocab] = 10.0  # the scripted prefill computes every position, even those whose logits go unused
    return x


def test_stop_string_is_cut_and_never_streamed(tiny):
    _, _, tok = tiny
    nl, b = tok.encode("\n")[0], tok.encode("b")[0]
    net = Scripted(lambda t: one_hot(b if t == nl else t + 1))  # after the chat header: b, c, d, e, ...
    assert G.generate(net, tok, ["hi"], max_new_tokens=8) == ["bcdefghi"]
    pieces = []
    out = G.generate(net, tok, ["hi"], max_new_tokens=20, stop=["efg", "xyz"],
                     callback=lambda i, p: pieces.append((i, p)))
    assert out == ["bcd"]
    assert pieces == [(0, "b"), (0, "c"), (0, "d")]  # "e" and "ef" were held back: they might start "efg"
    assert net.cache is None


def test_stop_string_on_a_real_model(tiny):
    _, net, tok = tiny
    full = G.generate(net, tok, ["Name three colours."], max_new_tokens=24)[0]
    clean = [k for k in range(4, len(full) - 3) if "\ufffd" not in full[k:k + 3]]
    stop = full[clean[0]:clean[0] + 3]
    streamed = []
    out = G.generate(net, tok, ["Name three colours."], max_new_tokens=24, stop=stop,
                     callback=lambda i, p: streamed.append(p))[0]
    assert out == full[:full.find(stop)] and stop not in out
    assert "".join(streamed) == out


def test_finished_rows_leave_the_batch_and_each_row_stops_on_its_own(tiny):
    _, _, tok = tiny
    stop = tok.stop_ids[0]
    net = Scripted(lambda t: one_hot(stop if t == 50 else (t + 1) % 259))  # a row reaching token 50 ends
    out, _ = G.generate_batch(net, tok, [[48], [10], [47], [11]], max_new_tokens=8)
    assert out == [[49, 50], list(range(11, 19)), [48, 49, 50], list(range(12, 20))]
    # 8 tokens: prefill + 7 steps. Row 0 ends at the 3rd token, row 2 at the 4th: each leaves the batch at
    # once
    assert net.batch_sizes == [4, 4, 4, 3, 2, 2, 2, 2]


def test_seeded_sampling_repeats_and_seeds_differ(tiny):
    _, net, tok = tiny
    run = lambda seed: G.generate(net, tok, PROMPTS, max_new_tokens=16, temperature=1.0,
                                  top_k=50,  # noqa: E731
                                  top_p=0.95, seed=seed)
    assert run(0) == run(0)
    assert run(0) != run(1)


def test_an_answer_does_not_depend_on_the_other_prompts_of_its_call_or_batch(tiny):
    """Each prompt samples from its own seed (the call's seed and the prompt's index): the prompts answered in
    two shares, every other one, each with its prompts' seeds, and in other batch sizes, get the answers of
    one call; greedy too (fp32: no row's logits change with the rows beside it). This is what lets torchrun
    ranks split the prompts of a call."""
    _, net, tok = tiny
    prompts = PROMPTS + ["Tell me a joke.", "Count to five.", "Why is the sky blue?"]
    seeds = G.prompt_seeds(7, len(prompts))
    assert len(set(G.prompt_seeds(7, 1000))) == 1000 and G.prompt_seeds(8, 6) != seeds
    answers = {}
    for temperature in (1.0, 0.0):
        kw = dict(max_new_tokens=12, temperature=temperature, top_p=0.95 if temperature else None)
        whole = answers[temperature] = G.generate(net, tok, prompts, seed=7, batch_size=3, **kw)
        assert G.generate(net, tok, prompts, seed=seeds, batch_size=3, **kw) == whole
        for bs in (1, 2, 16):
            shares = [G.generate(net, tok, prompts[r::2], seed=seeds[r::2], batch_size=bs, **kw)
                      for r in (0, 1)]
            assert [shares[i % 2][i // 2] for i in range(len(prompts))] == whole, (temperature, bs)
    assert answers[1.0] != answers[0.0]   # the sampled answers are not all the greedy ones
    other_seed = G.generate(net, tok, prompts, seed=8, max_new_tokens=12, temperature=1.0, top_p=0.95)
    assert other_seed != answers[1.0]


def test_bf16_under_no_grad_and_training_works_afterwards(tiny):
    path, _, tok = tiny
    net, _ = M.load(path, dtype=torch.bfloat16)
    with torch.no_grad():
        out = G.generate(net, tok, PROMPTS, max_new_tokens=6)
    assert len(out) == 3 and all(isinstance(o, str) for o in out)
    net32, _ = M.load(path)
    G.generate(net32, tok, PROMPTS[:1], max_new_tokens=4)
    net32.train()
    x = torch.randint(0, 259, (2, 8))  # a training step after generation: no cache, no inference tensors
    net32(x).logsumexp(-1).mean().backward()
    assert net32.lm_head.weight.grad is not None


# ----------------------------------------------------------------------------- CLI


def test_cli_jsonl_round_trip_in_order(tiny, tmp_path):
    path, net, tok = tiny
    lines = [{"prompt": "Name three colours.", "id": 1}, {"messages": [{"role": "user", "content": "hi"}]},
             {"prompt": "What is the capital of France? Answer at length."}]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    G.main(["--model", str(path), "--input", str(tmp_path / "in.jsonl"), "--output",
            str(tmp_path / "out.jsonl"),
            "--max-new-tokens", "6", "--batch-size", "2", "--dtype", "fp32"])
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    want = G.generate(net, tok, [x.get("prompt") or x.get("messages") for x in lines], max_new_tokens=6)
    assert rows == [{**x, "response": r} for x, r in zip(lines, want)]


def test_cli_bad_line_names_file_and_line_and_generates_nothing(tiny, tmp_path):
    path, _, _ = tiny
    good = json.dumps({"prompt": "hi"})
    for bad, why in [("{not json", "Expecting"), (json.dumps({"text": "hi"}), "prompt"),
                     (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "robot")]:
        f = tmp_path / "in.jsonl"
        f.write_text(f"{good}\n{good}\n{bad}\n")
        with pytest.raises(SystemExit, match=rf"in.jsonl:3: .*{why}"):
            G.main(["--model", str(path), "--input", str(f), "--output", str(tmp_path / "out.jsonl")])
        assert not (tmp_path / "out.jsonl").exists()


def test_cli_stdin_stdout_prompt_and_chat(tiny, monkeypatch, capsys):
    path, net, tok = tiny
    monkeypatch.setattr(sys, "stdin",
                        io.TextIOWrapper(io.BytesIO(json.dumps({"prompt": "hi"}).encode() + b"\n")))
    G.main(["--model", str(path), "--input", "-", "--output", "-", "--max-new-tokens", "5", "--system",
            "Be brief.",
            "--dtype", "fp32"])
    want = G.generate(net, tok,
                      [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]],
                      max_new_tokens=5)[0]
    assert json.loads(capsys.readouterr().out) == {"prompt": "hi", "response": want}

    G.main(["--model", str(path), "--prompt", "hi", "--max-new-tokens", "5", "--system", "Be brief.",
            "--dtype", "fp32"])
    assert capsys.readouterr().out == want + "\n"

    seen = []
    real = G.generate
    monkeypatch.setattr(G, "generate", lambda m, t, p,
                        **kw: seen.append(json.loads(json.dumps(p))) or real(m, t, p, **kw))
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nmore\n"))  # EOF after two turns
    G.main(["--model", str(path), "--chat", "--max-new-tokens", "5", "--dtype", "fp32"])
    first = real(net, tok, ["hi"], max_new_tokens=5)[0]
    assert seen[1][0] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": first},
                          {"role": "user", "content": "more"}]  # history kept
    assert first in capsys.readouterr().out                    # streamed to the terminal


def test_compiled_blocks_give_the_same_greedy_tokens(tiny):
    path, _, tok = tiny
    net, _ = M.load(path)
    ids = chat_ids(tok, PROMPTS)
    eager, _ = G.generate_batch(net, tok, ids, max_new_tokens=10, batch_size=2)
    G.compile_blocks(net)
    assert G.generate_batch(net, tok, ids, max_new_tokens=10, batch_size=2)[0] == eager


def test_cli_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        G.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--prompt", "--input", "--output", "--chat", "--system", "--temperature",
                 "--top-k",
                 "--top-p", "--seed", "--stop", "--max-new-tokens", "--batch-size",
                 "--device", "--dtype", "--compile"):
        assert flag in text


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    (["--batch-size", "-1"], "--batch-size: must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
    (["--temperature", "-0.5"], "--temperature: must be >= 0"),
    (["--top-p", "0"], r"--top-p: must be in \(0, 1\]"),
    (["--top-p", "1.5"], r"--top-p: must be in \(0, 1\]"),
    (["--top-k", "0"], "--top-k: must be >= 1"),
    (["--batch-size", "two"], "--batch-size: 'two' is not an integer")])
def test_cli_refuses_bad_numbers_with_one_line_and_exit_2(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        G.main(["--model", "nowhere", "--prompt", "hi", *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.search(message, err[-1]) and err[-1].startswith("usage:") is False


def test_cli_refuses_cuda_without_cuda_and_output_equal_to_input(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        G.main(["--model", "nowhere", "--prompt", "hi", "--device", "cuda"])
    assert e.value.code == 2 and "CUDA is not available" in capsys.readouterr().err
    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(SystemExit) as e:
        G.main(["--model", "nowhere", "--input", str(f), "--output", str(tmp_path / "." / "in.jsonl")])
    assert e.value.code == 2 and "--output is the --input file" in capsys.readouterr().err
    assert f.read_text() == json.dumps({"prompt": "hi"}) + "\n"


def test_cli_output_is_replaced_whole_and_survives_a_crash(tiny, tmp_path, monkeypatch):
    path, _, _ = tiny
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("hi", "yo")))
    out = tmp_path / "out.jsonl"
    out.write_text("earlier results\n")
    argv = ["--model", str(path), "--input", str(tmp_path / "in.jsonl"), "--output", str(out),
            "--max-new-tokens", "3"]
    real = G.generate

    def crash(*a, **kw):
        assert out.read_text() == "earlier results\n"  # not emptied before generating
        raise KeyboardInterrupt
    monkeypatch.setattr(G, "generate", crash)
    with pytest.raises(KeyboardInterrupt):
        G.main(argv)
    assert out.read_text() == "earlier results\n"
    monkeypatch.setattr(G, "generate", real)

    def replace_fails(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(files.os, "replace", replace_fails)  # a crash after the answers are written out
    with pytest.raises(OSError, match="disk full"):
        G.main(argv)
    assert out.read_text() == "earlier results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # no temporary file left
    monkeypatch.undo()
    G.main(argv)
    assert [json.loads(x)["prompt"] for x in out.read_text().splitlines()] == ["hi", "yo"]
