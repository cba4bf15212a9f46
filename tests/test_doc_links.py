"""Every relative link in README.md and docs/ points at a file that exists: docs move (dated
investigations go to docs/studies/), and a link left behind sends a reader nowhere."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target): markdown's inline links


def relative_links(page: Path, anchors: bool = False) -> list[str]:
    targets = [m.group(1) if anchors else m.group(1).split("#")[0] for m in LINK.finditer(page.read_text())]
    return [t for t in targets if t and not re.match(r"[a-z]+:", t)]  # skip http:, mailto:, ...


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def pages() -> list[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    missing = [t for t in relative_links(page) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_anchor_into_a_markdown_page_names_one_of_its_headings(page):
    links = [t.split("#", 1) for t in relative_links(page, anchors=True) if "#" in t]
    targets = [(f"{f}#{a}", page.parent / f if f else page, a) for f, a in links]
    missing = [link for link, target, a in targets
               if target.suffix == ".md" and target.is_file() and a not in heading_anchors(target)]
    assert not missing, f"{page.relative_to(ROOT)} links to headings that do not exist: {missing}"


def test_heading_anchors_follow_githubs_rule(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# SwAV (`method.name: swav`)\n\n## At this scale\n## Decisions: paper, code\n")
    assert heading_anchors(page) == {"swav-methodname-swav", "at-this-scale", "decisions-paper-code"}


def test_the_link_pattern_finds_relative_links_and_skips_urls(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("see [a](a.md#x), [b](sub/b.png) and [web](https://example.org/c.md) ![i](i.png)")
    assert relative_links(page) == ["a.md", "sub/b.png", "i.png"]
