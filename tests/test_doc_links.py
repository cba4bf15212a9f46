"""Every relative link in README.md and docs/ points at a file that exists: docs move (dated
investigations go to docs/studies/), and a link left behind sends a reader nowhere."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target): markdown's inline links


def relative_links(page: Path) -> list[str]:
    targets = [m.group(1).split("#")[0] for m in LINK.finditer(page.read_text())]
    return [t for t in targets if t and not re.match(r"[a-z]+:", t)]  # skip http:, mailto:, ...


def pages() -> list[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    missing = [t for t in relative_links(page) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_the_link_pattern_finds_relative_links_and_skips_urls(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("see [a](a.md#x), [b](sub/b.png) and [web](https://example.org/c.md) ![i](i.png)")
    assert relative_links(page) == ["a.md", "sub/b.png", "i.png"]
