"""Point every Colab badge, install cell and image link at the repository named in pyproject.toml.

How to run: ``python scripts/set_repository.py`` rewrites the links in ``notebooks/*.ipynb`` and
``README.md``; ``python scripts/set_repository.py OWNER/NAME`` first sets the repository in
pyproject.toml; ``--check`` changes nothing, lists every link that disagrees and exits with 1 if any does.

The repository is written by hand in one place only: ``[project.urls] Repository`` in pyproject.toml
(``https://github.com/OWNER/NAME``). That is where a package's home belongs (PyPI shows it, and it reaches the
installed package's metadata), and a fork or a release changes pyproject.toml anyway. The notebooks cannot
read it (in Colab the install cell runs before promptlab exists), so this script copies it into them:

* the Colab badge ``https://colab.research.google.com/github/OWNER/NAME/blob/main/notebooks/FILE.ipynb``
  (in a notebook, FILE is the notebook itself);
* the install cell's ``git+https://github.com/OWNER/NAME``;
* image links ``https://raw.githubusercontent.com/OWNER/NAME/main/images/...`` (what Colab shows, having no
  ``images/`` folder).

Links follow the ``main`` branch (``BRANCH``). Files are rewritten as text, so a notebook's JSON formatting
and cell ids stay exactly as they were.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
BRANCH = "main"
_CHAR = r"[A-Za-z0-9_.-]"  # what GitHub allows in an owner's or a repository's name
_NAME = _CHAR + "+"
REPOSITORY_URL = re.compile(rf"https://github\.com/(?P<repo>{_NAME}/{_NAME})")
# One pattern per kind of link; each names the repository (and branch) it points at.
LINKS = {
    "badge": re.compile(rf"https://colab\.research\.google\.com/github/(?P<repo>{_NAME}/{_NAME})"
                        rf"/blob/(?P<branch>{_NAME})/(?P<path>[A-Za-z0-9_./-]+\.ipynb)"),
    # the name ends where a name character does not follow (an optional ".git" is dropped, "@ref" kept)
    "install": re.compile(rf"git\+https://github\.com/(?P<repo>{_NAME}/{_CHAR}+?)(?:\.git)?(?!{_CHAR})"),
    "image": re.compile(rf"https://raw\.githubusercontent\.com/(?P<repo>{_NAME}/{_NAME})/(?P<branch>{_NAME})/images/"),
}


@dataclass(frozen=True)
class Link:
    """One link found in a file."""

    path: Path
    """The file that holds it."""
    kind: str
    """``badge``, ``install`` or ``image`` (the keys of LINKS)."""
    found: str
    """The link as written."""
    expected: str
    """The link as the repository constant wants it."""


def _read(path: Path) -> str:
    """The file's text with its line ends as they are (read_text would turn CRLF into LF)."""
    return path.read_bytes().decode("utf-8")


def repository(root: Path = ROOT) -> str:
    """``OWNER/NAME`` from pyproject.toml's ``[project.urls] Repository``; ValueError if absent or not GitHub."""
    pyproject = root / "pyproject.toml"
    url = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {}).get("urls", {}).get("Repository")
    match = REPOSITORY_URL.fullmatch(url or "")
    if match is None:
        raise ValueError(f"{pyproject}: [project.urls] Repository is {url!r}, not https://github.com/OWNER/NAME")
    return match["repo"]


def files(root: Path = ROOT) -> list[Path]:
    """The files whose links follow the repository: the notebooks and the README."""
    return sorted((root / "notebooks").glob("*.ipynb")) + [root / "README.md"]


def expected_link(kind: str, match: re.Match, repo: str, path: Path) -> str:
    """What a found link must read: the same link on ``repo`` and BRANCH (a notebook's badge: itself)."""
    if kind == "install":
        return f"git+https://github.com/{repo}"
    if kind == "image":
        return f"https://raw.githubusercontent.com/{repo}/{BRANCH}/images/"
    target = f"notebooks/{path.name}" if path.suffix == ".ipynb" else match["path"]
    return f"https://colab.research.google.com/github/{repo}/blob/{BRANCH}/{target}"


def links(path: Path, repo: str) -> list[Link]:
    """Every badge, install and image link in the file, with what each should read."""
    text = _read(path)
    return [Link(path, kind, m[0], expected_link(kind, m, repo, path))
            for kind, pattern in LINKS.items() for m in pattern.finditer(text)]


def rewrite(path: Path, repo: str) -> bool:
    """Rewrite the file's links to ``repo``; True if it changed."""
    text = _read(path)
    new = text
    for kind, pattern in LINKS.items():
        new = pattern.sub(lambda m, kind=kind: expected_link(kind, m, repo, path), new)
    if new != text:
        path.write_text(new, encoding="utf-8", newline="")  # newline="": keep the file's line ends
    return new != text


def set_repository(root: Path, repo: str) -> None:
    """Write ``https://github.com/<repo>`` as pyproject.toml's ``[project.urls] Repository``."""
    if not re.fullmatch(rf"{_NAME}/{_NAME}", repo):
        raise ValueError(f"repository {repo!r} is not OWNER/NAME")
    pyproject = root / "pyproject.toml"
    text = _read(pyproject)
    line = re.compile(r'^(Repository\s*=\s*)"[^"]*"', re.MULTILINE)
    if len(line.findall(text)) != 1:
        raise ValueError(f"{pyproject}: expected one 'Repository = \"...\"' line under [project.urls]")
    pyproject.write_text(line.sub(rf'\g<1>"https://github.com/{repo}"', text), encoding="utf-8", newline="")


def check(root: Path = ROOT) -> list[Link]:
    """The links that disagree with the repository constant (empty when all agree)."""
    repo = repository(root)
    return [link for path in files(root) for link in links(path, repo) if link.found != link.expected]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repository", nargs="?", help="OWNER/NAME to write into pyproject.toml first")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if any link disagrees")
    parser.add_argument("--root", type=Path, default=ROOT, help="the project folder (default: this checkout)")
    args = parser.parse_args(argv)
    if args.check:
        if args.repository:
            parser.error("--check takes no repository: it checks against pyproject.toml's")
        wrong = check(args.root)
        for link in wrong:
            print(f"{link.path.relative_to(args.root)}: {link.kind} {link.found} should be {link.expected}")
        print(f"{len(wrong)} link(s) disagree with {repository(args.root)}" if wrong
              else f"every link points at {repository(args.root)}")
        return 1 if wrong else 0
    if args.repository:
        set_repository(args.root, args.repository)
    repo = repository(args.root)
    changed = [path for path in files(args.root) if rewrite(path, repo)]
    for path in changed:
        print(f"rewrote {path.relative_to(args.root)}")
    print(f"every link points at {repo} ({len(changed)} file(s) changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
