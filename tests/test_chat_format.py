"""The chat format against transformers' own rendering: the real chat templates of SmolLM2, Qwen2.5, Llama 3
and Qwen3 (tests/fixtures/chat_templates, each copied from the model's tokenizer_config.json) rendered by
transformers' apply_chat_template, and greedy answers through generate.py's CLI against transformers' generate
on the built-in model."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import builtin  # noqa: E402
import chat  # noqa: E402
import generate as G  # noqa: E402

transformers = pytest.importorskip("transformers")
FIXTURES = ROOT / "tests" / "fixtures" / "chat_templates"
SPECIALS = {"chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                       "<|eot_id|>"]}

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Is ice cold?"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  padded question \n"},
     {"role": "assistant", "content": "\nan answer after a newline "}, {"role": "user", "content": "ok"},
     {"role": "assistant", "content": "\n\ndone"}],
]


def fixture(name):
    return json.loads((FIXTURES / f"{name}.json").read_text())


def tokenizers_pair(fx):
    """Our Tokenizer and transformers' PreTrainedTokenizerFast over one byte-level vocabulary with the
    format's special tokens, both given the fixture's template and special-token settings."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    fmt = "llama3" if "<|start_header_id|>" in fx["chat_template"] else "chatml"
    tok = Tokenizer(models.BPE(vocab={c: i
                                      for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                               merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS[fmt]])
    config = {k: fx[k] for k in ("chat_template", "bos_token", "eos_token",
                                 "pad_token") if fx.get(k) is not None}
    ours = chat.Tokenizer(tok, config)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **{k: v for k, v in config.items()
                                                                          if k != "chat_template"})
    theirs.chat_template = fx["chat_template"]
    return ours, theirs


@pytest.mark.parametrize("name", ["smollm2", "qwen2.5", "llama3", "qwen3"])
def test_rendered_chat_equals_transformers_apply_chat_template(name):
    ours, theirs = tokenizers_pair(fixture(name))
    extra = {"enable_thinking": False} if name == "qwen3" else {}   # the project runs Qwen3 without thinking
    for conv in CHATS:
        for gen in (True, False):
            want = theirs.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen, **extra)
            assert ours.render_chat(conv, add_generation_prompt=gen) == want, (name, conv, gen)
            if conv[-1]["role"] == "assistant" and not gen:   # SFT: the targets are still the answers alone
                ids, mask = ours.encode_chat(conv)
                targets = ours.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
                assert targets == expected_targets(ours, conv), (name, conv)


def expected_targets(tok, conv):
    """The answers and their end-of-turn tokens as the template prints them (Llama 3 trims; Qwen3 drops the
    newlines that open a final answer); the system prompt and Qwen3's empty think block are never targets."""
    out = []
    for j, m in enumerate(conv):
        if m["role"] == "assistant":
            text = m["content"].strip() if tok.format == "llama3" else m["content"]
            final_qwen3 = getattr(tok, "no_think", "") and j == len(conv) - 1
            out.append((text.lstrip("\n") if final_qwen3 else text) + tok.end_of_turn)
    return "".join(out)


def test_default_system_prompt_is_found_whatever_the_escaping():
    smol = fixture("smollm2")["chat_template"]
    assert "system\nYou are" in smol   # the real template holds a real newline there
    escaped = smol.replace("system\nYou are", "system\\nYou are")   # the same template with the Jinja escape
    for template in (smol, escaped):
        ours, theirs = tokenizers_pair({**fixture("smollm2"), "chat_template": template})
        assert ours.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
        assert ours.render_chat(CHATS[0]) == theirs.apply_chat_template(CHATS[0], tokenize=False,
                                                                        add_generation_prompt=True)
    qwen, _ = tokenizers_pair(fixture("qwen2.5"))
    assert qwen.default_system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    for name in ("qwen3", "llama3"):   # no default system line: nothing is added
        assert tokenizers_pair(fixture(name))[0].default_system is None


PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "How many legs does a spider have?",
           "Give me a tip for sleeping well.", "Translate 'good morning' into Spanish.", "What is 7 times 8?",
           "Name a famous painting.", "Why is the sky blue?"]


def test_cli_greedy_answers_equal_transformers_generate_with_apply_chat_template(tmp_path):
    path = builtin.default_base()
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    G.main(["--model", str(path), "--input", str(tmp_path / "in.jsonl"), "--output",
            str(tmp_path / "out.jsonl"),
            "--max-new-tokens", "16", "--batch-size", "8", "--dtype", "fp32"])
    ours = [json.loads(line)["response"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    stops = [hf_tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    theirs = []
    for p in PROMPTS:
        text = hf_tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True)
        ids = hf_tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            seq = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                              eos_token_id=stops, pad_token_id=stops[0])[0, ids.shape[1]:].tolist()
        theirs.append(hf_tok.decode([t for t in seq if t not in stops], skip_special_tokens=True))
    assert ours == theirs
    assert "Paris" in ours[0]
