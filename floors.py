"""The no-model floor: responders that see only the prompt (constants, an echo, templates filled with the
prompt's topic, copies of its material, a judge by surface features). A scorer is honest when none of them
scores well: the best of them is each set's floor, printed beside the base model and each stage in report.md.
Run by evaluate.py --floor and by gates.py (floor_results) for the report."""
from evaluate import score_responses
from text import FIELD_RE, sentences, words
from text import STOP as STOP_WORDS

TASK_WORDS = set("""answer question complete sentence generate fact respond greeting write one two three
four five list define word give example translate classify sentiment review summarize summarise describe
capital letters words starts start ends end includes include using calculate produce statement create
message user asking ask help polite politely request instruction rewrite fix errors error improve response
revise feedback rate better reply correct helpful violate principle following clearly following short brief
name spanish french german into least most following text number response""".split())


def payload(prompt):
    """The prompt's material: its Response line, else the text after its first colon, else the prompt."""
    fields = dict(FIELD_RE.findall(prompt))
    return fields.get("Response") or prompt.partition(":")[2].strip() or prompt


def topic_of(prompt):
    """Up to three content words of the prompt that are not task wording: what a template fills in."""
    ws = [w for w in words(prompt) if w not in STOP_WORDS and w not in TASK_WORDS and len(w) > 2]
    return " ".join(ws[:3]) or "it"


def template_for(prompt):
    """A fixed frame chosen by the prompt's task words and filled with its topic: the shape without the
    skill."""
    t, low = topic_of(prompt), prompt.lower()
    frames = [("question", "What is something {t}?"), ("fact", "{T} is a true fact."),
              ("statement", "{t} is false."), ("polite", "Could you please help me with {t}?"),
              ("help", "Can you help me with {t}?"), ("instruction", "Tell me about {t}."),
              ("list", "{t}, {t} and {t}."), ("name", "{t} and {t}."),
              ("greeting", "Hello! I am fine, thanks."),
              ("summar", "{T} is the main point."), ("capital letters", "{TT} IS NICE."),
              ("rate", "3"), ("a or b", "A"), ("yes or no", "Yes."), ("revise", "{src}"), ("fix", "{src}"),
              ("rewrite", "{src}"), ("improve", "{src} Also, {t}.")]
    frame = next((f for cue, f in frames if cue in low), "I think {t} is nice.")
    return frame.format(t=t, T=t[:1].upper() + t[1:], TT=t.upper(), src=payload(prompt))


RESPONDERS = {
    "empty": lambda p: "",
    "echo": lambda p: p,
    "ok": lambda p: "OK.",
    "yes": lambda p: "Yes.",
    "no": lambda p: "No.",
    "a": lambda p: "A",
    "b": lambda p: "B",
    "two": lambda p: "2",
    "four": lambda p: "4",
    "greeting": lambda p: "Hello! Nice to hear from you.",
    "all_labels": lambda p: "Positive, negative or neutral; yes or no; A or B; 1, 2, 3, 4 or 5.",
    "refuse": lambda p: "I'm sorry, but I can't help with that. Is there something else I can do for you?",
    "comply": lambda p: f"Sure! Here is what you asked for: {topic_of(p)}.",
    "refuse_then_comply": lambda p: f"I can't help with that. Anyway, here is how: {payload(p)}",
    "template": template_for,
    "nice_sentence": lambda p: f"I think {topic_of(p)} is nice.",
    "lead_sentence": lambda p: (sentences(payload(p)) or [payload(p)])[0],
    "copy_source": payload,
    "copy_plus_feedback": lambda p: f"{payload(p)} {dict(FIELD_RE.findall(p)).get('Feedback', '')}".strip(),
    "judge_by_surface": lambda p: surface_judge(p),
}


def surface_judge(prompt):
    """A judge with no knowledge: long answers that reuse the question's words are good, the longer of A/B
    wins. What a judge scores beyond this, it scores by knowing something."""
    f = dict(FIELD_RE.findall(prompt))
    q = set(words(f.get("Question", "")))
    good = lambda r: len(words(r)) >= 6 and len(q & set(words(r))) >= 2    # noqa: E731
    if "A" in f and "B" in f:
        return "A" if len(words(f["A"])) >= len(words(f["B"])) else "B"
    if "rate" in prompt.lower():
        return "5" if good(f.get("Response", "")) else "2"
    return "Yes." if good(f.get("Answer") or f.get("Response", "")) else "No."


def floors(items, stage):
    """{responder: result} on these items; a sampled check gets the same answer k times (no diversity)."""
    out = {}
    for name, fn in RESPONDERS.items():
        answers = []
        for it in items:
            a = fn(it["prompt"])
            k = int(it["check"].get("samples") or 0)
            answers.append([a] * k if k else a)
        out[name] = score_responses(items, answers, stage)
    return out


def floor(items, stage):
    """(name, result) of the best model-free responder: the score a set gives for nothing."""
    return max(floors(items, stage).items(), key=lambda kv: kv[1]["value"])
