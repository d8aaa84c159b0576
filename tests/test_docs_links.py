"""Every relative link of the README and docs/ resolves: the file (or folder) it names exists,
and an `#anchor` names a heading of the target Markdown file, by GitHub's rule. Pure text: no
torch, no package import."""

import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)", re.DOTALL)
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (those inside become empty lines)."""
    out, fenced = [], None
    for line in text.splitlines():
        m = _FENCE.match(line)
        if fenced is None and m:
            fenced = m.group(1)
            out.append("")
        elif fenced is not None:
            if line.strip().startswith(fenced) and not line.strip().strip(fenced[0]):
                fenced = None
            out.append("")
        else:
            out.append(line)
    return out


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: the rendered text (code spans, emphasis and links reduced
    to their text), lowercased, punctuation other than '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of every heading of a Markdown file; a repeated one gets -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose_lines(path.read_text()):
        m = _HEADING.match(line)
        if not m:
            continue
        base = anchor(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every Markdown link and image of a file, code left out."""
    text = "\n".join(_prose_lines(path.read_text()))
    text = _CODE_SPAN.sub(lambda m: "code" + "\n" * m.group(0).count("\n"), text)
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _LINK.finditer(text)]


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """'file:line: target (why)' for each relative link of `path` that does not resolve."""
    out = []
    for line, target in links(path):
        if not target or _SCHEME.match(target):
            continue
        file_part, _, frag = target.partition("#")
        if file_part.startswith("/"):
            dest = root / unquote(file_part).lstrip("/")
        elif file_part:
            dest = path.parent / unquote(file_part)
        else:
            dest = path
        where = f"{path.relative_to(root)}:{line}: {target}"
        if not dest.exists():
            out.append(f"{where} (no such file)")
        elif frag and dest.suffix == ".md" and unquote(frag).lower() not in anchors(dest):
            out.append(f"{where} (no heading with anchor #{frag} in {dest.name})")
    return out


def _documents(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def test_links_of_readme_and_docs_resolve():
    broken = [b for path in _documents() for b in broken_links(path)]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_links_anchor_rule():
    assert anchor("Run it") == "run-it"
    assert anchor("CLI in brief") == "cli-in-brief"
    assert anchor("Packing (padding-free training forwards)") == (
        "packing-padding-free-training-forwards"
    )
    assert anchor("More than one GPU: torchrun with FSDP2") == (
        "more-than-one-gpu-torchrun-with-fsdp2"
    )
    assert anchor("The demo's `grpo_loss`, step 2") == "the-demos-grpo_loss-step-2"


def test_links_checker_finds_broken_links(tmp_path):
    """The check can fail: a missing file, a missing anchor, a link across lines; links in code
    and external ones are not checked."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Same\n\n## Same\n")
    (tmp_path / "README.md").write_text(
        "# Top\n\n"
        "[ok](docs/a.md) [ok](docs/a.md#a-page) [ok](docs/a.md#same-1) [ok](#top)\n"
        "[gone](docs/b.md) [bad anchor](docs/a.md#nowhere) [bad](#same)\n"
        "[across\nlines](docs/c.md) ![image](docs/img/x.png)\n"
        "`[in code](docs/d.md)` [web](https://example.com/x.md)\n"
        "```\n[in a fence](docs/e.md)\n# not a heading\n```\n"
    )
    broken = broken_links(tmp_path / "README.md", tmp_path)
    assert [b.split(": ")[1].split(" ")[0] for b in broken] == [
        "docs/b.md",
        "docs/a.md#nowhere",
        "#same",
        "docs/c.md",
        "docs/img/x.png",
    ]
    assert broken[3].startswith("README.md:5:")  # where the link starts
