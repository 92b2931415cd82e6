"""Check the links of markdown files: every relative link must name a file or folder of this repository
(and, with #anchor, a heading of that file); links out of the repository (http, https, ../ above the root)
are errors. Code blocks and inline code are skipped.

    python docs/check_links.py                  # docs/*.md
    python docs/check_links.py README.md docs/*.md
Exits 1 and lists every bad link as file:line: target (reason).
"""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^()\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose_lines(text, keep_code=False):
    """(line number, line) outside fenced code blocks, with inline code removed unless keep_code."""
    fenced = False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield n, line if keep_code else re.sub(r"`[^`]*`", "", line)


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path):
    """Every heading anchor of a markdown file, with GitHub's -1, -2 suffixes for repeats."""
    seen, out = {}, set()
    for _, line in prose_lines(path.read_text(encoding="utf-8"), keep_code=True):
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            base = slug(m.group(1))
            k = seen.get(base, 0)
            out.add(base if k == 0 else f"{base}-{k}")
            seen[base] = k + 1
    return out


def problems(md):
    """[(line, target, reason)] for the bad links of one markdown file."""
    bad = []
    for n, line in prose_lines(md.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):
                bad.append((n, target, "links out of the repository"))
                continue
            path, _, anchor = target.partition("#")
            dest = (md.parent / path).resolve() if path else md.resolve()
            if ROOT not in dest.parents and dest != ROOT:
                bad.append((n, target, "points outside the repository"))
            elif not dest.exists():
                bad.append((n, target, "no such file"))
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append((n, target, "no such heading"))
    return bad


def main(args):
    files = [Path(a) for a in args] or sorted((ROOT / "docs").glob("*.md"))
    bad = [(md, *p) for md in files for p in problems(md)]
    for md, n, target, why in bad:
        print(f"{md}:{n}: {target} ({why})")
    print(f"{len(files)} file(s), {len(bad)} bad link(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
