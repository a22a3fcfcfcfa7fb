"""The README's and docs' links lead somewhere: every relative link names a file of the repository, and every
`#anchor` one of the target's headings, as GitHub renders them (a reader who follows a link to a figure
lands on it, not at the top of a 2,000-line page)."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *#*$")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lower-cased, punctuation but `-` and `_` dropped,
    spaces made hyphens.

    >>> slug("A lower starting β under the budget (`ppo.kl_coef` 0.1; measured)")
    'a-lower-starting-β-under-the-budget-ppokl_coef-01-measured'
    >>> slug("[Results](results.md): what *the* figures are")
    'results-what-the-figures-are'
    """
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = text.replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    """Every heading's anchor in a markdown file (read once per file); a repeated heading gets -1, -2, ...
    as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else HEADING.match(line)
        if m:
            s = slug(m.group(1))
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return frozenset(out)


def links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # code blocks hold no links
    text = re.sub(r"`[^`\n]*`", "", text)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]  # http:, mailto: are not ours


def test_slug_matches_githubs_rule_on_headings_with_code_and_punctuation():
    assert slug("Figures over seeds") == "figures-over-seeds"
    assert slug("With the Canon layer (the default since a0db5ca; 2026-12-07)") == (
        "with-the-canon-layer-the-default-since-a0db5ca-2026-12-07"
    )
    assert slug("Leave-one-out advantages (`ppo.advantage: rloo`, a lever, off by default)") == (
        "leave-one-out-advantages-ppoadvantage-rloo-a-lever-off-by-default"
    )


def test_a_repeated_heading_gets_a_numbered_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Page\n## Seeds\ntext\n```\n## not a heading\n```\n## Seeds\n")
    assert anchors(page) == {"page", "seeds", "seeds-1"}


def broken_links(doc: Path, root: Path = ROOT) -> list[str]:
    """The relative links of `doc` whose file or anchor does not exist, each with what is missing."""
    broken = []
    for target in links(doc):
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            broken.append(
                f"{target}: no file {dest.relative_to(root) if dest.is_relative_to(root) else dest}"
            )
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.relative_to(root)}")
    return broken


def test_a_missing_file_and_a_missing_heading_are_reported(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n## The seed table\n")
    page = tmp_path / "page.md"
    page.write_text(
        "See [the table](other.md#the-seed-table), [gone](other.md#the-old-table), [nothing](none.md),\n"
        "[here](#page), `[not a link](x.md)` and [the web](https://example.com).\n# Page\n"
    )
    assert broken_links(page, tmp_path) == [
        "other.md#the-old-table: no heading with that anchor in other.md",
        "none.md: no file none.md",
    ]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(doc):
    broken = broken_links(doc)
    assert not broken, f"{doc.relative_to(ROOT)}:\n" + "\n".join(broken)
