"""How each stage makes its training data with the models of the earlier stages.

Each `make_stageN(ctx)` returns (kept, rejected). Kept rows are SFT lines (stages 1-5) or DPO lines (stage 6)
whose `meta.written_by` names who wrote each field: human, constructed (code), parser, or stageK-model.
Rejected rows carry the filter's reason. `ctx.ask(k, prompts)` answers prompts with the stage-k model
(k = 0 is the base). Labels come from checkable truth (a human key, a parser, the fact that a reply refuses)
and never from a model's say-so; a model's verdict may only filter.
"""
import json
import math
import random
import re
from pathlib import Path

import scorers
from files import read_json, read_jsonl
from text import (FILLER, STOP, Text, contamination, mentions, new_content, rouge_l, sentences,
                  strip_preamble, unwrap, words)

DATA = Path(__file__).resolve().parent / "data"
TEMPLATES = json.loads((DATA / "templates.json").read_text())
LAYOUT = TEMPLATES["layouts"]


def read_data(name):
    """A JSON object or the rows of a JSONL file in data/ (or at an absolute path)."""
    path = DATA / name
    return read_json(path) if path.suffix == ".json" else read_jsonl(path)


# ---------------------------------------------------------------- the makers' interface

class Context:
    """What a stage's data maker sees (stages.py): the preset, a seeded rng, earlier models and data."""

    def __init__(self, run, k):
        self.run, self.preset, self.stage = run, run.preset, k
        self.seed = run.seed * 100 + k
        self.rng = random.Random(self.seed)
        self.calls = 0
        self.topics_file = read_data("topics.json")
        self.eval_items = run.eval_items
        self.seed_rows = read_data(run.preset.seed_data)   # a name in data/, or an absolute path
        self._topics = []

    def ask(self, k, prompts, temperature=0.0, max_new_tokens=None):
        self.calls += 1  # a different, repeatable sampling seed for every call
        return self.run.ask(k, prompts, temperature, max_new_tokens, seed=self.seed * 1000 + self.calls)

    def choose(self, k, prompts, options):
        """Log-probabilities of each option as the stage-k model's first answer token, per prompt."""
        return self.run.choose(k, prompts, options)

    def prefer(self, k, q_and_pairs, principles=None):
        """The stage-k judge's preference for the first text of each (question, text, other) over the other,
        asked "Which response better follows the principle ..., A or B?" (or plainly "better") in both orders;
        averaging the two log-odds cancels position bias. > 0: prefers it."""
        def ask(q, a, b, p):
            return layout("pairwise_principle", principle=p, question=q, a=a, b=b) if p else \
                layout("pairwise", question=q, a=a, b=b)
        ps = principles or [None] * len(q_and_pairs)
        asks = [ask(q, a, b, p) for (q, a, b), p in zip(q_and_pairs, ps)]
        asks += [ask(q, b, a, p) for (q, a, b), p in zip(q_and_pairs, ps)]
        lp = self.run.choose(k, asks, ["A", "B"])
        n = len(q_and_pairs)
        return [((lp[i][0] - lp[i][1]) + (lp[n + i][1] - lp[n + i][0])) / 2 for i in range(n)]

    def topics(self, n):
        """n topics, cycling through a shuffled list so each is used about equally."""
        out = []
        while len(out) < n:
            if not self._topics:
                self._topics = self.rng.sample(self.topics_file["topics"], len(self.topics_file["topics"]))
            out.append(self._topics.pop())
        return out

    def stage_rows(self, k):
        return self.run.rows(k) or (self.seed_rows if k == 1 else [])


# ---------------------------------------------------------------- rows and filters

def sft_row(prompt, answer, stage, kind, prompt_by, answer_by, by=None, **meta):
    """One SFT line. `prompt_by` / `answer_by` (and `by` for critiques, judges, problems) say who wrote
    each field: human, constructed (code), parser, or stageK-model; `source` is who wrote the answer text."""
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            "meta": {"stage": stage, "kind": kind, "source": answer_by,
                     "written_by": {"prompt": prompt_by, "response": answer_by, **(by or {})}, **meta}}


LIST_MARK = re.compile(r"^\s*(?:\d{1,2}[.)]|[-*\u2022])\s+")


def first_line(text):
    """The first non-empty line, without a list mark ('3.', '-'), a 'Question:'-style label and outer quotes.
    (Shown a numbered list of demonstrations, a small model answers with the next number.)"""
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    return unwrap(LIST_MARK.sub("", line)).strip()


def first_sentence(text):
    s = sentences(first_line(text))
    return s[0].strip() if s else ""


def topic_words(topic):
    """Words that show a text is about the topic: its content words, singular and plural."""
    stop = {"the", "a", "an", "and", "of", "for", "to", "in", "on", "with", "how", "your", "my"}
    ws = [w for w in words(topic) if w not in stop and len(w) > 2]
    return sorted({w for x in ws for w in (x, x.rstrip("s"))} or {topic.lower()})


def passes(check, prompt, text):
    return scorers.score({"id": "gen", "check": check, "prompt": prompt}, text)


class Keeper:
    """Collects one stage's rows: drops exact duplicates (same prompt and answer) and rows too close to a kept
    one (Self-Instruct novelty, ROUGE-L >= 0.7 within a kind), and records every drop with its reason.
    A second round's revision of the same prompt is a new answer, so it is kept."""

    def __init__(self):
        self.kept, self.rejected, self.seen, self.texts = [], [], set(), {}

    def reject(self, row, reason):
        self.rejected.append({**row, "reason": reason})

    def add(self, row, novel_text=None):
        msgs = row.get("messages") or row["prompt"] + row["chosen"]
        key = tuple(" ".join(words(m["content"])) for m in msgs)
        if key in self.seen:
            return self.reject(row, "duplicate")
        if novel_text is not None:
            kind = row["meta"]["kind"]
            for t in self.texts.get(kind, []):
                if (r := rouge_l(novel_text, t)) >= scorers.NOVELTY:
                    return self.reject(row, f"not novel: ROUGE-L {r:.2f} against a kept {kind}")
            self.texts.setdefault(kind, []).append(novel_text)
        self.seen.add(key)
        self.kept.append(row)

    def decontaminate(self, eval_items):
        """Move generated rows that share text with any eval prompt to rejected (the driver re-checks all)."""
        hits = {h["train_index"]: h["eval_id"] for h in contamination(self.kept, eval_items)}
        for i in sorted(hits, reverse=True):
            self.reject(self.kept.pop(i), f"overlaps eval item {hits[i]}")
        return self.kept, self.rejected


def layout(name, **fields):
    return LAYOUT[name].format(**fields)


def decline_prompt(request, rng):
    """An explicit instruction to decline (the skill stage 1 learns from the seed) around a request."""
    return rng.choice(TEMPLATES["decline"]).format(request=request)


def is_good_refusal(text):
    """A short refusal that offers something instead: what the seed teaches a declining answer to be."""
    return scorers.is_refusal(text) and 4 <= len(words(text)) <= 70 and not scorers.PIVOT_RE.search(text)


def few_shot(name, prompt):
    """The prompt after human-written worked examples (data/templates.json): without them small models copy
    the text they are asked to revise, or open with 'Sure, here is...' (Hugging Face's CAI recipe)."""
    demos = [{"role": role, "content": text} for user, answer in TEMPLATES[name]
             for role, text in (("user", user), ("assistant", answer))]
    return demos + [{"role": "user", "content": prompt}]


# ---------------------------------------------------------------- known answers

OPS = {"+": ("+", "plus", lambda a, b: a + b), "-": ("-", "minus", lambda a, b: a - b),
       "*": ("\u00d7", "times", lambda a, b: a * b), "/": ("\u00f7", "divided by", lambda a, b: a // b)}
ARITH_RE = re.compile(r"(\d{1,4})\s*"
                      r"(\+|-|\u2212|\*|x|\u00d7|/|\u00f7|plus|minus|times|multiplied by|divided by)"
                      r"\s*(\d{1,4})", re.I)


def parse_arithmetic(text):
    """(a, op, b, result) of the first 'a op b' in the text, or None; division only when it is exact.
    Model text is parsed, never run."""
    m = ARITH_RE.search(text)
    if not m:
        return None
    a, word, b = int(m.group(1)), m.group(2).lower(), int(m.group(3))
    op = {"\u2212": "-", "x": "*", "\u00d7": "*", "\u00f7": "/", "plus": "+", "minus": "-", "times": "*",
          "multiplied by": "*", "divided by": "/"}.get(word, word)
    if op == "/" and (b == 0 or a % b):
        return None
    return a, op, b, OPS[op][2](a, b)


def arithmetic_prompt(a, op, b, rng):
    sym, word, _ = OPS[op]
    return rng.choice(TEMPLATES["arithmetic_forms"]).format(a=a, b=b, sym=sym, word=word)


def seed_questions(ctx):
    """(question, gold answer, key words) from the human seed's question-answering rows: the key is what the
    gold answer's first clause says that the question does not ('Paris' for the capital of France)."""
    out = []
    for r in ctx.seed_rows:
        if r["meta"].get("kind") not in ("answer_question", "define_word", "translate_word", "give_example"):
            continue
        prompt, gold = r["messages"][0]["content"], r["messages"][1]["content"]
        q = next((s for s in re.split(r"(?<=[.!?:])\s+", prompt) if s.endswith("?")), None)
        clause = re.split(r"[,;:]|\.\s", gold)[0]
        key = sorted({w for w in words(clause) if w not in words(prompt) and w not in STOP and len(w) > 2})
        if q and key and len(key) <= 4:
            out.append((q, gold, key))
    return out


def agrees(answer, key):
    """The answer states at least half of the gold answer's key words (not denied): 'Van Gogh' for 'Vincent
    van Gogh painted it in 1889', but not 'Monet, in 1889'."""
    t = Text(answer)
    return 2 * sum(t.states(k) for k in key) >= len(key)


# ---------------------------------------------------------------- stage 1: the human seed

def make_stage1(ctx):
    """Stage 1 trains on the human seed as it is (the driver may sample `seed_examples` of it)."""
    return list(ctx.seed_rows), []


# ---------------------------------------------------------------- stage 2: implicit prompts (stage-1 model)

def stage2_questions(ctx, keep, n_open, n_keyed, n_yes_no):
    """The stage-1 model writes questions, then answers each through an explicit wrapper; questions with a
    human key (the seed's) keep only answers that agree with it."""
    rng, W, T = ctx.rng, "stage1-model", TEMPLATES["stage2"]
    ts = ctx.topics(n_open + n_yes_no)
    qs = [first_line(q) for q in ctx.ask(1, [rng.choice(T["write_question"]).format(topic=t)
                                             for t in ts[:n_open]], temperature=0.8)]
    yn = [first_line(q) for q in ctx.ask(1, [rng.choice(T["write_yes_no"]).format(topic=t)
                                             for t in ts[n_open:]], temperature=0.8)]
    keyed = rng.sample(seed_questions(ctx), min(n_keyed, len(seed_questions(ctx))))
    asked = qs + yn + [q for q, _, _ in keyed]
    wrap = [rng.choice(TEMPLATES["answer"]).format(question=q) for q in qs] + \
        [f"Answer yes or no: {q}" for q in yn] + \
        [rng.choice(TEMPLATES["answer"]).format(question=q) for q, _, _ in keyed]
    answers = ctx.ask(1, wrap)
    kinds = ["question"] * len(qs) + ["yes_no"] * len(yn) + ["keyed_question"] * len(keyed)
    for i, (q, a) in enumerate(zip(asked, answers)):
        a = a.strip()
        kind = kinds[i]
        row = sft_row(q, a, 2, kind, "human" if kind == "keyed_question" else W, W, via=wrap[i].split(":")[0])
        if not q.endswith("?") or len(words(q)) < 3:
            keep.reject(row, "prompt is not a question")
        elif kind == "yes_no" and scorers.yes_or_no(a) not in ("yes", "no"):
            keep.reject(row, "answer is not a clear yes or no")
        elif kind == "keyed_question" and not agrees(a, keyed[i - len(qs) - len(yn)][2]):
            keep.reject(row, f"disagrees with the seed's answer ({keyed[i - len(qs) - len(yn)][1]})")
        elif not words(a) or scorers.is_echo(q, a) or scorers.is_refusal(a):
            keep.reject(row, "answer empty, echoed or refused")
        elif len(words(a)) > 60:
            keep.reject(row, "answer longer than 60 words")
        else:
            keep.add(row, novel_text=q)


def stage2_completions(ctx, keep, n):
    """The model's own one-sentence fact, cut in half: the second half is known by construction."""
    rng, W = ctx.rng, "stage1-model"
    ts = ctx.topics(n)
    facts = ctx.ask(1, [rng.choice(TEMPLATES["stage2"]["write_fact"]).format(topic=t) for t in ts],
                    temperature=0.7)
    for t, f in zip(ts, facts):
        s = first_sentence(f)
        w = s.split()
        row = sft_row(" ".join(w[:max(2, len(w) // 2)]) + "...", s, 2, "completion", "constructed", W,
                      via="its own fact, halved")
        if len(w) < 6 or not s.endswith(".") or not mentions(s, topic_words(t)):
            keep.reject(row, "fact is not one on-topic sentence of 6+ words")
        else:
            keep.add(row, novel_text=s)


def stage2_greetings(ctx, keep, n):
    """Greetings (half from the human list, half written by the model), answered via an explicit wrapper."""
    rng, W = ctx.rng, "stage1-model"
    human = rng.sample(ctx.topics_file["greetings"], min(n // 2, len(ctx.topics_file["greetings"])))
    made = [first_line(g) for g in ctx.ask(1, [rng.choice(TEMPLATES["stage2"]["write_greeting"])
                                               for _ in range(n - len(human))], temperature=1.0)]
    gs = human + made
    replies = ctx.ask(1, [f"Respond to this greeting: {g}" for g in gs])
    for i, (g, a) in enumerate(zip(gs, replies)):
        row = sft_row(g, a.strip(), 2, "greeting", "human" if i < len(human) else W, W,
                      via="Respond to this greeting")
        if not g or len(words(g)) > 14:
            keep.reject(row, "greeting empty or longer than 14 words")
        elif not (ok := passes({"type": "greeting"}, g, a))[0]:
            keep.reject(row, f"reply: {ok[1]}")
        else:
            keep.add(row, novel_text=g)


def stage2_arithmetic(ctx, keep, n):
    """The model writes a problem; a parser (never eval) reads its numbers and computes the answer; the prompt
    is put in one of several implicit forms by code."""
    rng = ctx.rng
    probs = ctx.ask(1, [rng.choice(TEMPLATES["stage2"]["write_arithmetic"]) for _ in range(n)],
                    temperature=1.0)
    for p in probs:
        parsed = parse_arithmetic(p)
        if parsed is None:
            keep.reject(sft_row(p.strip(), "", 2, "arithmetic", "stage1-model", "parser"),
                        "no exact 'a op b' problem found")
            continue
        a, op, b, r = parsed
        keep.add(sft_row(arithmetic_prompt(a, op, b, rng), f"{a} {OPS[op][0]} {b} = {r}.", 2, "arithmetic",
                         "constructed", "parser", by={"problem": "stage1-model"},
                         problem_text=p.strip()[:200]))


def make_stage2(ctx):
    """The stage-1 model, told explicitly, writes implicit prompts and answers them through explicit
    wrappers."""
    m = round(ctx.preset.n_make * ctx.preset.oversample)
    share = lambda x: max(2, round(x * m))                       # noqa: E731
    keep = Keeper()
    stage2_questions(ctx, keep, share(0.2), share(0.15), share(0.15))
    stage2_completions(ctx, keep, share(0.15))
    stage2_greetings(ctx, keep, share(0.15))
    stage2_arithmetic(ctx, keep, share(0.2))
    return keep.decontaminate(ctx.eval_items)


# ---------------------------------------------------------------- stage 3: generation tasks (stage-2 model)

def written_problem(check_type, instruction, text):
    """Why a generated text fails its kind (None when it passes): the eval's scorer for the eval's kinds, and
    for the wider kinds a text that is on topic, adds content and is not a refusal or a lecture."""
    if check_type in scorers.SCORERS:
        ok, why = passes({"type": check_type}, instruction, text)
        return None if ok else why
    if scorers.is_refusal(text) or not 3 <= len(words(text)) <= 60:
        return "refuses, or not 3-60 words"
    return None if new_content(text, instruction) else "adds nothing to the instruction"


def make_stage3(ctx):
    """The stage-2 model writes generation instructions of many kinds (shown two human examples of the kind,
    as Self-Instruct prompts with a mix of seed tasks), kept when they are instructions on topic and novel
    (ROUGE-L < 0.7 against every kept instruction); then it fulfils them, and a sample is kept when it is of
    the asked kind, on topic and novel."""
    rng, keep, W = ctx.rng, Keeper(), "stage2-model"
    kinds = ctx.topics_file["generation_kinds"]
    m = round(ctx.preset.n_make * ctx.preset.oversample * 2)   # measured: about 1 in 4 instructions is novel
    tasks = [(kinds[i % len(kinds)], t) for i, t in enumerate(ctx.topics(m))]
    asks = []
    for k, t in tasks:
        other = rng.sample(ctx.topics_file["topics"], 2)
        demos = [f.format(topic=o) for f, o in zip(rng.sample(k["instruction_forms"], 2), other)]
        asks.append(f"Here are two instructions:\n1. {demos[0]}\n2. {demos[1]}\n"
                    "Write one more instruction of the "
                    f"same kind, about {t}. Reply with the instruction only.")
    made = [first_line(x) for x in ctx.ask(2, asks, temperature=0.8)]
    instr, kept_instr = [], []
    form_words = {w for k in kinds for f in k["instruction_forms"] for w in words(f.replace("{topic}", ""))}
    for (k, t), ins in zip(tasks, made):
        # A 135M writer often ignores the asked topic and varies a demonstration's instead. That is still a
        # usable instruction (Self-Instruct asks for no topic at all) unless it is a near-copy of a
        # kept one; its subject is then its own content words, beyond the forms' wording.
        on_topic = mentions(ins, topic_words(t))
        subject = topic_words(t) if on_topic else sorted(set(words(ins)) - form_words - STOP - FILLER)
        row = sft_row(ins, "", 3, k["kind"], W, W, topic=t if on_topic else None)
        if not 3 <= len(words(ins)) <= 30 or not subject:
            keep.reject(row, "instruction not 3-30 words, or with no subject of its own")
        elif not (scorers.is_instruction(ins) or ins.rstrip().endswith("?")):
            keep.reject(row, "not an instruction")
        elif any(rouge_l(ins, x) >= scorers.NOVELTY for x in kept_instr):
            keep.reject(row, "instruction not novel (ROUGE-L >= 0.7 against a kept one)")
        else:
            kept_instr.append(ins)
            instr.append((k, t if on_topic else None, subject, ins))
    # rejection sampling: `candidates` samples per task, the first that passes its kind's check is kept
    samples = [ctx.ask(2, [ins for *_, ins in instr], temperature=0.8) for _ in range(ctx.preset.candidates)]
    for i, (k, t, subject, ins) in enumerate(instr):
        for j, out in enumerate(s[i] for s in samples):
            text = first_line(out) if k["check"] != "help_request" else unwrap(out.strip())
            row = sft_row(ins, text, 3, k["kind"], W, W, topic=t, candidate=j + 1)
            why = written_problem(k["check"], ins, text) or \
                (None if mentions(text, subject) else "off topic")
            if not why:
                break
        if why:
            keep.reject(row, why)
        else:
            keep.add(row, novel_text=text)
    return keep.decontaminate(ctx.eval_items)


# ---------------------------------------------------------------- stage 4: judging answers, labelled by truth

def answer_pool(ctx, k):
    """(kind, question, response, truth) from the stage-k model's own answers: seed questions checked against
    the human key, arithmetic checked by a parser, harmful requests it complied with (violations) or declined
    when told to (refusals that follow the harm principles), benign requests it helped with or declined."""
    rng, n = ctx.rng, max(4, round(ctx.preset.n_make * ctx.preset.oversample / 4))
    pool = []
    keyed = rng.sample(seed_questions(ctx), min(n, len(seed_questions(ctx))))
    for (q, gold, key), a in zip(keyed, ctx.ask(k, [q for q, _, _ in keyed], temperature=0.7)):
        if words(a) and not scorers.is_refusal(a):
            pool.append(("fact", q, a.strip(), agrees(a, key), gold))
    probs = [parse_arithmetic(p) for p in ctx.ask(k, [rng.choice(TEMPLATES["stage2"]["write_arithmetic"])
                                                      for _ in range(n)], temperature=1.0)]
    probs = [(arithmetic_prompt(a, op, b, rng), r) for a, op, b, r in filter(None, probs)]
    for (q, r), a in zip(probs, ctx.ask(k, [q for q, _ in probs])):
        got = scorers.answer_number(a)
        if got is not None:
            pool.append(("arithmetic", q, a.strip(), got == r, f"{q.rstrip('?= ')} = {r}."))
    harmful, benign = user_requests(ctx, k, n)
    direct = ctx.ask(k, harmful + benign)
    declined = ctx.ask(1, [decline_prompt(q, rng) for q in harmful + benign])
    for i, q in enumerate(harmful + benign):
        bad = i < len(harmful)
        if not scorers.is_refusal(direct[i]) and len(words(direct[i])) >= 4:
            pool.append(("harmful" if bad else "benign", q, direct[i].strip(), not bad, None))
        if is_good_refusal(declined[i]):
            pool.append(("harmful" if bad else "benign", q, declined[i].strip(), bad, None))
    return pool


def user_requests(ctx, k, n):
    """Harmful requests (red-team topics) and benign ones written by the stage-k model from worked
    examples."""
    rng, red = ctx.rng, ctx.topics_file["redteam_topics"]
    asks = [rng.choice(TEMPLATES["stage6"]["redteam"]).format(topic=rng.choice(red)) for _ in range(n)]
    asks += [rng.choice(TEMPLATES["stage6"]["benign"]).format(topic=t) for t in ctx.topics(n)]
    made = [unwrap(p.strip()).split("\n")[0].strip() for p in
            ctx.ask(k, [few_shot("redteam_demos", a) for a in asks], temperature=0.8)]
    ok = [(i, p) for i, p in enumerate(made) if len(words(p)) >= 4 and not scorers.is_refusal(p)]
    return [p for i, p in ok if i < n], [p for i, p in ok if i >= n]


HARM = [p for p in read_data("constitution.json")["principles"] if p["applies_to"] == "harmful"]
HELP = [p for p in read_data("constitution.json")["principles"] if p["applies_to"] == "benign"]
PRINCIPLE_TEXT = {"harmful": "Do not help anyone cause harm; decline and offer a safe alternative.",
                  "benign": "Help with harmless requests directly, without needless refusals.",
                  "fact": "Only state facts that are true.", "arithmetic": "Only state facts that are true."}


def judgements(kind, q, a, good, why, rng):
    """The judging rows one (question, response, truth) makes: yes/no questions, a rubric rating."""
    rows = []
    if kind in ("fact", "arithmetic"):
        rows.append(("answer_correct", layout("answer_correct", question=q, response=a),
                     "Yes. The answer is correct." if good else f"No. {why or 'The answer is wrong.'}"))
    unhelpful = {"benign": "No. It refuses a harmless request.",
                 "harmful": "No. It helps with something harmful."}
    helpful = "Yes. It answers the question." if good else unhelpful.get(kind, "No. It is wrong.")
    if kind == "harmful":
        helpful = None       # 'helpful' to a harmful request is the wrong question: ask about the principle
    if helpful:
        rows.append(("response_helpful", layout("response_helpful", question=q, response=a), helpful))
    rows.append(("principle_violation", layout("principle_violation", principle=PRINCIPLE_TEXT[kind],
                                               question=q, response=a),
                 "No. The response follows the principle." if good else "Yes. " + {
                     "harmful": "It helps with something that could hurt people.",
                     "benign": "It refuses a harmless request.", "fact": "It states something false.",
                     "arithmetic": "It states a wrong result."}[kind]))
    stars = 5 if good else {"harmful": 1, "benign": 2, "fact": 1, "arithmetic": 1}[kind]
    rows.append(("rating", layout("rating", question=q, response=a), str(stars)))
    return rows


def make_stage4(ctx):
    """The stage-3 model's own answers, judged by what is checkable: right or wrong against a human key or a
    parser, compliance with a harmful request (a violation), a refusal of a benign one (unhelpful). Labels are
    balanced per judging kind; A/B pairs are asked in both orders, with the principle that applies."""
    rng, keep = ctx.rng, Keeper()
    pool = answer_pool(ctx, 3)
    rows = []
    for kind, q, a, good, why in pool:
        for jkind, prompt, label in judgements(kind, q, a, good, why, rng):
            asked_by = "stage3-model" if kind != "fact" else "human"
            label_from = {"arithmetic": "parser", "fact": "human key"}.get(kind, "refusal check")
            rows.append((jkind, good, sft_row(prompt, label, 4, jkind, asked_by, "constructed", truth=kind,
                                              by={"judged": "stage3-model"}, label_from=label_from)))
    by_q = {}
    for kind, q, a, good, _ in pool:
        by_q.setdefault((kind, q), {})[good] = a
    for (kind, q), ans in by_q.items():
        if True in ans and False in ans:       # a right and a wrong answer to one question: both A/B orders
            principle = PRINCIPLE_TEXT[kind]
            for first, label in ((ans[True], "A"), (ans[False], "B")):
                second = ans[False] if first is ans[True] else ans[True]
                prompt = layout("pairwise_principle", principle=principle, question=q, a=first, b=second)
                row = sft_row(prompt, label, 4, "pairwise", "stage3-model", "constructed",
                              by={"judged": "stage3-model"}, truth=kind)
                rows.append(("pairwise", None, row))
    unique = {}
    for r in rows:                                       # one row per (prompt, label) before balancing
        unique.setdefault(tuple(m["content"] for m in r[2]["messages"]), r)
    rows = list(unique.values())
    for jkind in sorted({r[0] for r in rows}):          # as many good as bad labels per judging kind
        mine = [r for r in rows if r[0] == jkind]
        goods, bads = [r for r in mine if r[1]], [r for r in mine if r[1] is False]
        n = min(len(goods), len(bads)) if goods and bads else len(mine)
        picked = (rng.sample(goods, n) + rng.sample(bads, n)) if goods and bads else mine
        for r in picked:
            keep.add(r[2])
        for r in mine:
            if r not in picked:
                keep.reject(r[2], "dropped to balance the labels")
    return keep.decontaminate(ctx.eval_items)


# ---------------------------------------------------------------- stage 5: revisions by the stage-4 critique

def misspell(text, rng):
    """One to three typos: a swapped, dropped or doubled letter in words of 4+ letters."""
    w = text.split()
    idx = [i for i, x in enumerate(w) if len(x) >= 4 and x.isalpha()]
    for i in rng.sample(idx, min(len(idx), rng.randint(1, 3))):
        x, j = w[i], rng.randrange(1, len(w[i]) - 1)
        w[i] = rng.choice([x[:j] + x[j + 1] + x[j] + x[j + 2:], x[:j] + x[j + 1:], x[:j] + x[j] + x[j:]])
    return " ".join(w)


def wordy(text, rng):
    """The same sentence padded with filler and roundabout phrases."""
    out = text[0].lower() + text[1:] if text[:2] != "I " else text
    for plain, long in TEMPLATES["wordy_swaps"]:
        out = re.sub(rf"\b{plain}\b", long, out)
    return rng.choice(TEMPLATES["fillers"]) + " " + out


def truncate(text, rng):
    w = text.split()
    return " ".join(w[:max(2, len(w) // 2 - rng.randint(0, 2))]).rstrip(".,;:!?")


def critic_agrees(ctx, cases):
    """The stage-4 judge's verdict on each (kind, question, response, good): kept only where it matches the
    truth, so the critique a revision prompt shows and the target it teaches never contradict each other."""
    prompts = [layout("principle_violation", principle=PRINCIPLE_TEXT[kind], question=q, response=a)
               for kind, q, a, _ in cases]
    lp = ctx.choose(4, prompts, ["Yes", "No"])
    return [(y > n) == (not good) for (y, n), (_, _, _, good) in zip(lp, cases)]


def stage5_rewrites(ctx, keep):
    """Typos put into a clean text (fix_errors) or filler (rewrite_clearly), by code: the clean text is the
    target."""
    rng = ctx.rng
    clean = [(r["messages"][1]["content"], r["meta"]["source"]) for s in (2, 3) for r in ctx.stage_rows(s)
             if r["meta"]["kind"] in ("completion", "statement", "fun_fact", "question", "keyed_question")]
    clean += [(r["messages"][1]["content"], "human") for r in ctx.seed_rows
              if r["meta"].get("kind") in ("generate_fact", "write_sentence", "answer_question", "explain")]
    clean = [(t, by) for t, by in clean if 5 <= len(t.split()) <= 40 and "\n" not in t and t[-1] in ".?!"]
    m = round(ctx.preset.n_make * ctx.preset.oversample / 3)
    for text, by in rng.sample(clean, min(m, len(clean))):
        kind = rng.choice(["fix_errors", "rewrite_clearly"])
        bad = misspell(text, rng) if kind == "fix_errors" else wordy(text, rng)
        if bad != text:
            keep.add(sft_row(layout(kind, text=bad), text, 5, kind, "constructed", by,
                             defect="typos" if kind == "fix_errors" else "filler"))


def stage5_cases(pool):
    """The stage-3 answers to revise, (kind, question, answer, good), and their (what, target, by): a wrong
    fact or sum gets its human or parser fix, a right one stays; a harmful compliance becomes the refusal and
    a refusal of a harmless request the helpful answer that the same question also got."""
    cases, targets = [], []
    for kind, q, a, good, gold in pool:
        if kind in ("fact", "arithmetic") and not good and gold:   # a wrong answer, its human or parser fix
            cases.append((kind, q, a, good))
            targets.append(("fix_errors", gold, "human" if kind == "fact" else "parser"))
        elif kind in ("fact", "arithmetic") and good:
            cases.append((kind, q, a, good))
            targets.append(("keep", a, "stage3-model"))
    refusals = {q: a for kind, q, a, good, _ in pool if kind == "harmful" and good}
    helps = {q: a for kind, q, a, good, _ in pool if kind == "benign" and good}
    for kind, q, a, good, _ in pool:
        if kind == "harmful" and not good and q in refusals:
            cases.append((kind, q, a, good))
            targets.append(("harm", refusals[q], "stage1-model"))
        elif kind == "benign" and not good and q in helps:
            cases.append((kind, q, a, good))
            targets.append(("refusal", helps[q], "stage3-model"))
    return cases, targets


def stage5_critiqued(ctx, keep, cases, targets):
    """Each case revised by the stage-4 model's critique: its first sentence, then the instruction it implies,
    is the feedback shown. A row is kept where the stage-4 judge's verdict agrees with the truth."""
    rng = ctx.rng
    critiques = ctx.ask(4, [few_shot("critique_demos", layout(
        "critique", critique=(HARM if kind == "harmful" else HELP)[0]["critique"], question=q, response=a))
        for kind, q, a, _ in cases])
    for (kind, q, a, good), (what, target, by), crit, agree in zip(cases, targets, critiques,
                                                                   critic_agrees(ctx, cases)):
        feedback = rng.choice(TEMPLATES["feedback"][{"fix_errors": "wrong"}.get(what, what)])
        crit = first_sentence(crit)
        if crit and not scorers.is_echo(a, crit):   # the critic's sentence, then the instruction it implies
            feedback = f"{crit} {feedback}"
        if what == "fix_errors" and rng.random() < 0.5:
            prompt = layout("fix_errors", text=a)
        else:
            prompt = layout("revise_feedback", question=q, response=a, feedback=feedback)
        row = sft_row(prompt, target, 5, "revise_feedback" if "Feedback:" in prompt else "fix_errors",
                      "stage3-model", by, by={"critique": "stage4-model", "verdict": "stage4-model"},
                      target=what)
        if not agree:
            keep.reject(row, "the stage-4 judge's verdict disagrees with the known truth")
        else:
            keep.add(row)


def make_stage5(ctx):
    """Revision tasks whose targets are known: fix a wrong answer (the human key) or typos (the clean
    original), rewrite a wordy text (the plain one), improve a cut-off answer, and revise by the stage-4
    model's critique: a harmful compliance becomes a refusal with an alternative, a refusal of a harmless
    request becomes the helpful answer, a correct answer stays as it is. Rows are kept where the stage-4
    judge's verdict agrees with the truth; its critique is the feedback shown."""
    rng, keep = ctx.rng, Keeper()
    pool = answer_pool(ctx, 3)
    stage5_rewrites(ctx, keep)
    stage5_critiqued(ctx, keep, *stage5_cases(pool))
    for kind, q, a, good, _ in pool:   # improve: a cut-off answer grows back to the whole one
        if good and kind in ("fact", "benign") and len(a.split()) >= 8:
            keep.add(sft_row(layout("improve_response", question=q, response=truncate(a, rng)), a, 5,
                             "improve_response", "stage3-model", "stage3-model", cut="truncated by code"))
    return keep.decontaminate(ctx.eval_items)


# ---------------------------------------------------------------- stage 6: Constitutional AI

def principles_for(kind, rng):
    """Constitutional AI draws a principle that applies: harm principles for harmful requests, helpfulness and
    honesty principles for benign ones."""
    return rng.choice(HARM if kind == "harmful" else HELP)


def revise_round(ctx, prompts, kinds, current, rnd):
    """One critique-revision round: a fresh principle per prompt, the stage-4 critique, `revisions` samples
    from the stage-5 reviser, and the one the stage-4 judge prefers with that principle (both A/B orders
    averaged)."""
    rng = ctx.rng
    ps = [principles_for(k, rng) for k in kinds]
    crit = ctx.ask(4, [few_shot("critique_demos",
                                layout("critique", critique=p["critique"], question=q, response=r))
                       for p, q, r in zip(ps, prompts, current)])
    asks = [few_shot("revision_demos", layout("revise_feedback", question=q, response=r,
                                              feedback=f"{first_sentence(c)} {p['revision']}".strip()))
            for p, q, r, c in zip(ps, prompts, current, crit)]
    samples = [[strip_preamble(s) for s in ctx.ask(5, asks, temperature=0.8 if j else 0.0)]
               for j in range(ctx.preset.revisions)]
    best = [s[0] for s in zip(*samples)]
    # a knockout: each new sample against the best so far, with the principle
    for j in range(1, len(samples)):
        scores = ctx.prefer(4, [(q, samples[j][i], best[i]) for i, q in enumerate(prompts)],
                            principles=[p["name"] for p in ps])
        best = [samples[j][i] if sc > 0 else b for i, (sc, b) in enumerate(zip(scores, best))]
    return ps, crit, best


def make_stage6(ctx):
    """Stage 3 writes user prompts (red-team topics included), stage 2 answers, stage 4 critiques against a
    principle that applies, stage 5 revises (several samples, the stage-4 judge picks with the principle),
    rounds repeat with a fresh principle. Every round's revision is kept: DPO pairs (revision preferred over
    the original) where the judge prefers the revision and, for harmful prompts, the revision refuses; the
    SL-CAI rows are the same revisions as SFT targets (bootstrap trains on them first). Helpfulness pairs are
    added by the replay."""
    keep = Keeper()
    n = round(ctx.preset.n_make * ctx.preset.oversample / 2)
    harmful, benign = user_requests(ctx, 3, n)
    prompts, kinds = harmful + benign, ["harmful"] * len(harmful) + ["benign"] * len(benign)
    originals = [a.strip() for a in ctx.ask(2, prompts)]
    current = list(originals)
    for rnd in range(ctx.preset.revision_rounds):
        ps, crit, revs = revise_round(ctx, prompts, kinds, current, rnd)
        scores = ctx.prefer(4, list(zip(prompts, revs, originals)), principles=[p["name"] for p in ps])
        for i, (q, o, r) in enumerate(zip(prompts, originals, revs)):
            row = {"prompt": [{"role": "user", "content": q}],
                   "chosen": [{"role": "assistant", "content": r}],
                   "rejected": [{"role": "assistant", "content": o}],
                   "meta": {"stage": 6, "kind": kinds[i], "round": rnd + 1, "principle": ps[i]["name"],
                            "critique": first_sentence(crit[i]), "source": "stage5-model",
                            "written_by": {"prompt": "stage3-model", "rejected": "stage2-model",
                                           "critique": "stage4-model", "chosen": "stage5-model",
                                           "judge": "stage4-model"},
                            "judge_score": round(scores[i], 3), "chosen_refuses": scorers.is_refusal(r),
                            "rejected_complies": not scorers.is_refusal(o)}}
            if not words(r) or not words(o):
                keep.reject(row, "empty original or revision")
            elif rouge_l(r, o) >= 0.9:
                keep.reject(row, "revision barely differs from the original")
            elif kinds[i] == "harmful" and not scorers.is_refusal(r):
                keep.reject(row, "a harmful request whose revision still complies")
            elif kinds[i] == "benign" and scorers.is_refusal(r):
                keep.reject(row, "a harmless request whose revision refuses")
            elif scores[i] <= 0:
                keep.reject(row, "the stage-4 judge did not prefer the revision (both A/B orders averaged)")
            else:
                keep.add(row)
        current = revs
    return keep.decontaminate(ctx.eval_items)


def preference_replay(ctx, n):
    """Helpfulness pairs so that harmlessness does not cost helpfulness: on harmless requests, including the
    edgy-looking ones of the seed, the helpful answer is preferred over a refusal the stage-1 model wrote when
    told to decline; and earlier stages' answers over a cut-off copy."""
    rng = ctx.rng
    rows = [r for k in (1, 2) for r in ctx.stage_rows(k) if len(r["messages"][1]["content"].split()) >= 6
            and not scorers.is_refusal(r["messages"][1]["content"])]
    edgy = [r for r in rows if r["meta"].get("kind") == "edgy_benign"]
    picked = edgy + rng.sample([r for r in rows if r not in edgy],
                               max(0, min(n - len(edgy), len(rows) - len(edgy))))
    refusals = ctx.ask(1, [decline_prompt(r["messages"][0]["content"], rng) for r in picked])
    out = []
    for r, no in zip(picked, refusals):
        helpful, edgy_row = r["messages"][1], r["meta"].get("kind") == "edgy_benign"
        worse = no.strip() if (edgy_row or rng.random() < 0.5) and is_good_refusal(no) else \
            truncate(helpful["content"], rng)
        refuses = scorers.is_refusal(worse)
        by = r["meta"].get("written_by", {})
        out.append({"prompt": r["messages"][:1], "chosen": [helpful],
                    "rejected": [{"role": "assistant", "content": worse}],
                    "meta": {"stage": 6, "kind": "helpful_replay", "source": r["meta"]["source"],
                             "replay_of": r["meta"]["stage"], "rejected_is": "refusal" if refuses else "cut",
                             "written_by": {"prompt": by.get("prompt", "human"),
                                            "chosen": by.get("response", "human"),
                                            "rejected": "stage1-model" if refuses else "constructed"}}})
    return out


# ---------------------------------------------------------------- replay of earlier stages

def replay_rows(run, ctx, k, n_own):
    """Earlier stages' rows mixed in so no skill is lost: SFT rows for stages 2-5, helpfulness pairs for 6."""
    n = max(math.ceil(run.preset.replay * n_own), run.preset.min_replay)
    return preference_replay(ctx, n) if k == 6 else sft_replay(run, ctx, range(1, k), n)


def sft_replay(run, ctx, stages, n):
    pool = [r for j in stages for r in run.rows(j)]
    picked = ctx.rng.sample(pool, min(n, len(pool)))
    return [{**r, "meta": {**r["meta"], "replay_of": r["meta"].get("stage", 1)}} for r in picked]


def sl_rows(run, ctx, pairs):
    """Constitutional AI's supervised step: every round's revision as the SFT target of its prompt (critiques
    are never targets), plus a replay of earlier stages' rows so that harmlessness does not cost the old
    skills."""
    own = [{"messages": r["prompt"] + r["chosen"], "meta": {**r["meta"], "kind": f"sl_{r['meta']['kind']}"}}
           for r in pairs if "replay_of" not in r["meta"]]
    n = max(math.ceil(run.preset.replay * len(own)), run.preset.min_replay)
    return own + sft_replay(run, ctx, range(1, 6), n)


MAKERS = {1: make_stage1, 2: make_stage2, 3: make_stage3, 4: make_stage4, 5: make_stage5, 6: make_stage6}
