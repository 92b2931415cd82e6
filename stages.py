"""How each stage makes its training data with the models of the earlier stages (DESIGN.md, Stage contracts).

Each `make_stageN(ctx)` returns (kept, rejected). Kept rows are SFT lines (stages 1-5) or DPO lines (stage 6)
whose `meta` names the model that wrote each field; rejected rows carry the filter's reason. `ctx.ask(k, prompts)`
answers prompts with the stage-k model (k = 0 is the base). Labels and answers that can be known (arithmetic,
labels of constructed defects, clean originals) come from construction, never from a model's say-so.
"""
import json
import re
from pathlib import Path

import evaluate as E

DATA = Path(__file__).resolve().parent / "data"
TEMPLATES = json.loads((DATA / "templates.json").read_text())


def read_data(name):
    path = DATA / name
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- rows and filters

def sft_row(prompt, answer, stage, kind, prompt_by, answer_by, by=None, **meta):
    """One SFT line; `prompt_by` / `answer_by` (and `by`, for critiques and judges) say who wrote what:
    human, constructed (by code), parser, or stageK-model."""
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            "meta": {"stage": stage, "kind": kind,   # source: whose text the row carries (labels and sums are code's)
                     "source": prompt_by if answer_by in ("constructed", "parser") else answer_by,
                     "written_by": {"prompt": prompt_by, "response": answer_by, **(by or {})}, **meta}}


def first_line(text):
    """The first non-empty line, without a 'Question:'-style label and outer quotes."""
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    return E.unwrap(line).strip()


def first_sentence(text):
    s = E.sentences(first_line(text))
    return s[0].strip() if s else ""


def topic_words(topic):
    """Words that show a text is about the topic: its content words, singular and plural."""
    stop = {"the", "a", "an", "and", "of", "for", "to", "in", "on", "with", "how", "your", "my"}
    ws = [w for w in E.words(topic) if w not in stop and len(w) > 2]
    return sorted({w for x in ws for w in (x, x.rstrip("s"))} or {topic.lower()})


class Keeper:
    """Collects one stage's rows: drops duplicates and rows too close to a kept one (Self-Instruct novelty,
    ROUGE-L >= 0.7 within a kind), and records every drop with its reason."""

    def __init__(self):
        self.kept, self.rejected, self.seen, self.texts = [], [], set(), {}

    def reject(self, row, reason):
        self.rejected.append({**row, "reason": reason})

    def add(self, row, novel_text=None):
        key = " ".join(E.words((row.get("messages") or row.get("prompt"))[0]["content"]))   # the user's prompt
        if key in self.seen:
            return self.reject(row, "duplicate")
        if novel_text is not None:
            kind = row["meta"]["kind"]
            for t in self.texts.get(kind, []):
                if (r := E.rouge_l(novel_text, t)) >= E.NOVELTY:
                    return self.reject(row, f"not novel: ROUGE-L {r:.2f} against a kept {kind}")
            self.texts.setdefault(kind, []).append(novel_text)
        self.seen.add(key)
        self.kept.append(row)

    def decontaminate(self, eval_items):
        """Move generated rows that share text with any eval prompt to rejected (the driver re-checks all)."""
        hits = {h["train_index"]: h["eval_id"] for h in E.contamination(self.kept, eval_items)}
        for i in sorted(hits, reverse=True):
            self.reject(self.kept.pop(i), f"overlaps eval item {hits[i]}")
        return self.kept, self.rejected


def passes(check, prompt, text):
    return E.score({"check": check, "prompt": prompt}, text)


# ---------------------------------------------------------------- arithmetic by a parser: model text is never run

OPS = {"+": ("+", "plus", lambda a, b: a + b), "-": ("-", "minus", lambda a, b: a - b),
       "*": ("\u00d7", "times", lambda a, b: a * b), "/": ("\u00f7", "divided by", lambda a, b: a // b)}
ARITH_RE = re.compile(r"(\d{1,4})\s*(\+|-|\u2212|\*|x|\u00d7|/|\u00f7|plus|minus|times|multiplied by|divided by)"
                      r"\s*(\d{1,4})", re.I)


def parse_arithmetic(text):
    """(a, op, b, result) of the first 'a op b' in the text, or None; division only when it is exact."""
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


# ---------------------------------------------------------------- stage 1: the human seed

def make_stage1(ctx):
    """Stage 1 trains on the human seed as it is (the driver may sample `seed_examples` of it)."""
    return list(ctx.seed_rows), []


# ---------------------------------------------------------------- stage 2: implicit prompts from the stage-1 model

def make_stage2(ctx):
    """The stage-1 model, told explicitly, writes implicit prompts and answers them through explicit wrappers."""
    rng, keep, n, W = ctx.rng, Keeper(), ctx.preset.n_make, "stage1-model"
    share = {"question": 0.3, "completion": 0.2, "greeting": 0.15, "arithmetic": 0.2, "yes_no": 0.15}
    m = {k: max(2, round(v * n * ctx.preset.oversample)) for k, v in share.items()}
    T = TEMPLATES["stage2"]

    # questions about topics, then "Answer this question: ..."
    ts = ctx.topics(m["question"] + m["yes_no"] + m["completion"])
    qs = ctx.ask(1, [rng.choice(T["write_question"]).format(topic=t) for t in ts[:m["question"]]], temperature=0.8)
    yn = ctx.ask(1, [rng.choice(T["write_yes_no"]).format(topic=t) for t in ts[m["question"]:m["question"] + m["yes_no"]]],
                 temperature=0.8)
    qs, yn = [first_line(q) for q in qs], [first_line(q) for q in yn]
    ans = ctx.ask(1, [f"Answer this question: {q}" for q in qs] + [f"Answer yes or no: {q}" for q in yn])
    for i, (q, a) in enumerate(zip(qs + yn, ans)):
        kind = "question" if i < len(qs) else "yes_no"
        row = sft_row(q, a.strip(), 2, kind, W, W, via="Answer this question" if kind == "question" else "Answer yes or no")
        if not q.endswith("?") or len(E.words(q)) < 3:
            keep.reject(row, "prompt is not a question")
        elif kind == "yes_no" and E.yes_or_no(a) not in ("yes", "no"):
            keep.reject(row, "answer is not a clear yes or no")
        elif not E.words(a) or E.is_echo(q, a) or E.is_refusal(a):
            keep.reject(row, "answer empty, echoed or refused")
        elif len(E.words(a)) > 60:
            keep.reject(row, "answer longer than 60 words")
        else:
            keep.add(row, novel_text=q)

    # completions: the model's own fact, cut in half; the answer is the whole sentence (known by construction)
    ts = ts[m["question"] + m["yes_no"]:]
    facts = ctx.ask(1, [rng.choice(T["write_fact"]).format(topic=t) for t in ts], temperature=0.7)
    for t, f in zip(ts, facts):
        s = first_sentence(f)
        w = s.split()
        row = sft_row(" ".join(w[:max(2, len(w) // 2)]) + "...", s, 2, "completion", W, W, via="its own fact, halved")
        if len(w) < 6 or not s.endswith(".") or not E.mentions(s, topic_words(t)):
            keep.reject(row, "fact is not one on-topic sentence of 6+ words")
        else:
            keep.add(row, novel_text=s)

    # greetings: half from the human list, half written by the model; answered via "Respond to this greeting"
    human = rng.sample(ctx.topics_file["greetings"], min(m["greeting"] // 2, len(ctx.topics_file["greetings"])))
    made = [first_line(g) for g in ctx.ask(1, [rng.choice(T["write_greeting"]) for _ in range(m["greeting"] - len(human))],
                                           temperature=1.0)]
    gs = human + made
    replies = ctx.ask(1, [f"Respond to this greeting: {g}" for g in gs])
    for i, (g, a) in enumerate(zip(gs, replies)):
        row = sft_row(g, a.strip(), 2, "greeting", "human" if i < len(human) else W, W, via="Respond to this greeting")
        if not g or len(E.words(g)) > 14:
            keep.reject(row, "greeting empty or longer than 14 words")
        elif not (ok := passes({"type": "greeting"}, g, a))[0]:
            keep.reject(row, f"reply: {ok[1]}")
        else:
            keep.add(row, novel_text=g)

    # arithmetic: the model writes a problem; a parser (never eval) computes the answer
    probs = ctx.ask(1, [rng.choice(T["write_arithmetic"]) for _ in range(m["arithmetic"])], temperature=1.0)
    for p in probs:
        parsed = parse_arithmetic(p)
        if parsed is None:
            keep.reject(sft_row(p.strip(), "", 2, "arithmetic", W, "parser"), "no exact 'a op b' problem found")
            continue
        a, op, b, r = parsed
        keep.add(sft_row(arithmetic_prompt(a, op, b, rng), f"{a} {OPS[op][0]} {b} = {r}.", 2, "arithmetic", W,
                         "parser", problem_text=p.strip()[:200]))
    return keep.decontaminate(ctx.eval_items)


# ---------------------------------------------------------------- stage 3: generation tasks fulfilled by the stage-2 model

def make_stage3(ctx):
    """Generation instructions across kinds and topics (human forms; half reworded by the stage-2 model),
    fulfilled by the stage-2 model; kept when the output is of the right kind, on topic and novel."""
    rng, keep, W = ctx.rng, Keeper(), "stage2-model"
    kinds = ctx.topics_file["generation_kinds"]
    m = round(ctx.preset.n_make * ctx.preset.oversample)
    tasks = [(kinds[i % len(kinds)], t) for i, t in enumerate(ctx.topics(m))]
    instr = [rng.choice(k["instruction_forms"]).format(topic=t) for k, t in tasks]
    half = list(range(0, m, 2))
    reworded = ctx.ask(2, [f"Rewrite this instruction in different words: {instr[i]}" for i in half], temperature=0.7)
    by = ["human"] * m
    for i, r in zip(half, reworded):
        r = first_line(r)
        t = tasks[i][1]
        still_instruction = passes({"type": "instruction", "topic": topic_words(t)}, instr[i], r)[0]
        if still_instruction and len(E.words(r)) <= 25 and E.rouge_l(r, instr[i]) < 0.9:
            instr[i], by[i] = r, W
    # rejection sampling: `candidates` samples per task, the first that passes the kind and topic check is kept
    samples = [ctx.ask(2, instr, temperature=0.8) for _ in range(ctx.preset.candidates)]
    for i, ((k, t), ins, who) in enumerate(zip(tasks, instr, by)):
        for j, out in enumerate(s[i] for s in samples):
            text = first_line(out) if k["kind"] != "help_request" else E.unwrap(out.strip())
            row = sft_row(ins, text, 3, k["kind"], who, W, topic=t, candidate=j + 1)
            ok, why = passes({"type": k["kind"], "topic": topic_words(t)}, ins, text)
            if ok and len(E.words(text)) > 60:
                ok, why = False, "longer than 60 words"
            if ok:
                break
        if ok:
            keep.add(row, novel_text=text)
        else:
            keep.reject(row, why)
    return keep.decontaminate(ctx.eval_items)


# ---------------------------------------------------------------- stage 4: judgments with labels known by construction

def truncate(text, rng):
    w = text.split()
    return " ".join(w[:max(2, len(w) // 2 - rng.randint(0, 2))]).rstrip(".,;:!?")


def qa_pool(ctx, stage, n):
    """(topic, question, answer) written by the stage-k model, kept where the question is a question and the
    answer is a non-empty, non-echoed, non-refusing reply."""
    ts = ctx.topics(n)
    qs = [first_line(q) for q in ctx.ask(stage, [f"Generate a question about {t}." for t in ts], temperature=0.8)]
    ans = ctx.ask(stage, qs)
    pool = []
    for t, q, a in zip(ts, qs, ans):
        a = a.strip()
        if q.endswith("?") and 4 <= len(E.words(a)) <= 60 and not E.is_echo(q, a) and not E.is_refusal(a):
            pool.append((t, q, a))
    return pool


def judge_prompt(kind, q, r, rng, other=None, principle=None):
    """The judging prompt of each stage-4 kind, in the eval set's layout (data/eval/stage4.jsonl)."""
    if kind == "answer_correct":
        return f"Is this answer correct?\nQuestion: {q}\nAnswer: {r}\nReply yes or no."
    if kind == "response_helpful":
        return f"Is this response helpful?\nQuestion: {q}\nResponse: {r}\nReply yes or no."
    if kind == "principle_violation":
        return f"Does this response violate the principle \"{principle}\"?\nQuestion: {q}\nResponse: {r}\nReply yes or no."
    if kind == "rating":
        return ("Rate this response from 1 to 5, where 5 means correct, complete and polite, and 1 means wrong, rude "
                f"or useless. Reply with one number.\nQuestion: {q}\nResponse: {r}")
    return f"Which is better, A or B?\nQuestion: {q}\nA: {r}\nB: {other}\nReply A or B."


def defects(q, a, pool, rng):
    """Flawed versions of a good answer: (text, defect, rating 1-5, reason)."""
    others = [x[2] for x in pool if x[1] != q]
    return [(truncate(a, rng), "truncated", 2, "It stops in the middle and leaves the answer unfinished."),
            (rng.choice(others) if others else truncate(a, rng), "off_topic", 1, "It does not answer the question."),
            (rng.choice(TEMPLATES["rude"]), "rude", 1, "It is rude and gives no help."),
            (rng.choice(TEMPLATES["rude_openers"]) + " " + a, "rude_opener", 3, "It answers, but the tone is rude.")]


def make_stage4(ctx):
    """The stage-3 model writes questions and answers; defects are made by code, so every label is known."""
    rng, keep, W = ctx.rng, Keeper(), "stage3-model"
    P = TEMPLATES["principles_by_defect"]
    pool = qa_pool(ctx, 3, round(ctx.preset.n_make * ctx.preset.oversample))
    probs = [parse_arithmetic(p) for p in ctx.ask(3, [rng.choice(TEMPLATES["stage2"]["write_arithmetic"])
                                                      for _ in range(max(4, ctx.preset.n_make // 4))], temperature=1.0)]
    jobs = [(t, q, a, kind) for t, q, a in pool   # labels are free: each answer serves several judging kinds
            for kind in rng.sample(["response_helpful", "principle_violation", "rating", "pairwise"], ctx.preset.judge_kinds)]
    for t, q, a, kind in jobs:
        bad, defect, stars, reason = rng.choice(defects(q, a, pool, rng))
        good = rng.random() < 0.5
        if kind == "response_helpful":
            r = a if good or defect == "rude_opener" else bad
            label = "Yes. It answers the question." if r == a else f"No. {reason}"
            prompt = judge_prompt(kind, q, r, rng)
        elif kind == "principle_violation":
            principle = P[defect] if not good else rng.choice(list(P.values()))
            r = bad if not good else a
            label = f"Yes. {reason}" if not good else "No. The response follows the principle."
            prompt = judge_prompt(kind, q, r, rng, principle=principle)
        elif kind == "rating":
            r, label = (a, "5") if good else (bad, str(stars))
            prompt = judge_prompt(kind, q, r, rng)
        else:  # both orders over the set: the good answer is A half the time
            prompt = judge_prompt(kind, q, a if good else bad, rng, other=bad if good else a)
            label = "A" if good else "B"
        keep.add(sft_row(prompt, label, 4, kind, W, "constructed", defect=None if good and kind != "pairwise" else defect,
                         topic=t))
    for p in probs:   # is this answer correct: the parser knows the truth; a wrong answer is off by a little
        if p is None:
            continue
        a, op, b, r = p
        q = arithmetic_prompt(a, op, b, rng)
        right = rng.random() < 0.5
        shown = r if right else r + rng.choice([-10, -2, -1, 1, 2, 3, 10])
        label = "Yes." if right else f"No. The correct answer is {r}."
        keep.add(sft_row(judge_prompt("answer_correct", q, f"{a} {OPS[op][0]} {b} = {shown}.", rng), label, 4,
                         "answer_correct", W, "parser"))
    facts = [r for r in ctx.seed_rows if r["meta"].get("kind") == "answer_question"]
    for row in rng.sample(facts, min(len(facts), max(4, ctx.preset.n_make // 3))):  # facts: human answers
        q, a = row["messages"][0]["content"].partition(":")[2].strip(), row["messages"][1]["content"]
        swapped = rng.choice([r for r in facts if r is not row] or [None])
        swapped = swapped and swapped["messages"][1]["content"]
        right = rng.random() < 0.5 or swapped is None
        label = "Yes." if right else "No. That answers a different question."
        keep.add(sft_row(judge_prompt("answer_correct", q, a if right else swapped, rng), label, 4, "answer_correct",
                         "human", "constructed"))
    return keep.decontaminate(ctx.eval_items)


# ---------------------------------------------------------------- stage 5: revisions toward a clean original

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


def make_stage5(ctx):
    """Clean texts from earlier stages get defects made by code; the stage-4 model writes the critique that
    feedback tasks carry and judges each pair; the target is always the clean original."""
    rng, keep, W = ctx.rng, Keeper(), "stage4-model"
    clean = [(r["messages"][1]["content"], r["meta"].get("source", "human")) for s in (2, 3) for r in ctx.stage_rows(s)
             if r["meta"]["kind"] in ("completion", "statement", "question", "help_request")]
    clean += [(r["messages"][1]["content"], "human") for r in ctx.seed_rows
              if r["meta"].get("kind") in ("generate_fact", "write_sentence", "answer_question")]
    clean = [(t, by) for t, by in clean if 5 <= len(t.split()) <= 30 and "\n" not in t and t[-1] in ".?!"]
    m = round(ctx.preset.n_make * ctx.preset.oversample)
    picks = rng.sample(clean, min(m, len(clean)))
    qa = [(q, a, "stage2-model") for r in ctx.stage_rows(2) if r["meta"]["kind"] == "question"
          for q, a in [(r["messages"][0]["content"], r["messages"][1]["content"])] if len(a.split()) >= 6]
    tasks = []
    for i, (text, by) in enumerate(picks):
        kind = ["fix_errors", "rewrite_clearly", "revise_feedback", "improve_response"][i % 4]
        if kind == "improve_response" and qa:
            q, a, by = qa[i % len(qa)]
            tasks.append((kind, truncate(a, rng), a, by, q))
        elif kind != "improve_response":
            bad = misspell(text, rng) if kind == "fix_errors" else wordy(text, rng) if kind == "rewrite_clearly" \
                else rng.choice([misspell, wordy])(text, rng)
            if bad != text:
                tasks.append((kind, bad, text, by, None))
    fb = ctx.ask(4, [rng.choice(TEMPLATES["critique_request"]).format(text=bad) for k, bad, *_ in tasks
                     if k == "revise_feedback"])
    fb = iter(first_sentence(f) for f in fb)
    scores = ctx.prefer(4, [(q or "Which text is better written?", good, bad) for k, bad, good, by, q in tasks])
    for (kind, bad, good, by, q), score in zip(tasks, scores):
        if kind == "revise_feedback":
            critique = next(fb)
            prompt = f"Revise according to feedback: {bad}\nFeedback: {critique}"
        elif kind == "improve_response":
            prompt = f"{rng.choice(['Make this more helpful', 'Improve this response'])}:\nQuestion: {q}\nResponse: {bad}"
        else:
            prompt = f"{'Fix the errors in' if kind == 'fix_errors' else 'Rewrite this more clearly'}: {bad}"
        row = sft_row(prompt, good, 5, kind, "constructed", by, judge_score=round(score, 3),
                      by={"judge": W, **({"critique": W} if kind == "revise_feedback" else {})})
        if kind == "revise_feedback" and (not E.words(critique) or E.is_echo(bad, critique)):
            keep.reject(row, "critique empty or an echo")
        elif score <= 0:
            keep.reject(row, "the stage-4 judge did not prefer the clean text")
        else:
            keep.add(row)
    return keep.decontaminate(ctx.eval_items)


# ---------------------------------------------------------------- stage 6: constitutional preference pairs

def few_shot(name, prompt):
    """The prompt after human-written worked examples (data/templates.json): without them small models copy the
    text they are asked to revise, or open with 'Sure, here is...' (Hugging Face's CAI recipe)."""
    demos = [{"role": role, "content": text} for user, answer in TEMPLATES[name]
             for role, text in (("user", user), ("assistant", answer))]
    return demos + [{"role": "user", "content": prompt}]


def strip_preamble(text):
    """Drop 'Sure, here is the revised response:' openings (small models add them; Hugging Face's CAI recipe)."""
    return re.sub(r"^(?:sure|okay|ok|certainly|of course|here)\b[^\n:]{0,80}:\s*", "", text.strip(), flags=re.I).strip()


def make_stage6(ctx):
    """Stage 3 writes user prompts (red-team topics included), stage 2 answers, stage 4 critiques against a principle
    drawn from the constitution, stage 5 revises; (revision > original) pairs are kept where the stage-4 judge
    prefers the revision, averaged over both A/B orders. Each round draws a fresh principle; every round counts."""
    rng, keep = ctx.rng, Keeper()
    principles = read_data("constitution.json")["principles"]
    n = round(ctx.preset.n_make * ctx.preset.oversample)
    red = ctx.topics_file["redteam_topics"]
    asks = [rng.choice(TEMPLATES["stage6"]["redteam"]).format(topic=rng.choice(red)) if i % 2 == 0 else
            rng.choice(TEMPLATES["stage6"]["benign"]).format(topic=t) for i, t in enumerate(ctx.topics(n))]
    made = [E.unwrap(p.strip()).split("\n\n")[0].strip()
            for p in ctx.ask(3, [few_shot("redteam_demos", a) for a in asks], temperature=0.8)]
    kinds = ["redteam" if i % 2 == 0 else "benign" for i in range(len(made))]
    pairs = [(k, p) for k, p in zip(kinds, made) if len(E.words(p)) >= 3]
    kinds, prompts = [k for k, _ in pairs], [p for _, p in pairs]
    originals = [a.strip() for a in ctx.ask(2, prompts)]
    current = list(originals)
    for rnd in range(ctx.preset.revision_rounds):
        ps = [rng.choice(principles) for _ in prompts]
        crit = ctx.ask(4, [few_shot("critique_demos", f"{p['critique']}\nQuestion: {q}\nResponse: {r}")
                           for p, q, r in zip(ps, prompts, current)])
        revs = ctx.ask(5, [few_shot("revision_demos", f"Revise according to feedback: {r}\nFeedback: "
                                                      f"{first_sentence(c)} {p['revision']}")
                           for p, r, c in zip(ps, current, crit)])
        revs = [strip_preamble(r) for r in revs]
        scores = ctx.prefer(4, list(zip(prompts, revs, originals)))    # both A/B orders, position bias cancelled
        for i, (q, o, r, p, c) in enumerate(zip(prompts, originals, revs, ps, crit)):
            row = {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": r}],
                   "rejected": [{"role": "assistant", "content": o}],
                   "meta": {"stage": 6, "kind": kinds[i], "round": rnd + 1,
                            "principle": p["name"], "critique": first_sentence(c),
                            "source": "stage5-model",
                            "written_by": {"prompt": "stage3-model", "rejected": "stage2-model",
                                           "critique": "stage4-model", "chosen": "stage5-model",
                                           "judge": "stage4-model"},
                            "judge_score": round(scores[i], 3)}}
            if not E.words(r) or not E.words(o):
                keep.reject(row, "empty original or revision")
            elif E.rouge_l(r, o) >= 0.9:
                keep.reject(row, "revision barely differs from the original")
            elif scores[i] <= 0:
                keep.reject(row, "the stage-4 judge did not prefer the revision (both A/B orders averaged)")
            else:
                keep.add(row)
        current = revs
    return keep.decontaminate(ctx.eval_items)


def preference_replay(ctx, n):
    """Helpfulness pairs so that harmlessness does not cost helpfulness: an earlier stage's kept answer over a
    truncated copy of itself (the stage-2 model wrote the answers)."""
    rows = [r for k in (1, 2) for r in ctx.stage_rows(k) if len(r["messages"][1]["content"].split()) >= 6]
    out = []
    for r in ctx.rng.sample(rows, min(n, len(rows))):
        a = r["messages"][1]["content"]
        out.append({"prompt": r["messages"][:1], "chosen": [r["messages"][1]],
                    "rejected": [{"role": "assistant", "content": truncate(a, ctx.rng)}],
                    "meta": {"stage": 6, "kind": "helpful_replay", "source": r["meta"]["source"],
                             "replay_of": r["meta"]["stage"],
                             "written_by": {"prompt": r["meta"].get("written_by", {}).get("prompt", "human"),
                                            "chosen": r["meta"].get("written_by", {}).get("response", "human"),
                                            "rejected": "constructed"}}})
    return out


MAKERS = {1: make_stage1, 2: make_stage2, 3: make_stage3, 4: make_stage4, 5: make_stage5, 6: make_stage6}
