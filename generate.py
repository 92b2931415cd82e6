"""Batched, KV-cached sampling, and a CLI for one prompt, a JSONL file of prompts, or a chat.

    python generate.py --model default --prompt "What is the capital of France?"
    python generate.py --model DIR --input prompts.jsonl --output answers.jsonl   (- is stdin/stdout)
    python generate.py --model DIR --chat --temperature 0.7 --seed 0

Prompts are rendered in the model's chat format with the assistant header, left-padded into
batches (right padding would shift the positions of short rows), prefilled once, then decoded
one token per step into a preallocated KV cache. Each row stops on its own.
"""
import argparse
import json
import sys
import time

import torch
from tqdm import tqdm

import model as M


# ----------------------------------------------------------------------------- sampling math

def apply_temperature(logits, temperature):
    return logits / temperature


def top_k_filter(logits, k):
    """Keep the k largest logits of each row (ties with the k-th kept too), the rest -inf."""
    if k is None or k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p):
    """Nucleus: keep a token when the probability of the tokens ranked above it is < p.

    The top token has nothing above it, so at least one token always survives.
    """
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass strictly above each token
    drop = before >= p
    drop[..., 0] = False               # the top token stays even when p <= 0
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))  # back to vocabulary order


def apply_repetition_penalty(logits, seen, penalty):
    """CTRL / Hugging Face: over tokens already in the row, positive logits / penalty, negative * penalty.

    seen: (B, vocab) bool, True where the token occurs in the row (prompt included).
    """
    if penalty is None or penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """(B, vocab) logits -> (B,) token ids: argmax at temperature 0, else a draw from the filtered softmax."""
    if not temperature:
        return logits.argmax(-1)
    logits = apply_temperature(logits.float(), temperature)
    logits = top_p_filter(top_k_filter(logits, top_k), top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------- one batch

def _held_back(text, stops):
    """Length of the tail of `text` that could still grow into a stop string (not streamed yet)."""
    hold = len(text) - len(text.rstrip("\ufffd"))  # an incomplete UTF-8 character: wait for its other bytes
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return hold


def _shrink_cache(model, keep):
    """Drop finished rows from every layer's cache (rows are independent, so nothing else changes)."""
    for layer in model.model.layers:
        c = layer.self_attn.kv_cache
        c.k, c.v = c.k[keep], c.v[keep]


@torch.inference_mode()
def generate_batch(model, tokenizer, prompt_ids, max_new_tokens=128, temperature=0.0, top_k=None, top_p=None,
                   repetition_penalty=None, stops=(), generator=None, callback=None):
    """One batch of prompt token lists -> (generated ids, text) per row; ids leave out a stop token, text a stop string."""
    dev = model.lm_head.weight.device
    B, P = len(prompt_ids), max(len(x) for x in prompt_ids)
    L = P + max_new_tokens
    stop_ids = set(tokenizer.stop_ids)
    # the whole sequence and its mask are allocated once; each step fills one column
    tokens = torch.full((B, L), tokenizer.pad_id, dtype=torch.long, device=dev)
    mask = torch.zeros(B, L, dtype=torch.long, device=dev)
    for i, ids in enumerate(prompt_ids):
        tokens[i, P - len(ids):P] = torch.tensor(ids, device=dev)
        mask[i, P - len(ids):P] = 1
    seen = None
    if repetition_penalty not in (None, 1.0):
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=dev)
        for i, ids in enumerate(prompt_ids):
            seen[i, ids] = True
    slots = torch.arange(L, device=dev)

    rows = list(range(B))                     # batch position -> row of prompt_ids
    out = [[] for _ in range(B)]              # generated ids (stop token excluded)
    texts, sent = [""] * B, [0] * B           # decoded text so far, characters already streamed
    done = [False] * B
    track_text = bool(stops) or callback is not None
    model.setup_cache(B, L)
    try:
        logits = model(tokens[:, :P], attention_mask=mask, input_pos=slots[:P], last_only=True)[:, -1]
        for t in range(P, L):
            active = [j for j, r in enumerate(rows) if not done[r]]
            idx = torch.tensor(active, device=dev)
            lg = logits[idx]  # finished rows are never sampled
            if seen is not None:
                lg = apply_repetition_penalty(lg, seen[idx], repetition_penalty)
            nxt = sample_next(lg, temperature, top_k, top_p, generator)
            tokens[idx, t], mask[idx, t] = nxt, 1  # finished rows get a masked pad
            if seen is not None:
                seen[idx, nxt] = True
            for j, tok in zip(active, nxt.tolist()):
                r = rows[j]
                if tok in stop_ids:
                    done[r] = True
                else:
                    out[r].append(tok)
                if not track_text:
                    continue
                text = tokenizer.decode(out[r])
                hit = [k for k in (text.find(s, max(0, len(texts[r]) - len(s))) for s in stops) if k >= 0]
                if hit:
                    text, done[r] = text[:min(hit)], True  # the stop string never reaches the output
                texts[r] = text
                if callback is not None:
                    end = len(text) if done[r] or t == L - 1 else len(text) - _held_back(text, stops)
                    if end > sent[r]:
                        callback(r, text[sent[r]:end])
                        sent[r] = end
            running = [j for j, r in enumerate(rows) if not done[r]]
            if not running or t == L - 1:
                break
            if len(running) <= len(rows) // 2:  # half the batch or more has finished: stop computing it
                keep = torch.tensor(running, device=dev)
                _shrink_cache(model, keep)
                tokens, mask, rows = tokens[keep], mask[keep], [rows[j] for j in running]
                seen = seen[keep] if seen is not None else None
            logits = model(tokens[:, t:t + 1], attention_mask=mask, input_pos=slots[t:t + 1], last_only=True)[:, -1]
    finally:
        model.clear_cache()  # training code must never see a cache
    if not track_text:
        texts = [tokenizer.decode(ids) for ids in out]
    return out, texts


# ----------------------------------------------------------------------------- the public function

def generate(model, tokenizer, prompts, max_new_tokens=128, temperature=0.0, top_k=None, top_p=None,
             repetition_penalty=None, stop=None, seed=None, batch_size=16, callback=None, progress=False):
    """Answer each prompt (a text is one user turn; or a list of {"role", "content"} messages).

    Returns the responses in prompt order, special tokens skipped, any stop string cut off with
    everything after it. callback(i, piece) receives each prompt's text as it is produced.
    progress: True shows a tqdm bar; a tqdm bar is updated instead (the CLI shares one across calls).
    """
    stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
    ids = [tokenizer.encode_chat(p, add_generation_prompt=True)[0] for p in prompts]
    # similar lengths batched together waste less on padding; longest first shows a slow batch early
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    dev = model.lm_head.weight.device
    generator = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
    bar = progress if hasattr(progress, "update") else tqdm(total=len(ids), unit="prompt", disable=not progress)
    results = [None] * len(ids)
    for b in range(0, len(order), batch_size):
        chunk = order[b:b + batch_size]
        cb = None if callback is None else (lambda r, piece, chunk=chunk: callback(chunk[r], piece))
        out, texts = generate_batch(model, tokenizer, [ids[i] for i in chunk], max_new_tokens, temperature,
                                    top_k, top_p, repetition_penalty, stops, generator, cb)
        for i, text in zip(chunk, texts):
            results[i] = text
        bar.update(len(chunk))
        if not bar.disable:
            bar.tokens = getattr(bar, "tokens", 0) + sum(len(o) for o in out)
            bar.set_postfix(tok_s=f"{bar.tokens / max(time.time() - bar.start_t, 1e-9):.1f}")
    if bar is not progress:
        bar.close()
    return results


@torch.inference_mode()
def choice_logprobs(model, tokenizer, prompts, options, batch_size=16):
    """For each prompt, the log-probability of each option's first token as the first token of the answer:
    a judge's verdict read from one forward pass, with no sampling (used to score A/B in both orders)."""
    first = [tokenizer.encode(o)[0] for o in options]
    ids = [tokenizer.encode_chat(p, add_generation_prompt=True)[0] for p in prompts]
    dev = model.lm_head.weight.device
    out = []
    for b in range(0, len(ids), batch_size):
        chunk = ids[b:b + batch_size]
        P = max(len(x) for x in chunk)
        tokens = torch.full((len(chunk), P), tokenizer.pad_id, dtype=torch.long, device=dev)
        mask = torch.zeros_like(tokens)
        for i, x in enumerate(chunk):   # left padding, as in generation
            tokens[i, P - len(x):], mask[i, P - len(x):] = torch.tensor(x, device=dev), 1
        logp = model(tokens, attention_mask=mask, last_only=True)[:, -1].float().log_softmax(-1)
        out += logp[:, first].tolist()
    return out


# ----------------------------------------------------------------------------- CLI

def read_prompts(f, name, tokenizer, system=None):
    """Every JSONL line as (object, messages); a bad line stops everything before any generation."""
    rows = []
    for n, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict) or ("prompt" in obj) == ("messages" in obj):
                raise ValueError('a line is an object with "prompt" (text) or "messages" (a list of messages)')
            if "prompt" in obj and not isinstance(obj["prompt"], str):
                raise ValueError('"prompt" must be a string')
            msgs = [{"role": "user", "content": obj["prompt"]}] if "prompt" in obj else obj["messages"]
            if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
                raise ValueError('"messages" must be a non-empty list of {"role", "content"} objects')
            if system and msgs[0].get("role") != "system":
                msgs = [{"role": "system", "content": system}] + msgs
            tokenizer.render_chat(msgs)  # checks roles and contents
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            raise SystemExit(f"{name}:{n}: {e}")
        rows.append((obj, msgs))
    return rows


def chat(model, tokenizer, system=None, **kw):
    """Interactive chat with streamed answers; an empty line or end of input quits."""
    history = [{"role": "system", "content": system}] if system else []
    stream = lambda _, piece: print(piece, end="", flush=True)  # noqa: E731
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        answer = generate(model, tokenizer, [history], callback=stream, **kw)[0]
        print(flush=True)
        history.append({"role": "assistant", "content": answer})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="Hugging Face model directory; 'default' is the built-in SmolLM2-135M-Instruct (default)")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="answer this one text (a user turn) and print the answer")
    mode.add_argument("--input", metavar="FILE", help='JSONL of {"prompt": text} or {"messages": [...]} lines; - is stdin')
    mode.add_argument("--chat", action="store_true", help="interactive chat with streamed answers; empty line or EOF quits")
    ap.add_argument("--output", metavar="FILE", default="-", help="JSONL out: each input object plus \"response\", written per batch; - is stdout (default)")
    ap.add_argument("--system", help="system message put before every conversation that has none")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="most tokens generated per answer (default 128)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default 0)")
    ap.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens (default off)")
    ap.add_argument("--top-p", type=float, default=None, help="nucleus: keep tokens while the mass above them is < p (default off)")
    ap.add_argument("--repetition-penalty", type=float, default=None, help="CTRL-style penalty on tokens already present, e.g. 1.2 (default off)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the sampler, for repeatable output (default random)")
    ap.add_argument("--stop", action="append", default=None, help="stop string, cut from the answer; repeat for several")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts generated together (default 16)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available (default auto)")
    ap.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                    help="weights and cache precision; auto: bf16 on a bf16 GPU, fp32 on CPU (default auto)")
    args = ap.parse_args(argv)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    path = M.default_base() if args.model == "default" else args.model
    tok = M.load_tokenizer(path)
    if args.input is not None:  # every line checked before the weights are even loaded
        if args.input == "-":
            rows = read_prompts(sys.stdin, "<stdin>", tok, args.system)
        else:
            with open(args.input, encoding="utf-8") as f:
                rows = read_prompts(f, args.input, tok, args.system)
    model, tok = M.load(path, device=device, dtype=dtype)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed, batch_size=args.batch_size)
    system = [{"role": "system", "content": args.system}] if args.system else []

    if args.chat:
        chat(model, tok, system=args.system, **kw)
    elif args.prompt is not None:
        print(generate(model, tok, [system + [{"role": "user", "content": args.prompt}]], **kw)[0])
    else:
        out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
        try:
            bar = tqdm(total=len(rows), unit="prompt", file=sys.stderr)
            # in file order, one batch at a time, so every finished batch is on disk before the next starts
            for i in range(0, len(rows), args.batch_size):
                chunk = rows[i:i + args.batch_size]
                seed = None if args.seed is None else args.seed + i  # batches draw different streams
                answers = generate(model, tok, [m for _, m in chunk], progress=bar, **{**kw, "seed": seed})
                for (obj, _), answer in zip(chunk, answers):
                    out.write(json.dumps({**obj, "response": answer}, ensure_ascii=False) + "\n")
                out.flush()
            bar.close()
        finally:
            if out is not sys.stdout:
                out.close()


if __name__ == "__main__":
    main()
