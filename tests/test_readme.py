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
