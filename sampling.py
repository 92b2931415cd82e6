"""The sampling math: next-token logits (B, vocab) -> token ids (B,).

Temperature 0 is argmax; otherwise the logits are divided by the temperature, cut by top-k and top-p
(nucleus), and one token per row is drawn from the softmax with a seeded generator.
"""
import torch


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
    """logits with -inf outside the nucleus, from the leading tokens `top` (at `order`) and their
    probabilities."""
    before = probs.cumsum(-1) - probs  # mass strictly above each token
    keep = before < p
    keep[..., 0] = True                # the top token stays even when p <= 0
    return torch.full_like(logits, float("-inf")).scatter(-1, order, top.masked_fill(~keep, float("-inf")))


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """(B, vocab) logits -> (B,) token ids: argmax at temperature 0, else a draw from the filtered softmax."""
    if not temperature:
        return logits.float().argmax(-1)  # exact; argmax over bf16 measured 5x slower than convert + argmax
    logits = top_p_filter(top_k_filter(logits.float() / temperature, top_k), top_p)
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
