"""The README and the documentation pages point at files that exist, and the README stays short
and free of dated runs (those live in bench/results/). Reads files only: no Django, no server.

Sphinx checks ``:doc:`` and ``:ref:`` targets itself (``make docs`` fails on a warning); this
checks what it does not: the README's Markdown links and images, and the file paths of the
pages' ``image``, ``figure``, ``literalinclude`` and ``include`` directives.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 150

#: ``[text](target)`` and ``![alt](target)``; the target ends at the first space or ``)``.
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
#: ``.. image:: path`` and its kin, whose argument is a file.
RST_FILE_DIRECTIVE = re.compile(r"^[ \t]*\.\.[ \t]+(image|figure|literalinclude|include)::[ \t]+(\S+)", re.M)
#: A date (2026-12-05) or a time of day (15:58) as a benchmark run is stamped, or a commit.
DATED_RUN = re.compile(
    r"\b20\d\d-\d\d-\d\d\b"
    r"|(?<![\d.:/])\d{1,2}:\d\d(?![\d:])"
    r"|\bcommit [0-9a-f]{7,40}\b"
)


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I)) or target.startswith("#")


def broken_markdown_links(path: Path) -> list[str]:
    """Relative link and image targets in a Markdown file that name no existing file or folder."""
    broken = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for target in MARKDOWN_LINK.findall(line):
            if is_external(target):
                continue
            relative = target.split("#", 1)[0]
            if relative and not (path.parent / relative).exists():
                broken.append(f"{path.name}:{number}: {target}")
    return broken


def broken_rst_files(path: Path, srcdir: Path) -> list[str]:
    """File arguments of image/figure/literalinclude/include directives that do not exist. A path
    starting with ``/`` is relative to the Sphinx source folder, as Sphinx reads it."""
    broken = []
    text = path.read_text(encoding="utf-8")
    for match in RST_FILE_DIRECTIVE.finditer(text):
        target = match.group(2)
        if is_external(target):
            continue
        base = srcdir if target.startswith("/") else path.parent
        if not (base / target.lstrip("/")).exists():
            number = text.count("\n", 0, match.start()) + 1
            broken.append(f"{path.name}:{number}: {match.group(1)}:: {target}")
    return broken


def dated_runs(text: str) -> list[str]:
    return [
        f"line {number}: {line.strip()}" for number, line in enumerate(text.splitlines(), 1) if DATED_RUN.search(line)
    ]


def test_readme_links_point_at_files():
    assert broken_markdown_links(README) == []


def test_readme_links_into_the_docs():
    links = MARKDOWN_LINK.findall(README.read_text(encoding="utf-8"))
    assert "docs/getting-started.rst" in links
    assert "docs/configuration.rst" in links


def test_doc_pages_include_files_that_exist():
    pages = sorted(DOCS.glob("*.rst"))
    assert pages, "no pages in docs/"
    broken = [problem for page in pages for problem in broken_rst_files(page, DOCS)]
    assert broken == []


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; the manual is docs/"


def test_readme_has_no_dated_runs():
    assert dated_runs(README.read_text(encoding="utf-8")) == [], "dated runs belong in bench/results/"


def code_lines(text: str) -> list[str]:
    """The lines of Python code in ``text``, comments and blank lines left out (no ``#`` in strings)."""
    return [line.split("#", 1)[0].rstrip() for line in text.splitlines() if line.split("#", 1)[0].strip()]


def test_readme_settings_match_the_tested_snippet():
    """The README's settings are docs/examples/settings_snippet.py, which the smoke test appends
    to a new project's settings.py: the same code, the comments aside."""
    snippet = (DOCS / "examples" / "settings_snippet.py").read_text(encoding="utf-8")
    snippet = snippet.split("# --- django-pooled-pg: add to the end of settings.py ---", 1)[1]
    readme = code_lines(README.read_text(encoding="utf-8"))
    missing = [line for line in code_lines(snippet) if line not in readme]
    assert missing == [], "README.md's settings differ from docs/examples/settings_snippet.py"


def test_settings_examples_are_python():
    for example in sorted((DOCS / "examples").glob("*.py")):
        compile(example.read_text(encoding="utf-8"), str(example), "exec")


# ----- The checks find what they are for -------------------------------------------------------


def test_checks_catch_a_broken_link_and_a_dated_run(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "real.rst").write_text("Real\n====\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "[fine](docs/real.rst) [gone](docs/missing.rst) ![pic](docs/nothing.png)\n"
        "[web](https://example.org/x) [here](#use-it) [anchored](docs/real.rst#real)\n"
    )
    assert broken_markdown_links(readme) == ["README.md:1: docs/missing.rst", "README.md:1: docs/nothing.png"]
    page = tmp_path / "docs" / "page.rst"
    page.write_text(".. image:: real.rst\n\n.. literalinclude:: examples/missing.py\n   :language: python\n")
    assert broken_rst_files(page, tmp_path / "docs") == ["page.rst:3: literalinclude:: examples/missing.py"]
    assert dated_runs("Last run (2026-12-05, commit 3f5c749)\nat 15:58 UTC\nhttp://127.0.0.1:8000/\n") == [
        "line 1: Last run (2026-12-05, commit 3f5c749)",
        "line 2: at 15:58 UTC",
    ]
