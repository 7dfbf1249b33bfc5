"""The README's library example runs as written and prints what it says."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_library_example_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    block = re.search(r"## The library\n\n```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    first = capsys.readouterr().out.splitlines()[0]
    assert float(first) >= 0.9  # the recovered fraction the comment promises
    assert (tmp_path / "my_dictionary" / "dictionary.json").is_file()
