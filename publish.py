"""Names the GitHub repository a copy of this project is published as, everywhere at once: the
README's Colab badge, each notebook's badge, and each notebook's set-up, which fetches the code
files from that repository when Colab opens a notebook alone.

    python publish.py OWNER/NAME      # then commit and push: the badges open your notebooks

Until it runs, the name is a placeholder that no GitHub account can hold ("_" is in no
account's name), so the badges open nothing and the set-up fetches nothing: it asks for the
files instead.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

__version__ = "6.0"  # as helpers.__version__: every file of the project comes from one commit

ROOT = Path(__file__).resolve().parent
PLACEHOLDER = "your_account/mnist-digit-sum"
NOTEBOOKS = ("Assignment3.ipynb", "DeepDives.ipynb")
# GitHub's rules: an account is letters, digits and single hyphens inside (39 at most); a
# repository, letters, digits, ".", "_" and "-" (100 at most).
_NAME = re.compile(r"(?=.{1,39}/)[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*/[A-Za-z0-9._-]{1,100}")
_REPO_LINE = re.compile(r'^REPO, RELEASE = "([^"]*)"', re.MULTILINE)


def named_repository(root: Path = ROOT) -> str:
    """The repository that the first notebook's set-up (its first code cell) names now."""
    cells = json.loads((root / NOTEBOOKS[0]).read_text())["cells"]
    setup = next("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")
    return _REPO_LINE.search(setup)[1]


def publish(repository: str, root: Path = ROOT) -> list[Path]:
    """Writes `repository` ("OWNER/NAME") in place of the name the files give now, in the
    README and in the notebooks' badges and set-ups; returns the files changed. A name that
    cannot be a GitHub repository raises ValueError, before anything is written."""
    if not _NAME.fullmatch(repository):
        raise ValueError(f"{repository!r} is not a GitHub repository's name: give OWNER/NAME, for "
                         f"example ada/mnist-digit-sum")
    current = named_repository(root)
    changed = []
    for name in ("README.md", *NOTEBOOKS):
        path = root / name
        text = path.read_text()
        badge = f"colab.research.google.com/github/{current}/"
        updated = text.replace(badge, f"colab.research.google.com/github/{repository}/")
        if name.endswith(".ipynb"):  # the set-up's REPO, quoted as the notebook's JSON holds it
            updated = updated.replace(f'\\"{current}\\"', f'\\"{repository}\\"')
        if updated != text:
            path.write_text(updated)
            changed.append(path)
    return changed


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python publish.py OWNER/NAME", file=sys.stderr)
        return 2
    try:
        changed = publish(args[0])
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"the badges and set-ups now name {args[0]}: " + (", ".join(path.name for path in changed) or "no change"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
