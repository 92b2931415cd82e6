"""Batched, KV-cached generation: `generate` answers prompts, `choice_logprobs` reads a judge's verdict.
Its command line (generate_cli.py) answers one prompt, a JSONL file of prompts, or a chat:

    python generate.py --model default --prompt "What is the capital of France?"
    python generate.py --model DIR --input prompts.jsonl --output answers.jsonl   (- is stdin/stdout)
    python generate.py --model DIR --chat --temperature 0.7 --seed 0

Continuous batching over `batch_size` cache rows: each row holds one prompt from slot 0 (slots are positions,
so no padding); a finished row takes the next waiting prompt at once, or the running rows close up. The prefix
common to all prompts is prefilled once and copied into each row. Too long prompts are cut from the left.
"""
import hashlib
import time
import warnings
from contextlib import contextmanager

import torch
from tqdm import tqdm

from sampling import sample_next


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
    """Length of the token prefix shared by all prompts (>1), leaving each prompt at least one token of its
    own."""
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
    """Run prompts whose first p tokens are already in cache rows `rows` (a slice): (k, vocab) next-token
    logits.

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


class Outputs:
    """What each prompt has written so far, and when it is done: the host side of decoding."""

    def __init__(self, tokenizer, limits, stops, callback, on_done=None):
        n = len(limits)
        self.tok, self.limits, self.stops = tokenizer, limits, stops
        self.callback, self.on_done = callback, on_done
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
            hit = [k for k in (text.find(s,
                                         max(0, len(self.texts[i]) - len(s))) for s in self.stops) if k >= 0]
            if hit:
                text, done = text[:min(hit)], True  # the stop string never reaches the output
            self.texts[i] = text
            if self.callback is not None:
                end = len(text) if done else len(text) - _held_back(text, self.stops)
                if end > self.sent[i]:
                    self.callback(i, text[self.sent[i]:end])
                    self.sent[i] = end
        if done and self.on_done is not None:
            self.on_done(i, len(self.out[i]))
        return done

    def results(self):
        return self.out, (self.texts if self.track_text else [self.tok.decode(o) for o in self.out])


def admit(model, ids, new, first_row, p, spare):
    """Prefill prompts `new` into the cache rows from first_row on, after copying in the shared p-token prefix
    from row `spare`. Returns their next-token logits."""
    rows = slice(first_row, first_row + len(new))
    if p:
        model.copy_cache_rows(spare, rows, p)
    return prefill(model, [ids[i] for i in new], p, rows)


def retire(model, lens, done):
    """Drop the finished rows: the last running rows move into their places in the cache, so the running
    rows stay the first ones. Returns the order: new row -> old row."""
    n = len(lens) - len(done)
    order = list(range(n))
    movers = [r for r in range(n, len(lens)) if r not in done]
    for src, dst in zip(movers, sorted(r for r in done if r < n)):
        order[dst] = src
    model.keep_cache_rows(order, lens)
    return order


@torch.inference_mode()
def generate_batch(model, tokenizer, prompt_ids, max_new_tokens=128, temperature=0.0, top_k=None, top_p=None,
                   stops=(), generator=None, callback=None, batch_size=None,
                   share_prefix=True, continuous=True, on_done=None):
    """Prompt token lists -> (generated ids, text) per prompt; ids leave out a stop token, text a stop string.

    batch_size cache rows (default: one per prompt) decode together; continuous: a finished row takes the
    next waiting prompt at once (else a new batch starts when all rows are done). share_prefix: the
    prompts' common prefix is prefilled once. on_done(i, n_tokens) is called as each prompt finishes.
    generator: one for all draws, or a list with one per prompt (see sampling.draw).
    """
    ids, limits = fit_context(prompt_ids, max_new_tokens, model.config.max_position_embeddings)
    B = min(batch_size or len(ids), len(ids))
    outputs = Outputs(tokenizer, limits, stops, callback, on_done)

    def pick(logits, held):   # (rows,): the whole batch at once; a list of generators has one per prompt
        gen = [generator[i] for i in held] if isinstance(generator, list) else generator
        return sample_next(logits, temperature, top_k, top_p, gen)

    with prefix_cache(model, ids, B, max(len(x) + n for x, n in zip(ids, limits)), share_prefix) as p:
        decode(model, ids, outputs, B, p, pick, continuous)
    return outputs.results()


def decode(model, ids, outputs, B, p, pick, continuous):
    """The decoding loop over B cache rows: admit waiting prompts into free rows, sample every running row's
    next token, retire the finished rows, then one forward step for the rest."""
    dev = model.lm_head.weight.device
    queue = list(range(len(ids)))[::-1]  # popped from the end: prompts in order
    held, lens, logits = [], [], None    # per cache row: prompt index, filled slots; (rows, vocab)
    while queue or held:
        if queue and (continuous or not held) and len(held) < B:  # free rows take waiting prompts
            new = [queue.pop() for _ in range(min(B - len(held), len(queue)))]
            lg = admit(model, ids, new, len(held), p, B)
            logits = lg if logits is None else torch.cat([logits, lg])
            held, lens = held + new, lens + [len(ids[i]) for i in new]
        nxt = pick(logits, held)
        done = [r for r, (i, t) in enumerate(zip(held, nxt.tolist())) if outputs.add(i, t)]
        order = retire(model, lens, done)
        held, lens, logits = [held[r] for r in order], [lens[r] for r in order], None
        if held:  # one step for the running rows only: each writes its token at its own next slot
            start = torch.tensor(lens, device=dev)
            logits = model(nxt[order][:, None], start=start, rows=slice(0, len(held)), last_only=True)[:, 0]
            lens = [n + 1 for n in lens]


@contextmanager
def prefix_cache(model, ids, B, max_len, share_prefix):
    """A cache of B rows plus one (row B) holding the prompts' common prefix, prefilled once; yields the
    prefix length. The cache is dropped at the end: training code must never see one."""
    p = common_prefix(ids) if share_prefix else 0
    model.setup_cache(B + 1, max_len)
    try:
        if p:
            prefill(model, [ids[0][:p]], 0, slice(B, B + 1))
        yield p
    finally:
        model.clear_cache()


# ----------------------------------------------------------------------------- the public functions

def prompt_seeds(seed, n):
    """A sampling seed for each of n prompts from one call's seed: hashed, so that nearby seeds and indices
    give unrelated streams (and a negative seed is as good as any)."""
    return [int.from_bytes(hashlib.sha256(f"{seed}/{i}".encode()).digest()[:8], "little") for i in range(n)]


def generate(model, tokenizer, prompts, max_new_tokens=128, temperature=0.0, top_k=None, top_p=None,
             stop=None, seed=None, batch_size=16, callback=None, progress=False,
             share_prefix=True, continuous=True):
    """Answer each prompt (a text is one user turn; or a list of {"role", "content"} messages).

    Returns the responses in prompt order, special tokens skipped, any stop string cut off with everything
    after it. max_new_tokens: an int, or one per prompt. callback(i, piece) receives each prompt's text as it
    is produced. progress: True shows a tqdm bar; a tqdm bar is updated instead (one shared across calls).
    share_prefix, continuous: see generate_batch (off only to measure or test them).
    seed: repeatable sampling. Each prompt draws from its own generator, seeded from (seed, its index), so its
    answer does not depend on the other prompts of the call or on its place in the batches; a list gives each
    prompt's seed itself (torchrun ranks pass their share of prompt_seeds(seed, n)).
    """
    stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
    ids = [tokenizer.encode_chat(p, add_generation_prompt=True)[0] for p in prompts]
    if not ids:
        return []
    # longest first: rows admitted together have similar lengths (little padding), a slow prompt starts early
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    generator = None
    if seed is not None and temperature:
        seeds = seed if isinstance(seed, (list, tuple)) else prompt_seeds(seed, len(ids))
        generator = [torch.Generator().manual_seed(seeds[i]) for i in order]
    bar = progress
    if not hasattr(progress, "update"):
        bar = tqdm(total=len(ids), unit="prompt", disable=not progress)
    made, t0 = [0], time.time()

    def done(j, n):
        bar.update(1)
        made[0] += n
        if not bar.disable:
            bar.set_postfix(tok_s=f"{made[0] / max(time.time() - t0, 1e-9):.1f}")

    cb = None if callback is None else (lambda j, piece: callback(order[j], piece))
    if isinstance(max_new_tokens, (list, tuple)):
        max_new_tokens = [max_new_tokens[i] for i in order]
    _, texts = generate_batch(model, tokenizer, [ids[i] for i in order], max_new_tokens, temperature, top_k,
                              top_p, stops, generator, cb, batch_size, share_prefix, continuous, done)
    if bar is not progress:
        bar.close()
    return [text for _, text in sorted(zip(order, texts))]


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
    B, out = min(batch_size, len(ids)), []
    with prefix_cache(model, ids, B, max(len(x) for x in ids), share_prefix) as p:
        for b in range(0, len(ids), B):
            chunk = ids[b:b + B]
            rows = slice(0, len(chunk))
            if p:
                model.copy_cache_rows(B, rows, p)
            out += prefill(model, chunk, p, rows).float().log_softmax(-1)[:, first].tolist()
    return out





def compile_blocks(model):
    """torch.compile every block, shapes dynamic (rows and cache length change every step): fuses the small
    ops around the matmuls. On 2 CPU cores, bf16: decode steps 12% faster at batch 1, 11% at 16 and 5% at 64,
    after about 15 s of compiling. Tokens may differ from eager where two logits are within rounding."""
    # one graph per kind of call (batch or length 1 or more, mask or none): more than dynamo's default 8
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for layer in model.model.layers:
        layer.forward = torch.compile(layer.forward, dynamic=True)
    return model


def main(argv=None):
    """The command line: see generate_cli.py."""
    import generate_cli   # imported here: it imports this module
    generate_cli.main(argv)


if __name__ == "__main__":
    main()
