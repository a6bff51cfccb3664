import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(data_root, monkeypatch):
    monkeypatch.setenv("NORMLAB_DATA", str(data_root))
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no Python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


def test_readme_quick_start_is_two_make_commands():
    quick_start = README.read_text().split("## Quick start", 1)[1].split("##", 1)[0]
    commands = re.findall(r"```\n(.*?)```", quick_start, flags=re.S)[0].strip().splitlines()
    assert [c.split("#")[0].strip() for c in commands] == ["make demo", "make test"]


def _short_citation(paper: str) -> str:
    """How the Methods table cites a registered paper, "Authors (year), title": the authors
    and the year, "First et al." for three authors or more, and for an anonymous paper the
    name its title gives the method."""
    if paper == "-":
        return paper
    authors, rest = paper.split(" (", 1)
    year, title = rest.split("), ", 1)
    if authors == "Anonymous":
        return f"Anonymous ({year}), {title.split(':')[0]}"
    if ", " in authors:
        authors = authors.split(", ")[0] + " et al."
    return f"{authors} ({year})"


def test_readme_methods_table_follows_the_registry():
    from normlab import registry

    section = README.read_text().split("## Methods", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip("|").split(" | ")]
            for line in section.splitlines() if line.startswith("| `")]
    table = [(name.strip("`"), family, paper) for name, family, paper, *_ in rows]
    records = [(m.name, m.family, _short_citation(m.paper))
               for m in map(registry.get, registry.available())]
    # sorted: a test that takes a method out and puts it back moves it to the registry's end
    assert sorted(table) == sorted(records)
