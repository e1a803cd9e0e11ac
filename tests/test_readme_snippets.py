"""README.md as a user reads it: every ```python block runs, in README order, in a fresh working dir
laid out like a user's after the commands the README shows before it; every ``saetune VERB --flag``
the README names (bash blocks and inline code) is a real verb and flag of the CLI parser.

The snippets are parsed out of README.md, never copied here. A snippet gets a prelude (``PRELUDES``)
only for what the README rightly leaves out; a snippet without one runs exactly as written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import re
import shlex
import shutil
from pathlib import Path
from typing import Callable

import pytest

from explorer_fixtures import pipeline_dir

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- parsing ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Block:
    line: int  # README line of the block's first code line
    lang: str
    code: str


def fenced_blocks(text: str) -> list[Block]:
    """The ``` fenced blocks of a Markdown text, with their info string's first word."""
    blocks, lang, start, body = [], None, 0, []
    for i, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"\s*```(\S*)", line)
        if lang is None and fence:
            lang, start, body = fence.group(1), i + 1, []
        elif lang is not None and re.match(r"\s*```\s*$", line):
            blocks.append(Block(start, lang, "\n".join(body) + "\n"))
            lang = None
        elif lang is not None:
            body.append(line)
    if lang is not None:
        raise AssertionError(f"README.md: the ``` block opened at line {start - 1} is never closed")
    return blocks


def python_snippets(text: str) -> list[Block]:
    return [b for b in fenced_blocks(text) if b.lang == "python"]


def run_snippet(block: Block, namespace: dict) -> None:
    """Execute a snippet so that a traceback names README.md and the README's own line numbers."""
    code = "\n" * (block.line - 1) + block.code
    exec(compile(code, str(README.name), "exec"), namespace)


# ---- preludes -----------------------------------------------------------------------------------

def smaller(module: str, fn: str, **fields) -> Callable:
    """A prelude: ``module.fn(cfg, …)`` runs with ``fields`` of ``cfg`` replaced — the README's call and
    config on less work, since the full run takes minutes (it is timed in the README and BENCHMARKS.md)."""

    def prelude(monkeypatch) -> dict:
        mod = importlib.import_module(module)
        real = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda cfg, *a, **kw: real(dataclasses.replace(cfg, **fields), *a, **kw))
        return {}

    return prelude


# A stable marker (text that occurs in exactly one snippet) → prelude(monkeypatch) -> names the snippet
# relies on but does not define. Everything else a snippet needs is the working dir (``workdir``).
PRELUDES: dict[str, Callable] = {
    # 256 problems of greedy decoding: two minutes on 2 busy cores.
    'run(EvalConfig(model="toy"': smaller("saetune.evaluate", "run", toy_problems=8, progress=False),
    # toy_rl is 25 steps of 8 prompts × 16 CURE samples plus 2 × 256 greedy evaluations: ~80 CPU-seconds.
    'train(load_config(RLConfig, "toy_rl")': smaller("saetune.rl", "train", steps=1, prompts_per_step=1,
                                                     eval_problems=8, progress=False),
}


def prelude_for(block: Block) -> Callable | None:
    found = [m for m in PRELUDES if m in block.code]
    assert len(found) <= 1, f"README.md:{block.line}: the snippet matches several preludes: {found}"
    return PRELUDES[found[0]] if found else None


SNIPPETS = python_snippets(README.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, toy_store) -> Path:
    """What the README's commands before the snippets would have left: ``runs/acts`` (``saetune cache
    --model toy --hooks model.layers.2``) and ``runs/demo-…`` (a ``saetune demo`` pipeline dir), copied
    from the suite's fixtures so nothing here writes into them."""
    d = tmp_path_factory.mktemp("readme")
    shutil.copytree(toy_store, d / "runs" / "acts")
    shutil.copytree(pipeline_dir(tmp_path_factory), d / "runs" / "demo-…", symlinks=True)
    return d


@pytest.mark.parametrize("block", SNIPPETS, ids=[f"README.md:{b.line}" for b in SNIPPETS])
def test_readme_python_snippet_runs(block, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    prelude = prelude_for(block)
    namespace = {"__name__": "__readme__", **(prelude(monkeypatch) if prelude else {})}
    try:
        run_snippet(block, namespace)
    except Exception as e:
        hint = "" if prelude else (" If it relies on names a user would have, make it self-contained or add a "
                                   "prelude to PRELUDES in this file.")
        raise AssertionError(f"the README's python snippet at line {block.line} fails: "
                             f"{type(e).__name__}: {e}.{hint}") from e


def test_readme_has_snippets_and_every_prelude_matches_one():
    assert len(SNIPPETS) >= 5, f"found only {len(SNIPPETS)} python blocks in README.md: is the parser broken?"
    for marker in PRELUDES:
        hits = [b.line for b in SNIPPETS if marker in b.code]
        assert len(hits) == 1, f"prelude marker {marker!r} matches the snippets at lines {hits}, not exactly one"


# ---- the CLI the README shows -------------------------------------------------------------------

def readme_commands(text: str) -> list[tuple[int, list[str]]]:
    """``(line, argv)`` of every ``saetune …`` / ``-m saetune.cli …`` command in the bash blocks,
    continuation lines joined and comments dropped."""
    out = []
    for b in fenced_blocks(text):
        if b.lang not in ("bash", "sh", "shell", "console"):
            continue
        pending, first = "", b.line
        for i, line in enumerate(b.code.splitlines(), b.line):
            if not pending:
                first = i
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            tokens, pending = shlex.split(pending + line, comments=True), ""
            if tokens[:1] == ["saetune"]:
                out.append((first, tokens[1:]))
            for j in range(len(tokens) - 1):
                if tokens[j] == "-m" and tokens[j + 1] == "saetune.cli":
                    out.append((first, tokens[j + 2:]))
    return out


def verb_parser(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The (sub)parser that handles ``argv``'s verb (``toy build`` included), and the verb's words."""
    words = []
    while argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or argv[0] not in subs[0].choices:
            break
        words.append(argv[0])
        parser, argv = subs[0].choices[argv[0]], argv[1:]
    return parser, words


def unknown_flags(parser: argparse.ArgumentParser, flags) -> list[str]:
    """Flags the parser does not define by exactly that name (argparse would accept a prefix)."""
    return [f for f in flags if f.split("=")[0] not in parser._option_string_actions]


@pytest.fixture(scope="module")
def cli_parser() -> argparse.ArgumentParser:
    from saetune.cli import build_parser

    return build_parser()


def test_readme_bash_commands_parse(cli_parser):
    commands = readme_commands(README.read_text(encoding="utf-8"))
    assert len(commands) >= 10, f"found only {len(commands)} saetune commands in README.md's bash blocks"
    bad = []
    for line, argv in commands:
        sub, words = verb_parser(cli_parser, argv)
        if not words:
            bad.append(f"line {line}: `saetune {' '.join(argv)}` names no saetune verb")
            continue
        options = argv[:argv.index("--")] if "--" in argv else argv
        if words[0] != "verl-train":  # its Hydra overrides are verl's, not saetune's flags
            bad += [f"line {line}: `saetune {' '.join(words)}` has no flag {f}"
                    for f in unknown_flags(sub, [a for a in options if a.startswith("--")])]
        err = io.StringIO()
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                cli_parser.parse_args(argv)
        except SystemExit as e:
            if e.code != 0 or "--help" not in argv:
                why = (err.getvalue().strip().splitlines() or ["(no message)"])[-1]
                bad.append(f"line {line}: `saetune {' '.join(argv)}` does not parse: {why}")
    assert not bad, "README.md shows commands the CLI rejects:\n" + "\n".join(bad)


def prose_spans(text: str) -> list[list[str]]:
    """Inline code spans outside fenced blocks, grouped by paragraph."""
    prose, fenced = [], False
    for line in text.splitlines():
        if re.match(r"\s*```", line):
            fenced = not fenced
            line = ""
        prose.append("" if fenced else line)
    return [re.findall(r"`([^`\n]+)`", p) for p in "\n".join(prose).split("\n\n")]


def test_readme_inline_commands_and_flags_exist(cli_parser):
    """`saetune VERB --flag …` spans name a real verb and flags; a bare `--flag` span belongs to the
    last `saetune VERB` span of its paragraph, or else must be a flag of some verb."""
    verbs = [a for a in cli_parser._actions if isinstance(a, argparse._SubParsersAction)][0].choices
    every_flag = {f for p in verbs.values() for f in p._option_string_actions}
    bad, checked = [], 0
    for spans in prose_spans(README.read_text(encoding="utf-8")):
        current = None
        for span in spans:
            words = span.split()
            if words[0] == "saetune" and len(words) > 1:
                current, verb = verb_parser(cli_parser, words[1:])
                if not verb:
                    bad.append(f"`{span}` names no saetune verb")
                    current = None
                    continue
                flags = [w for w in words if w.startswith("--")]
            elif words[0].startswith("--"):
                flags = [words[0]]
            else:
                continue
            checked += len(flags)
            missing = unknown_flags(current, flags) if current else [f for f in flags if f not in every_flag]
            bad += [f"`{span}`: no flag {f}" for f in missing]
    assert checked >= 10, f"checked only {checked} inline flags: is the span parser broken?"
    assert not bad, "README.md's prose names CLI flags that do not exist:\n" + "\n".join(bad)
