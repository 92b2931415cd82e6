"""Plain-text tools shared by the scorers and the data makers: words, sentences, ROUGE-L, and the
term/key matching of data/eval/SCHEMA.md (whole words, plurals, prefixes, negation by clause)."""
import re

QUOTES = "\"'\u201c\u201d "


def words(text):
    """Lowercase word tokens without punctuation (rouge_score's tokenizer, plus Unicode letters; "can't" ->
    cant)."""
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
NEGATORS = {"not", "no", "never", "cannot", "neither", "nor", "without", "none", "nothing", "nobody",
            "hardly",
            "isnt", "arent", "wasnt", "werent", "dont", "doesnt", "didnt", "wont", "cant", "couldnt",
            "shouldnt",
            "wouldnt", "hasnt", "havent", "hadnt", "aint", "mustnt", "neednt", "avoid", "avoiding", "myth",
            "misconception", "instead"}
# a candidate after one of these is compared or excluded, not claimed: "bigger than the Atlantic"
CONTRASTS = NEGATORS | {"than", "unlike", "rather", "except", "besides", "beside", "opposite"}
CLAUSE_WORDS = {"but", "however", "whereas", "although", "though", "while", "because", "since", "so", "which"}
# '3.5', '1,000', '9:30' stay whole
TOKEN_RE = re.compile(r"[^\W_]+|[.,:](?!\d)|(?<!\d)[.,:]|[;!?\n()\"\u2014]")


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
        return all(any(self.states(alt, by) for alt in part.split("|") if alt.strip())
                   for part in key.split("+"))

    def matching(self, keys, by=NEGATORS):
        return [k for k in keys if self.matches(k, by)]


# ---------------------------------------------------------------- content beyond the prompt

STOP = set("""a an the and or but if of to in on at by for with from as is are was were be been being am do
does did have has had it its this that these those there here i you he she we they me him her us them my
your his our their what which who whom whose when where why how not no yes so than then too very can could
will would shall should may might must just also about into over under up down out off again more most some
any each every all both few other such only own same one onto per via yet let lets im ive youre its theyre
dont""".split())
# words that carry no information about any topic: what a template puts around the prompt's own words
FILLER = set("""thing things something anything everything nothing stuff nice good bad great best better
cool interesting important amazing wonderful fascinating awesome beautiful lovely special fun fine okay ok
really quite true false fact facts sentence question answer example topic think know believe like love write
generate make tell sure definitely certainly actually basically simply here hello thanks thank please help
world life people person everyone everybody someone ask asked""".split())


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


# ----------------------------------------------------------------------------- contamination

# a prompt's labelled lines
FIELD_RE = re.compile(r"^(Question|Answer|Response|A|B|Feedback):\s*(.+)$", re.M)
ANSWER_KEYS = ("chosen", "rejected", "completion")


def _texts(row, user=True):
    """(text, from the user?) for every string of a training row: SFT messages, DPO prompt/chosen/rejected, or
    plain text (counted as the user's); assistant messages and chosen/rejected/completion are not the
    user's."""
    if isinstance(row, str):
        return [(row, user)]
    if isinstance(row, list):
        return [t for x in row for t in _texts(x, user)]
    if not isinstance(row, dict):
        return []
    user = user and row.get("role") != "assistant"
    return [t for k in ("messages", "prompt", "text", "content", *ANSWER_KEYS) if k in row
            for t in _texts(row[k], user and k not in ANSWER_KEYS)]


def _tokens(text):
    """words(), plus the arithmetic signs not attached to a letter: '7 + 5' and '7 - 5' differ, 'x-ray' is 'x
    ray'."""
    return re.findall(r"[^\W_]+|(?<![^\W\d_])[-+*/\u00d7\u00f7=](?![^\W\d_])",
                      text.lower().replace("'", "").replace("\u2019", ""))


def _content(tokens):
    return [w for w in tokens if w not in STOP and w[0].isalnum()]


class _Needles:
    """Token sequences to look for inside longer texts, indexed by their first token."""

    def __init__(self):
        self.table, self.starts = {}, {}

    def add(self, tokens, eval_id):
        key = " ".join(tokens)
        self.table.setdefault(key, eval_id)
        self.starts.setdefault(tokens[0], set()).add(len(tokens))

    def found(self, t):
        return [(" ".join(t[i:i + k]), self.table) for i, w in enumerate(t) for k in self.starts.get(w, ())]


def _eval_index(eval_items, n, template):
    """What contamination() looks for: (content n-grams, short prompts whole, questions a user may ask,
    answers an assistant may state), each naming its eval item."""
    toks = [_tokens(it["prompt"]) for it in eval_items]
    count = {}        # 4-grams shared by `template` or more eval prompts are the sets' frames
    for t in toks:
        for g in {" ".join(t[i:i + 4]) for i in range(len(t) - 3)}:
            count[g] = count.get(g, 0) + 1
    grams, equal, asked, stated = {}, {}, _Needles(), _Needles()
    for it, t in zip(eval_items, toks):
        if len(t) >= n:
            frame = [False] * len(t)
            for i in range(len(t) - 3):
                if count[" ".join(t[i:i + 4])] >= template:
                    frame[i:i + 4] = [True] * 4
            for i in range(len(t) - n + 1):
                own = [w for w, f in zip(t[i:i + n], frame[i:i + n]) if not f]
                if len(_content(own)) >= max(2, n // 4):
                    grams.setdefault(" ".join(t[i:i + n]), it["id"])
        elif len(t) >= 3:
            equal.setdefault(" ".join(t), it["id"])
            if sum(w.isalnum() and not w.isdigit() for w in t) >= 4:
                asked.add(t, it["id"])
        for label, seg in FIELD_RE.findall(it["prompt"]):
            s = _tokens(seg)
            if label == "Question" and len(s) >= 4 and len(_content(s)) >= 2:
                asked.add(s, it["id"])
            elif label in ("Answer", "Response", "A", "B") and len(s) >= 5 and len(_content(s)) >= 3:
                stated.add(s, it["id"])
    return grams, equal, asked, stated


def contamination(train_rows, eval_items, n=8, template=3):
    """Training rows that share an eval item's content: [{train_index, eval_id, ngram}], one hit per (row,
    item). Each field of a row is read alone, as _tokens(). Hits:
    - an n-gram of an eval prompt with at least n/4 (and 2) content words: not stop words, and not the sets'
      frames (words inside 4-grams that `template` or more eval prompts share, such as 'Is this answer
      correct? Question:'), so frame words alone never match;
    - a short prompt (3+ tokens) equal to a text, or held whole in a user turn when it has 4+ words
      (numbers and signs not counted: 'What is 6 + 7?' also opens 'What is 6 + 7 + 2?');
    - a question inside a longer eval prompt ('Question: What is the capital of Australia?') held in a
      user turn;
    - an answer the eval shows the judge ('Answer: The capital of Australia is Canberra.') stated in an
      assistant turn, which teaches the verdict.
    Training on a task's format is the point; training on an eval item's content is the leak."""
    grams, equal, asked, stated = _eval_index(eval_items, n, template)
    hits, seen = [], set()
    for idx, row in enumerate(train_rows):
        for text, user in _texts(row):             # each field alone: no n-gram across two messages
            t = _tokens(text)
            found = [(" ".join(t[i:i + n]), grams) for i in range(len(t) - n + 1)]
            found.append((" ".join(t), equal))
            found += asked.found(t) if user else stated.found(t)
            for g, table in found:
                if g in table and (idx, table[g]) not in seen:
                    seen.add((idx, table[g]))
                    hits.append({"train_index": idx, "eval_id": table[g], "ngram": g})
    return hits
