"""Plain-text tools shared by the scorers and the data makers: words, sentences, ROUGE-L, and the
term/key matching of data/eval/SCHEMA.md (whole words, plurals, prefixes, negation by clause)."""
import re

QUOTES = "\"'\u201c\u201d "


def words(text):
    """Lowercase word tokens without punctuation (rouge_score's tokenizer, plus Unicode letters; "can't" -> cant)."""
    return re.findall(r"[^\W_]+", text.lower().replace("'", "").replace("\u2019", ""))


def lcs(x, y):
    """Length of the longest common subsequence of two token lists (one row of the table at a time)."""
    prev = [0] * (len(y) + 1)
    for xi in x:
        cur = [0]
        for j, yj in enumerate(y):
            cur.append(prev[j] + 1 if xi == yj else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(a, b):
    """ROUGE-L F1 of two texts: 2PR/(P+R) with P = lcs/|a|, R = lcs/|b|, over word tokens."""
    x, y = words(a), words(b)
    n = lcs(x, y)
    return 2 * n / (len(x) + len(y)) if n else 0.0


def sentences(text):
    return [s for s in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if words(s)]


def unwrap(text):
    """Drop a short lead-in ending in a colon ('Here is a question about dogs:') and outer quotes."""
    m = re.match(r"^([^:\n?]{0,60}):\s*(\S[\s\S]*)$", text.strip())
    return (m.group(2) if m and len(words(m.group(1))) <= 8 else text).strip().strip(QUOTES)


def strip_preamble(text):
    """Drop 'Sure, here is the revised text:' openings (small models add them; Hugging Face's CAI recipe)."""
    return re.sub(r"^(?:sure|okay|ok|certainly|of course|here)\b[^\n:]{0,80}:\s*", "", text.strip(),
                  flags=re.I).strip()


def mentions(text, terms):
    """Whole-word, case-insensitive match of any term (a plural -s/-es also counts); negation is not read."""
    low = " ".join(text.lower().replace("\u2019", "'").split())
    pats = [r"\s+".join(re.escape(w) for w in str(t).lower().split()) for t in terms]
    return any(p and re.search(r"(?<![^\W_])" + p + r"(?:s|es)?(?![^\W_])", low) for p in pats)


# ---------------------------------------------------------------- terms and keys (SCHEMA.md)

# a mention after one of these, in the same clause, is denied: "it is not the Pacific"
NEGATORS = {"not", "no", "never", "cannot", "neither", "nor", "without", "none", "nothing", "nobody", "hardly",
            "isnt", "arent", "wasnt", "werent", "dont", "doesnt", "didnt", "wont", "cant", "couldnt", "shouldnt",
            "wouldnt", "hasnt", "havent", "hadnt", "aint", "mustnt", "neednt", "avoid", "avoiding", "myth",
            "misconception", "instead"}
# a candidate after one of these is compared or excluded, not claimed: "bigger than the Atlantic"
CONTRASTS = NEGATORS | {"than", "unlike", "rather", "except", "besides", "beside", "opposite"}
CLAUSE_WORDS = {"but", "however", "whereas", "although", "though", "while", "because", "since", "so", "which"}
TOKEN_RE = re.compile(r"[^\W_]+|[.,:](?!\d)|(?<!\d)[.,:]|[;!?\n()\"\u2014]")   # '3.5', '1,000', '9:30' stay whole


class Text:
    """A response tokenized once for many term lookups: (word, clause number) pairs."""

    def __init__(self, text):
        self.toks, clause = [], 0
        for m in TOKEN_RE.finditer(text.lower().replace("\u2019", "").replace("'", "")):
            w = m.group()
            if not w[0].isalnum() or w in CLAUSE_WORDS:
                clause += 1           # a clause word opens the next clause and stays a word
            if w[0].isalnum():
                self.toks.append((w, clause))

    def find(self, term, exact=False):
        """Start indices where `term` occurs: whole words, plural -s/-es/-ies (unless exact), a trailing * for
        a prefix."""
        term = term.strip()
        prefix = term.endswith("*")
        tw = words(term.rstrip("*"))
        if not tw:
            return []
        n, hits = len(tw), []
        for i in range(len(self.toks) - n + 1):
            seq = self.toks[i:i + n]
            if seq[0][1] != seq[-1][1] or any(seq[j][0] != tw[j] for j in range(n - 1)):
                continue
            w, t = seq[-1][0], tw[-1]
            plural = not exact and (w in (t + "s", t + "es") or (t.endswith("y") and w == t[:-1] + "ies"))
            if w == t or (prefix and w.startswith(t)) or plural:
                hits.append(i)
        return hits

    def denied(self, i, window=4, by=NEGATORS):
        """True when a word of `by` comes up to `window` words before position i, in the same clause."""
        clause = self.toks[i][1]
        return any(w in by and c == clause for w, c in self.toks[max(0, i - window):i])

    def states(self, term, by=NEGATORS, exact=False):
        """The term occurs at least once outside a denial."""
        return any(not self.denied(i, by=by) for i in self.find(term, exact))

    def matches(self, key, by=NEGATORS):
        """A key 'a|b + c' holds when every +-part has one stated |-alternative."""
        return all(any(self.states(alt, by) for alt in part.split("|") if alt.strip()) for part in key.split("+"))

    def matching(self, keys, by=NEGATORS):
        return [k for k in keys if self.matches(k, by)]


# ---------------------------------------------------------------- content beyond the prompt

STOP = set("""a an the and or but if of to in on at by for with from as is are was were be been being am do does did
have has had it its this that these those there here i you he she we they me him her us them my your his our their
what which who whom whose when where why how not no yes so than then too very can could will would shall should may
might must just also about into over under up down out off again more most some any each every all both few other
such only own same one onto per via yet let lets im ive youre its theyre dont""".split())
# words that carry no information about any topic: what a template puts around the prompt's own words
FILLER = set("""thing things something anything everything nothing stuff nice good bad great best better cool
interesting important amazing wonderful fascinating awesome beautiful lovely special fun fine okay ok really quite
true false fact facts sentence question answer example topic think know believe like love write generate make
tell sure definitely certainly actually basically simply here hello thanks thank please help world life people
person everyone everybody someone ask asked""".split())


def stem(w):
    """A crude stem, the same on both sides of a comparison: cats/cat, flies/fly, boiled/boil."""
    for suffix, repl in (("ies", "y"), ("ing", ""), ("ed", ""), ("es", ""), ("s", "")):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            return w[:len(w) - len(suffix)] + repl
    return w


def new_content(text, prompt):
    """Distinct content words of `text` that the prompt does not hold: what a template filling in the prompt's
    words cannot supply. Numbers count; stop and filler words do not."""
    seen = {stem(w) for w in words(prompt)}
    return sorted({stem(w) for w in words(text)
                   if (len(w) >= 3 or w.isdigit()) and w not in STOP and w not in FILLER} - seen)


def word_salad(text, prompt):
    """Two content words of the prompt side by side in the text that are not side by side in the prompt
    ('help me with waiter bill' from 'ask a waiter for the bill'): a template stringing the prompt's words
    together, not a sentence about them."""
    p = words(prompt)
    content = {w for w in p if len(w) > 2 and w not in STOP and w not in FILLER}
    pairs = set(zip(p, p[1:]))
    t = words(text)
    return next((f"{a} {b}" for a, b in zip(t, t[1:]) if a in content and b in content and a != b
                 and (a, b) not in pairs), None)
