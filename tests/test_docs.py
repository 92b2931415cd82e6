"""The repository explains itself: every markdown link in README.md and docs/ resolves inside the repo, and
nothing points readers at folders outside it."""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))
import check_links  # noqa: E402

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_link_resolves_inside_the_repository():
    bad = [(md.name, *p) for md in PAGES for p in check_links.problems(md)]
    assert bad == []


def test_the_checker_catches_links_out_and_missing_files_and_headings(tmp_path):
    md = ROOT / "docs" / "_probe_links.md"        # inside the repo, so relative links resolve from docs/
    try:
        md.write_text("# Probe\n[a](https://example.org) [b](nothing.md) [c](README.md#no-such-heading)\n"
                      "[d](../README.md) [e](#probe) `[f](https://inline.code)`\n")
        reasons = [why for _, _, why in check_links.problems(md)]
    finally:
        md.unlink()
    assert reasons == ["links out of the repository", "no such file", "no such heading"]


def test_no_page_sends_readers_outside_the_repository():
    # links are checked above; this catches a path above the repository written as plain or code text
    for md in PAGES:
        for path in re.findall(r"(?:\.\./)+[\w.-]+", md.read_text(encoding="utf-8")):
            dest = (md.parent / path).resolve()
            inside = dest == ROOT or ROOT in dest.parents
            assert inside and dest.exists(), f"{md.name}: {path} is not a path of this repository"
