"""The README's library example runs as written and prints what it says."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_library_example_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    block = re.search(r"## The library\n\n```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    first = capsys.readouterr().out.splitlines()[0]
    assert float(first) >= 0.9  # the recovered fraction the comment promises
    assert (tmp_path / "my_dictionary" / "dictionary.json").is_file()


# ------------------------------------------------------------------------------------------------ commands
def readme_commands() -> list[list[str]]:
    """Every ``python -m pipeline`` / ``python -m stages.<stage>`` command in the README's shell blocks, as argv
    after the module (comments dropped)."""
    import shlex

    out = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.splitlines():
            line = line.split("#")[0]
            m = re.search(r"python -m (pipeline|stages\.\w+)(.*)$", line)
            if m:
                out.append([m.group(1), *shlex.split(m.group(2))])
    return out


def test_the_readme_has_the_commands_this_file_checks():
    commands = readme_commands()
    assert ["pipeline"] in commands  # the default run of the two-command set-up
    assert any("-m" in c for c in commands) and any(c[0].startswith("stages.") for c in commands)


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda a: " ".join(a))
def test_every_readme_command_composes_and_validates(argv):
    """Each command's overrides compose under the schema and pass the config check (a sweep: each value of each
    swept key); Hydra's multirun flag stands before the overrides, where Hydra accepts it. GPU presets are
    checked with their devices pointed at the CPU (this machine has none); the smoke sweep and a stage run
    alone are run for real in tests/stages/test_orchestrator.py."""
    from pipeline.runs.config import check_config
    from tests.conftest import compose_config
    from tests.test_config import GPU_PRESETS, ON_CPU

    args = argv[1:]
    if "-m" in args:
        assert args.index("-m") == 0, f"`-m` must come before the overrides: python -m {' '.join(argv)}"
    overrides = [a for a in args if a not in ("-m", "--cfg", "job")]

    def is_sweep(o: str) -> bool:  # key=a,b (Hydra's sweep), not key=[a,b] (a list value)
        return "," in o and not o.split("=", 1)[-1].startswith("[")

    fixed = [o for o in overrides if not is_sweep(o)]
    swept = [o.split("=", 1) for o in overrides if is_sweep(o)]
    gpu = any(o in (f"experiment={p}" for p in GPU_PRESETS) for o in fixed)
    variants = [fixed] + [fixed + [f"{key}={value}"] for key, values in swept for value in values.split(",")]
    for variant in variants:
        check_config(compose_config(*variant, *(ON_CPU if gpu else [])))


@pytest.mark.slow
def test_print_the_config_command_runs(tmp_path):
    """``python -m pipeline experiment=gemma2b_paper --cfg job`` prints the composed config and runs nothing."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "pipeline", "experiment=gemma2b_paper", f"output_root={tmp_path}", "--cfg", "job"]
    done = subprocess.run(cmd, cwd=README.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "name: gemma-2-2b" in done.stdout and "k: 40" in done.stdout
    assert not any(tmp_path.iterdir())


def test_every_override_quoted_in_the_prose_composes():
    """Overrides quoted inline (`dictionary.coder.precision=bf16 ...`) name real keys with valid values."""
    from pipeline.runs.config import check_config
    from tests.conftest import compose_config

    node = r"(?:model|data|harvest|dictionary|baseline|eval|report)\.[\w.]+"
    quoted = [
        tok
        for span in re.findall(r"`([^`\n]+)`", README.read_text())
        for tok in span.split()
        if re.fullmatch(rf"{node}=[^,\s]+", tok)
    ]
    assert "dictionary.coder.precision=bf16" in quoted
    for override in quoted:
        check_config(compose_config(override))
