"""Recipe comments carry no measured results (issue 18 item 6): numbers measured by our runs
drift from the docs, and the generated results page (docs/results.md) is the one place for
them. Comments may explain choices, sources and budgets ("12 epochs: the budget at which it
cleared the random init, see docs/results.md"), not quote scores."""
import re
from pathlib import Path

import pytest

from densessl.config import RECIPES_DIR

# a metric name, then within a few characters (no digit, same line) a score, a decimal or a
# percentage: "kNN 49.6", "mAP (docs/results.md: 29.7", "linear 56.5 / 53.1". Integers are
# epochs, seeds and sizes ("train.epochs=4", "seeds 0 and 1"), not scores.
MEASURED = re.compile(r"\b(kNN|linear|mAP|mIoU|AP(50|75)?|top-1|acc(uracy)?)\b[^\d\n]{0,30}?(\d+\.\d+|\d+ ?%)",
                      re.IGNORECASE)
RECIPES = sorted(RECIPES_DIR.rglob("*.yaml"))


def comments(path: Path) -> list[tuple[int, str]]:
    """(line number, comment text) of every `#` comment in a recipe."""
    return [(n, line.split("#", 1)[1]) for n, line in enumerate(path.read_text().splitlines(), 1) if "#" in line]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(RECIPES_DIR)))
def test_recipe_comments_quote_no_measured_result(path):
    found = [f"{path.name}:{n}: {text.strip()}" for n, text in comments(path) if MEASURED.search(text)]
    assert not found, "measured results in recipe comments (they belong in docs/results.md):\n" + "\n".join(found)


@pytest.mark.parametrize("text,measured", [
    ("Measured (docs/results.md): kNN 49.6, linear 59.2", True),
    ("weight seeds on kNN, linear and mAP (docs/results.md: 29.7 / 38.3", True),
    ("linear 56.5 / 53.1, mAP 36.5 / 36.3 (seeds 0 / 1)", True),
    ("README: top-1 74.6", True),
    ("12 epochs: the budget at which it cleared the random init on kNN, linear and mAP", False),
    ("lr 0.6 -> 0.0006 (cosine, no warm-up), wd 1e-6", False),
    ("the kNN monitor in metrics.jsonl", False),
    ("mAP in seeds 0 and 1; the budget measured to clear it on kNN too (train.epochs=4)", False),
    ("linear 62%", True),
])
def test_the_pattern_tells_scores_from_explanations(text, measured):
    assert bool(MEASURED.search(text)) == measured
