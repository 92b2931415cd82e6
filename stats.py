"""The statistics every reported figure carries: a 95% Wilson interval for a share, and paired tests
between two models scored on the same units (exact McNemar; a sign-flip test for weighted scores)."""
import math
import random

Z95 = 1.959964


def wilson(k, n, z=Z95):
    """95% Wilson score interval of k successes in n trials: sane at 0/n and n/n, unlike the normal one."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))


def mcnemar(a, b):
    """Exact two-sided McNemar test of paired 0/1 outcomes: under 'no difference' each discordant unit is
    a fair coin, so p = P(Binomial(n_discordant, 1/2) is at least as lopsided as observed)."""
    gained = sum(1 for x, y in zip(a, b) if y and not x)
    lost = sum(1 for x, y in zip(a, b) if x and not y)
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def sign_flip(diffs, weights, rounds=20000, seed=0):
    """Two-sided paired test of sum(w * d) = 0, for a score that weighs units unequally (the balanced safety
    score weighs a harmful and a benign item by their groups' sizes). Under 'no difference' each unit's
    difference is as likely to have the other sign; p is the share of sign flips at least as extreme."""
    obs = abs(sum(w * d for w, d in zip(weights, diffs)))
    live = [(w * d) for w, d in zip(weights, diffs) if d]
    if not live or obs == 0:
        return 1.0
    rng = random.Random(seed)
    hits = sum(abs(sum(x if rng.random() < 0.5 else -x for x in live)) >= obs - 1e-12 for _ in range(rounds))
    return (hits + 1) / (rounds + 1)
