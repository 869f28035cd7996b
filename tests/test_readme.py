"""README.md's quick start, read from the README itself and run as typed against a tiny model, so the
README cannot drift from the CLI: the user's flow (`flex convert llama-2-7b` ... `flex extract --budget
40ms`) from one directory, and every example of the command table parsed by the real CLI."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from conftest import flex_cmd, make_model

ROOT = Path(__file__).resolve().parents[1]
# speed only, appended after what the README typed: a tiny model on a loaded CI machine times in
# fractions of a millisecond, so the table is measured briefly and accepted however noisy, and the
# routers train for a few steps; every flag and default the README shows is used as written
FAST = {
    "convert": ["--calib-samples", "8", "--seq-len", "64"],
    "profile": ["--rounds", "2", "--repeats", "3", "--warmup-s", "0", "--correct", "0", "--accept-noisy"],
    "train-router": ["--steps", "20", "--dynamic-steps", "4", "--sm-warmup", "8"],
}


def _block(after: str) -> list[list[str]]:
    """The `flex` command lines of the first bash block after the text `after` (comments dropped)."""
    text = (ROOT / "README.md").read_text()
    start = text.index(after)
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S).group(1)
    lines = [shlex.split(line, comments=True) for line in block.splitlines()]
    return [x for x in lines if x and x[0] == "flex"]


def test_readme_flow_runs_as_typed(tmp_path, tokenizer_dir):
    # a local directory wins over the recipe name; wide enough that the layers, not per-call overhead,
    # dominate a CPU forward, so train-router's default budgets (down to 40%) are reachable
    make_model(tmp_path / "llama-2-7b", tokenizer_dir, heads=8, kv=8, hidden=512, layers=4, inter=2048)
    cmds = _block("The user's flow, as typed")
    assert [c[1] for c in cmds] == ["convert", "profile", "train-router", "extract"]
    for c in cmds:
        r = subprocess.run(
            flex_cmd() + c[1:] + FAST.get(c[1], []), cwd=tmp_path, capture_output=True, text=True, timeout=600
        )
        assert r.returncode == 0, f"{shlex.join(c)}: {r.stderr[-2000:]}"
    assert (tmp_path / "llama-2-7b-elastic" / "flex_elastic.json").is_file()
    assert (tmp_path / "llama-2-7b-40ms").is_dir()  # the README's "-> ./llama-2-7b-40ms"


def test_readme_command_table_examples_parse():
    """Each example in the command table names a real command and only options it has."""
    from typer.main import get_command

    from flexcli.cli import app

    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Commands") : text.index("## Install")]
    examples = re.findall(r"\| `(flex [^`]+)` \|$", table, re.M)
    assert len(examples) == 8
    cli = get_command(app)
    for ex in examples:
        args = shlex.split(ex)[1:]
        cmd = cli.commands[args[0]]
        known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        for a in args[1:]:
            if a.startswith("--"):
                assert a in known, f"{ex}: {a} is not an option of flex {args[0]}"
