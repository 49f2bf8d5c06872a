"""The code in README.md and docs/*.md runs as written.

Every ```python block is executed: the blocks of one file run in order in one namespace, as a
reader pastes them into one session, in a temporary working folder. A block that is not meant
to run (generated code shown as an excerpt, a signature) is fenced as ```text instead.

Every shell block (```bash) carries a marker on the line before it saying what happens to it:

- ``<!-- docs-test: run -->``: this test runs its commands (with the venv's ``lrpfx`` and ``python``);
- ``<!-- docs-test: tested-by tests/<file>.py::<test> -->``: that test runs the same command;
- ``<!-- docs-test: illustrative: <why> -->``: not run (an install, a 20-minute benchmark), with the reason.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)\s*$")
MARKER = re.compile(r"^<!-- docs-test: (run|tested-by (\S+)|illustrative: (.+\S)) -->$")
SHELL = ("bash", "sh", "shell", "console")


@dataclass(frozen=True)
class Block:
    file: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str | None  # the docs-test marker on the line before the fence, if any

    def where(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}"


def blocks(file: Path) -> list[Block]:
    lines = file.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        if j == len(lines):
            raise AssertionError(f"{file.relative_to(ROOT)}:{start + 1}: the code block is never closed")
        previous = lines[start - 1].strip() if start else ""
        found.append(Block(file, start + 1, lang, "\n".join(lines[start + 1:j]) + "\n",
                           previous if previous.startswith("<!-- docs-test") else None))
        i = j + 1
    return found


ALL = [b for f in DOCS for b in blocks(f)]
PYTHON_FILES = sorted({b.file for b in ALL if b.lang == "python"})


def test_every_block_is_python_text_or_a_marked_shell_block() -> None:
    problems = []
    for b in ALL:
        if b.lang in SHELL:
            m = MARKER.match(b.marker or "")
            if m is None:
                problems.append(f"{b.where()}: a shell block without a docs-test marker")
            elif m.group(2):
                test_file, _, test_name = m.group(2).partition("::")
                path = ROOT / test_file
                if not path.is_file() or not re.search(rf"^def {re.escape(test_name)}\(", path.read_text(), re.M):
                    problems.append(f"{b.where()}: tested-by {m.group(2)}: no such test")
        elif b.lang not in ("python", "text", "toml", "json", ""):
            problems.append(f"{b.where()}: unknown block language {b.lang!r} (use python, bash, text, toml)")
        elif b.lang == "":
            problems.append(f"{b.where()}: a block without a language (use text for output or pseudo-code)")
        if b.lang == "python":
            try:
                compile(b.code, b.where(), "exec")
            except SyntaxError as e:
                problems.append(f"{b.where()}: not valid Python ({e.msg}, line {e.lineno}); fence it as text")
    assert not problems, "\n".join(problems)


@pytest.mark.slow  # ResNet-50s at 224 x 224, exports
@pytest.mark.parametrize("file", PYTHON_FILES, ids=lambda f: str(f.relative_to(ROOT)))
def test_python_blocks_run_as_written(file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import types
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType(f"docs_{file.stem.replace('-', '_')}")  # a real module, as a script's __main__ is
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    for b in (b for b in ALL if b.file == file and b.lang == "python"):
        try:
            exec(compile(b.code, b.where(), "exec"), namespace)  # noqa: S102 - the docs' own code
        except Exception as e:
            raise AssertionError(f"{b.where()}: the block fails as written: {type(e).__name__}: {e}") from e


RUN = [b for b in ALL if b.lang in SHELL and b.marker == "<!-- docs-test: run -->"]


@pytest.mark.slow
@pytest.mark.parametrize("block", RUN, ids=lambda b: b.where())
def test_shell_blocks_marked_run_succeed(block: Block, tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    for line in block.code.splitlines():
        line = line.split("  #")[0].strip()
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line)
        words = [w for w in words if not re.fullmatch(r"[A-Z_]+=\S*", w)]  # OMP_NUM_THREADS=1 and the like
        if words[0] in ("python", "python3", ".venv/bin/python"):
            words[0] = sys.executable
        elif words[0].startswith(".venv/bin/"):
            words[0] = str(bin_dir / words[0].rpartition("/")[2])
        proc = subprocess.run(words, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{block.where()}: `{line}` failed:\n{proc.stderr[-2000:]}"
