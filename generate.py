"""Batched, KV-cached sampling, and a CLI for one prompt, a JSONL file of prompts, or a chat.

    python generate.py --model default --prompt "What is the capital of France?"
    python generate.py --model DIR --input prompts.jsonl --output answers.jsonl   (- is stdin/stdout)
    python generate.py --model DIR --chat --temperature 0.7 --seed 0

Prompts are rendered in the model's chat format with the assistant header and decoded by continuous
batching over `batch_size` rows of a preallocated KV cache. Each row holds one prompt from slot 0 (its
slots are its positions, so rows of any length need no padding); each step feeds every running row
its last token; a row that finishes is replaced at once by the next waiting prompt, prefilled into
that row, and when none waits the running rows close up, so no step computes a finished row. The
token prefix common to all prompts (system prompt, few-shot demonstrations) is prefilled once and
copied into each row. Prompts longer than the model's context are cut from the left, with a warning.
"""
import argparse
import hashlib
import json
import sys
import time
import warnings
from pathlib import Path

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


def top_p_filter(logits, p, candidates=256):
    """Nucleus: keep a token when the probability of the tokens ranked above it is < p.

    The top token has nothing above it, so at least one token always survives. A row whose `candidates`
    most likely tokens hold mass p has its nucleus among them, so only they are sorted; other rows sort
    the whole vocabulary (for 64 rows of 49,152 tokens on 2 cores: topk 4 ms, a full sort 94 ms).
    """
    if p is None or p >= 1.0:
        return logits
    top, order = logits.topk(min(candidates, logits.shape[-1]), dim=-1)   # sorted, descending
    probs = (top - logits.logsumexp(-1, keepdim=True)).exp()              # their share of the whole softmax
    out = _nucleus(logits, top, order, probs, p)
    short = probs.sum(-1) < p
    if top.shape[-1] < logits.shape[-1] and bool(short.any()):
        top, order = logits[short].sort(dim=-1, descending=True)
        out[short] = _nucleus(logits[short], top, order, top.softmax(-1), p)
    return out


def _nucleus(logits, top, order, probs, p):
    """logits with -inf outside the nucleus, from the leading tokens `top` (at `order`) and their probabilities."""
    before = probs.cumsum(-1) - probs  # mass strictly above each token
    keep = before < p
    keep[..., 0] = True                # the top token stays even when p <= 0
    return torch.full_like(logits, float("-inf")).scatter(-1, order, top.masked_fill(~keep, float("-inf")))


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
        return logits.float().argmax(-1)  # exact; argmax over bf16 measured 5x slower than convert + argmax
    logits = apply_temperature(logits.float(), temperature)
    logits = top_p_filter(top_k_filter(logits, top_k), top_p)
    return draw(logits.softmax(-1), generator)


def draw(probs, generator=None):
    """One token per row of probs (B, vocab) by inverse CDF: a uniform per row against the running sum, the
    first token whose sum exceeds it (a token of probability 0 never is). torch.multinomial took 46 ms for
    64 rows of 49,152 tokens on 2 cores, this 2 ms. generator: one for the whole batch, or a list with one
    (CPU) generator per row, so that a row's draws do not depend on which rows share its batch."""
    cdf = probs.cumsum(-1)
    if isinstance(generator, list):
        u = torch.cat([torch.rand(1, generator=g) for g in generator]).to(probs.device)[:, None]
    else:
        u = torch.rand(len(probs), 1, generator=generator, device=probs.device)
    u = u * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(-1)


# ----------------------------------------------------------------------------- the cache rows

def fit_context(ids, max_new_tokens, context):
    """Prompts cut from the left to leave room for one new token, and each row's new tokens (an int, or one
    per prompt) capped to what fits."""
    cut = [x[len(x) - context + 1:] if len(x) >= context else x for x in ids]
    if n := sum(len(a) != len(b) for a, b in zip(ids, cut)):
        warnings.warn(f"{n} prompt(s) longer than the model's context of {context} tokens: "
                      "their beginnings are cut off", stacklevel=3)
    want = max_new_tokens if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(ids)
    return cut, [max(1, min(m, context - len(x))) for m, x in zip(want, cut)]


def common_prefix(ids):
    """Length of the token prefix shared by all prompts (>1), leaving each prompt at least one token of its own."""
    if len(ids) < 2:
        return 0
    first, p = ids[0], min(len(x) for x in ids) - 1
    for x in ids[1:]:
        n = 0
        while n < p and x[n] == first[n]:
            n += 1
        p = n
    return p


def prefill(model, ids, p, rows):
    """Run prompts whose first p tokens are already in cache rows `rows` (a slice): (k, vocab) next-token logits.

    Rows are right-padded: a row's slots are its positions, its pads land after its end, where its real
    tokens never look and its own next tokens overwrite them.
    """
    dev = model.lm_head.weight.device
    k, T = len(ids), max(len(x) for x in ids) - p
    tokens = torch.zeros(k, T, dtype=torch.long, device=dev)
    for i, x in enumerate(ids):
        tokens[i, :len(x) - p] = torch.tensor(x[p:])
    h = model(tokens, start=torch.full((k,), p, device=dev), rows=rows, hidden=True)  # (k, T, dim)
    last = torch.tensor([len(x) - p - 1 for x in ids], device=dev)
    return model.lm_head(h[torch.arange(k, device=dev), last])                         # (k, vocab)


def _held_back(text, stops):
    """Length of the tail of `text` that could still grow into a stop string (not streamed yet)."""
    hold = len(text) - len(text.rstrip("\ufffd"))  # an incomplete UTF-8 character: wait for its other bytes
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return hold


class Rows:
    """What each prompt has written so far, and when it is done: the host side of decoding."""

    def __init__(self, tokenizer, limits, stops, callback):
        n = len(limits)
        self.tok, self.limits, self.stops, self.callback = tokenizer, limits, stops, callback
        self.stop_ids = set(tokenizer.stop_ids)
        self.out, self.texts, self.sent = [[] for _ in range(n)], [""] * n, [0] * n
        self.track_text = bool(stops) or callback is not None
        self.steps = [0] * n

    def add(self, i, tok):
        """Record prompt i's next token; True when prompt i is finished."""
        self.steps[i] += 1
        done = tok in self.stop_ids
        if not done:
            self.out[i].append(tok)
        done = done or self.steps[i] >= self.limits[i]
        if self.track_text:
            text = self.tok.decode(self.out[i])
            hit = [k for k in (text.find(s, max(0, len(self.texts[i]) - len(s))) for s in self.stops) if k >= 0]
            if hit:
                text, done = text[:min(hit)], True  # the stop string never reaches the output
            self.texts[i] = text
            if self.callback is not None:
                end = len(text) if done else len(text) - _held_back(text, self.stops)
                if end > self.sent[i]:
                    self.callback(i, text[self.sent[i]:end])
                    self.sent[i] = end
        return done

    def results(self):
        return self.out, (self.texts if self.track_text else [self.tok.decode(o) for o in self.out])


def admit(model, ids, new, first_row, p, spare, seen):
    """Prefill prompts `new` into the cache rows from first_row on, after copying in the shared p-token prefix
    from row `spare`; mark their tokens as seen (repetition penalty). Returns their next-token logits."""
    rows = slice(first_row, first_row + len(new))
    if p:
        model.copy_cache_rows(spare, rows, p)
    if seen is not None:
        seen[rows] = False
        for j, i in enumerate(new):
            seen[first_row + j, ids[i]] = True
    return prefill(model, [ids[i] for i in new], p, rows)


def retire(model, lens, done, seen):
    """Drop the finished rows: the last running rows move into their places (cache and seen tokens),
    so the running rows stay the first ones. Returns the order: new row -> old row."""
    n = len(lens) - len(done)
    holes = sorted(r for r in done if r < n)
    movers = [r for r in range(n, len(lens)) if r not in done]
    order = list(range(n))
    for src, dst in zip(movers, holes):
        order[dst] = src
        model.copy_cache_rows(src, slice(dst, dst + 1), lens[src])
        if seen is not None:
            seen[dst] = seen[src]
    return order


def compile_blocks(model):
    """torch.compile every block, shapes dynamic (rows and cache length change every step): fuses the small ops
    around the matmuls. On 2 CPU cores, bf16: decode steps 12% faster at batch 1, 11% at 16 and 5% at 64,
    after about 15 s of compiling. Tokens may differ from eager where two logits are within rounding."""
    # one graph per kind of call (batch or length 1 or more, mask or none): more than dynamo's default 8
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for layer in model.model.layers:
        layer.forward = torch.compile(layer.forward, dynamic=True)
    return model


@torch.inference_mode()
def generate_batch(model, tokenizer, prompt_ids, max_new_tokens=128, temperature=0.0, top_k=None, top_p=None,
                   repetition_penalty=None, stops=(), generator=None, callback=None, batch_size=None,
                   share_prefix=True, continuous=True, on_done=None):
    """Prompt token lists -> (generated ids, text) per prompt; ids leave out a stop token, text a stop string.

    batch_size cache rows (default: one per prompt) decode together; continuous: a finished row takes the
    next waiting prompt at once (else a new batch starts when all rows are done). share_prefix: the
    prompts' common prefix is prefilled once. on_done(i, n_tokens) is called as each prompt finishes.
    generator: one for all draws, or a list with one per prompt (see draw).
    """
    dev = model.lm_head.weight.device
    ids, limits = fit_context(prompt_ids, max_new_tokens, model.config.max_position_embeddings)
    B = min(batch_size or len(ids), len(ids))
    p = common_prefix(ids) if share_prefix else 0
    rows = Rows(tokenizer, limits, stops, callback)
    seen = None
    if repetition_penalty not in (None, 1.0):
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=dev)
    model.setup_cache(B + 1, max(len(x) + n for x, n in zip(ids, limits)))  # row B: the shared prefix
    try:
        if p:
            prefill(model, [ids[0][:p]], 0, slice(B, B + 1))
        queue = list(range(len(ids)))[::-1]  # popped from the end: prompts in order
        held, lens, logits = [], [], None    # per cache row: prompt index, filled slots; (rows, vocab)
        while queue or held:
            if queue and (continuous or not held) and len(held) < B:  # free rows take waiting prompts
                new = [queue.pop() for _ in range(min(B - len(held), len(queue)))]
                lg = admit(model, ids, new, len(held), p, B, seen)
                logits = lg if logits is None else torch.cat([logits, lg])
                held, lens = held + new, lens + [len(ids[i]) for i in new]
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen[:len(held)], repetition_penalty)
            gen = [generator[i] for i in held] if isinstance(generator, list) else generator
            nxt = sample_next(logits, temperature, top_k, top_p, gen)  # (rows,): the whole batch at once
            if seen is not None:
                seen[torch.arange(len(held), device=dev), nxt] = True
            done = [r for r, (i, t) in enumerate(zip(held, nxt.tolist())) if rows.add(i, t)]
            for r in done:
                if on_done is not None:
                    on_done(held[r], len(rows.out[held[r]]))
            order = retire(model, lens, done, seen)
            held, lens, logits = [held[r] for r in order], [lens[r] for r in order], None
            if held:  # one step for the running rows only: each writes its token at its own next slot
                start = torch.tensor(lens, device=dev)
                logits = model(nxt[order][:, None], start=start, rows=slice(0, len(held)), last_only=True)[:, 0]
                lens = [n + 1 for n in lens]
    finally:
        model.clear_cache()  # training code must never see a cache
    return rows.results()


# ----------------------------------------------------------------------------- the public function

def prompt_seeds(seed, n):
    """A sampling seed for each of n prompts from one call's seed: hashed, so that nearby seeds and indices
    give unrelated streams (and a negative seed is as good as any)."""
    return [int.from_bytes(hashlib.sha256(f"{seed}/{i}".encode()).digest()[:8], "little") for i in range(n)]


def generate(model, tokenizer, prompts, max_new_tokens=128, temperature=0.0, top_k=None, top_p=None,
             repetition_penalty=None, stop=None, seed=None, batch_size=16, callback=None, progress=False,
             share_prefix=True, continuous=True):
    """Answer each prompt (a text is one user turn; or a list of {"role", "content"} messages).

    Returns the responses in prompt order, special tokens skipped, any stop string cut off with
    everything after it. max_new_tokens: an int, or one per prompt. callback(i, piece) receives each prompt's text as it is produced.
    progress: True shows a tqdm bar; a tqdm bar is updated instead (the CLI shares one across calls).
    share_prefix, continuous: see generate_batch (off only to measure or test them).
    seed: repeatable sampling. Each prompt draws from its own generator, seeded from (seed, its index), so its
    answer does not depend on the other prompts of the call or on its place in the batches; a list gives each
    prompt's seed itself (torchrun ranks pass their share of prompt_seeds(seed, n)).
    """
    stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
    ids = [tokenizer.encode_chat(p, add_generation_prompt=True)[0] for p in prompts]
    if not ids:
        return []
    # longest first: rows admitted together have similar lengths (little padding) and a slow prompt starts early
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    generator = None
    if seed is not None and temperature:
        seeds = seed if isinstance(seed, (list, tuple)) else prompt_seeds(seed, len(ids))
        generator = [torch.Generator().manual_seed(seeds[i]) for i in order]
    bar = progress if hasattr(progress, "update") else tqdm(total=len(ids), unit="prompt", disable=not progress)

    def done(j, n):
        bar.update(1)
        if not bar.disable:
            bar.tokens = getattr(bar, "tokens", 0) + n
            bar.set_postfix(tok_s=f"{bar.tokens / max(time.time() - bar.start_t, 1e-9):.1f}")

    cb = None if callback is None else (lambda j, piece: callback(order[j], piece))
    if isinstance(max_new_tokens, (list, tuple)):
        max_new_tokens = [max_new_tokens[i] for i in order]
    _, texts = generate_batch(model, tokenizer, [ids[i] for i in order], max_new_tokens, temperature, top_k, top_p,
                              repetition_penalty, stops, generator, cb, batch_size, share_prefix, continuous, done)
    if bar is not progress:
        bar.close()
    results = [None] * len(ids)
    for i, text in zip(order, texts):
        results[i] = text
    return results


@torch.inference_mode()
def choice_logprobs(model, tokenizer, prompts, options, batch_size=16, share_prefix=True):
    """For each prompt, the log-probability of each option's first token as the first token of the answer:
    a judge's verdict read from one forward pass, with no sampling (used to score A/B in both orders).
    The prompts' common prefix (instructions, demonstrations) is computed once."""
    first = [tokenizer.encode(o)[0] for o in options]
    ids, _ = fit_context([tokenizer.encode_chat(p, add_generation_prompt=True)[0] for p in prompts], 1,
                         model.config.max_position_embeddings)
    if not ids:
        return []
    p = common_prefix(ids) if share_prefix else 0
    B = min(batch_size, len(ids))
    out = []
    model.setup_cache(B + 1, max(len(x) for x in ids))
    try:
        if p:
            prefill(model, [ids[0][:p]], 0, slice(B, B + 1))
        for b in range(0, len(ids), B):
            chunk = ids[b:b + B]
            rs = slice(0, len(chunk))
            if p:
                model.copy_cache_rows(B, rs, p)
            out += prefill(model, chunk, p, rs).float().log_softmax(-1)[:, first].tolist()
    finally:
        model.clear_cache()
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


def number(kind, ok, want):
    """An argparse type: `kind` of the text, refused with a one-line message unless ok(value)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return value
    return parse


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="Hugging Face model directory; 'default' is the built-in SmolLM2-135M-Instruct (default)")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="answer this one text (a user turn) and print the answer")
    mode.add_argument("--input", metavar="FILE", help='JSONL of {"prompt": text} or {"messages": [...]} lines; - is stdin')
    mode.add_argument("--chat", action="store_true", help="interactive chat with streamed answers; empty line or EOF quits")
    ap.add_argument("--output", metavar="FILE", default="-", help="JSONL out: each input object plus \"response\"; - is stdout "
                    "(default). A file is written whole through a temporary file once every answer is done, so an "
                    "earlier file survives a crash; it may not be the input")
    ap.add_argument("--system", help="system message put before every conversation that has none")
    ap.add_argument("--max-new-tokens", type=number(int, lambda v: v >= 1, ">= 1"), default=128,
                    help="most tokens generated per answer, capped to what fits in the model's context (default 128). "
                         "A prompt longer than the context is cut from the left, with a warning")
    ap.add_argument("--temperature", type=number(float, lambda v: v >= 0, ">= 0"), default=0.0, help="0 is greedy (default 0)")
    ap.add_argument("--top-k", type=number(int, lambda v: v >= 1, ">= 1"), default=None, help="sample only among the k most likely tokens (default off)")
    ap.add_argument("--top-p", type=number(float, lambda v: 0 < v <= 1, "in (0, 1]"), default=None,
                    help="nucleus: keep tokens while the mass above them is < p (default off)")
    ap.add_argument("--repetition-penalty", type=number(float, lambda v: v > 0, "> 0"), default=None,
                    help="CTRL-style penalty on tokens already present, e.g. 1.2 (default off)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the sampler, for repeatable output (default random)")
    ap.add_argument("--stop", action="append", default=None, help="stop string, cut from the answer; repeat for several")
    ap.add_argument("--batch-size", type=number(int, lambda v: v >= 1, ">= 1"), default=16,
                    help="cache rows decoded together; a finished row takes the next prompt at once (default 16)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the blocks: faster decoding after ~20 s "
                    "of compiling, worth it for many prompts (default off)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available (default auto)")
    ap.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                    help="weights and cache precision; auto: bf16 on a bf16 GPU or a CPU with native bf16 "
                         "(AVX-512 BF16 or AMX), else fp32 (default auto)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available on this machine")
    if args.input not in (None, "-") and args.output != "-" and Path(args.input).resolve() == Path(args.output).resolve():
        ap.error("--output is the --input file: write the answers somewhere else")
    return args


def main(argv=None):
    args = parse_args(argv)
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
    model, tok = M.load(path, device=device, dtype=dtype or M.fast_dtype(device))
    if args.compile:
        compile_blocks(model)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed, batch_size=args.batch_size)
    system = [{"role": "system", "content": args.system}] if args.system else []

    if args.chat:
        chat(model, tok, system=args.system, **kw)
    elif args.prompt is not None:
        print(generate(model, tok, [system + [{"role": "user", "content": args.prompt}]], **kw)[0])
    else:
        with tqdm(total=len(rows), unit="prompt", file=sys.stderr) as bar:
            answers = generate(model, tok, [m for _, m in rows], progress=bar, **kw)
        lines = [json.dumps({**obj, "response": a}, ensure_ascii=False) + "\n" for (obj, _), a in zip(rows, answers)]
        if args.output == "-":
            sys.stdout.writelines(lines)
        else:
            M._atomic_text(args.output, "".join(lines))  # a temporary file, then renamed: never half written


if __name__ == "__main__":
    main()
