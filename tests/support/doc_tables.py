"""Read the key tables of the docs, so tests can hold the docs to what the code writes and serves."""

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"


def documented_keys(page: str, heading: str) -> set[str]:
    """The names in the first column (in backticks) of the table under `heading` (a `##`/`###` title that starts
    with it) in docs/`page`. Fails when the heading or its table is missing."""
    text = (DOCS / page).read_text()
    match = re.search(rf"^#+ {re.escape(heading)}.*?$(.*?)(?=^#+ |\Z)", text, re.M | re.S)
    assert match, f"docs/{page} has no section {heading!r}"
    keys = set()
    for line in match.group(1).splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            first = line.split("|")[1]
            keys.update(re.findall(r"`([^`]+)`", first))
    assert keys, f"docs/{page} section {heading!r} has no table of keys"
    return keys
