"""Every command quoted in README.md, docs/*.md, ARCHITECTURE.md and tests/README.md exists, flags included.

A command is a line of a shell code block, or an inline code span, that starts with ``python``/``python3``/
``.venv/bin/python``, ``bash``/``sh``, ``make``, ``torchrun``, ``sbatch``, ``pytest`` or a ``*.py`` script with
arguments (after ``cd DIR &&`` and ``NAME=value`` prefixes). Each is resolved to its entry point and checked:

- Python scripts and ``-m`` modules: the entry point runs with the quoted arguments up to its argparse parse and
  stops there (argparse is intercepted): the parser it would use is checked against the words it would parse.
  Trailing ``KEY VALUE`` overrides (after ``--``, ``train.py``'s remainder, ``--member DIR KEY VALUE``) must be
  config keys (defaults + every trainer's ``extend_cfg``, the config-key tests' helper).
- Shell scripts: their ``# usage:`` line (positional arguments) and the Python entry point they pass ``"$@"`` to.
- ``make``: the target exists in the Makefile. ``sbatch``: its options (Slurm's man page) and the batch script.
  ``torchrun``: torch's own parser, then the training script. ``pytest``: ``pytest --help`` and the test paths.

Placeholders (``...``, ``<...>``, ``$VAR``, ``KEY``/``VALUE``, ``[optional]`` groups) are allowed.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import importlib.util
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
import warnings
from dataclasses import dataclass

import pytest

from helpers import COOP, REPO

DOCS = ["README.md", "ARCHITECTURE.md", "tests/README.md"] + sorted(
    os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
PYTHONS = {"python", "python3", ".venv/bin/python", "../.venv/bin/python", "$(PY)", "../$(PY)"}
SEPARATORS = {"&&", "||", ";", "|"}
FENCE = re.compile(r"^([ \t]*)```(\w*).*?^\1```", re.M | re.S)
SPAN = re.compile(r"`([^`\n]+(?:\n(?!\s*\n)[^`\n]+)*)`")  # inline code, may wrap onto the next line
OPTIONAL = re.compile(r"\[(-[^\[\]]*|[A-Z][^\[\]']*)\]")  # [--flag V], [KEY VALUE ...]: the content counts
ANGLE = re.compile(r"<[^<>\n]*>")
ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
KEY_WORDS = {"KEY", "VALUE", "KEY=VAL"}
# sbatch's common options (Slurm's sbatch man page; `sbatch --help` needs a cluster), name -> takes a value
SBATCH_OPTIONS = {"--nodes": True, "-N": True, "--gpus-per-node": True, "--ntasks-per-node": True,
                  "--cpus-per-task": True, "--partition": True, "-p": True, "--time": True, "-t": True,
                  "--array": True, "--account": True, "-A": True, "--qos": True, "--job-name": True, "-J": True,
                  "--output": True, "-o": True, "--error": True, "--mem": True, "--gres": True, "--gpus": True,
                  "--requeue": False, "--signal": True, "--export": True, "--dependency": True,
                  "--exclusive": False, "--constraint": True, "--nodelist": True, "--chdir": True}


@dataclass(frozen=True)
class Command:
    doc: str
    line: int
    text: str
    tokens: tuple
    cwd: str

    def where(self) -> str:
        return f"{self.doc}:{self.line}: `{self.text}`"


# ---------------------------------------------------------------- extraction


def is_placeholder(tok: str) -> bool:
    return "..." in tok or "<" in tok or "$" in tok or tok in KEY_WORDS or tok == "…"


def strip_comment(line: str) -> str:
    """The line without a shell comment (``#`` at a word start, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def tokenize(text: str) -> list[str]:
    """Shell words of a quoted command, placeholders kept as single words and ``[optional]`` groups opened."""
    text = ANGLE.sub("<PH>", text)
    while OPTIONAL.search(text):
        text = OPTIONAL.sub(lambda m: " " + m.group(1) + " ", text)
    return shlex.split(strip_comment(text))


def split_commands(tokens: list[str]) -> list[list[str]]:
    out, cur = [], []
    for tok in tokens:
        if tok in SEPARATORS:
            out.append(cur)
            cur = []
        else:
            cur.append(tok)
    return [c for c in out + [cur] if c]


def command_start(tokens: list[str]) -> int:
    """Index of the program word after ``NAME=value`` / ``env`` prefixes."""
    i = 0
    while i < len(tokens) and (ENV.match(tokens[i]) or tokens[i] == "env"):
        i += 1
    return i


def is_command(tokens: list[str]) -> bool:
    i = command_start(tokens)
    if i + 1 >= len(tokens):  # a program named alone (`torchrun`) is prose, not a command
        return False
    word = tokens[i]
    if word in PYTHONS or word in {"bash", "sh", "make", "torchrun", "sbatch", "pytest"}:
        return True
    # a bare script with flags (`train.py --eval-only ...`, `run_setup2.py --stack`)
    return word.endswith(".py") and is_flag(tokens[i + 1]) and "*" not in word


def commands_of(doc: str, text: str, line: int, cwd: str) -> tuple[list[Command], str]:
    """Commands of one logical line (``cd DIR`` changes ``cwd`` for what follows); returns them and the cwd."""
    try:
        tokens = tokenize(text)
    except ValueError:  # an unbalanced quote: plain words
        tokens = ANGLE.sub("<PH>", strip_comment(text)).split()
    out = []
    for cmd in split_commands(tokens):
        if cmd[0] == "cd" and len(cmd) == 2:
            cwd = os.path.normpath(os.path.join(cwd, cmd[1]))
        elif is_command(cmd):
            out.append(Command(doc, line, " ".join(text.split()), tuple(cmd), cwd))
    return out, cwd


def fenced_commands(doc: str, body: str, first_line: int) -> list[Command]:
    out, cwd, pending, start = [], REPO, "", first_line
    for n, raw in enumerate(body.split("\n")):
        line = re.sub(r"^\s*\$ ", "", raw)
        if not pending:
            start = first_line + n
        if strip_comment(line).rstrip().endswith("\\"):
            pending += strip_comment(line).rstrip()[:-1] + " "
            continue
        found, cwd = commands_of(doc, pending + line, start, cwd)
        out += found
        pending = ""
    return out


def extract(doc: str, text: str) -> list[Command]:
    """Every command quoted in one Markdown text, in order of appearance."""
    out = []
    for m in FENCE.finditer(text):
        if m.group(2) in ("", "bash", "sh", "shell", "console"):
            body_start = text.index("\n", m.start()) + 1
            body = text[body_start:text.rindex("```", m.start(), m.end())]
            out += fenced_commands(doc, body, text.count("\n", 0, body_start) + 1)
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for m in SPAN.finditer(prose):
        out += commands_of(doc, m.group(1).replace("\n", " "), prose.count("\n", 0, m.start()) + 1, REPO)[0]
    return sorted(out, key=lambda c: c.line)


# ---------------------------------------------------------------- entry points


class _Parsed(BaseException):
    """Raised where an entry point parses its command line: the parser and the arguments it was given."""

    def __init__(self, parser: argparse.ArgumentParser, args: list[str]):
        super().__init__()
        self.parser, self.args = parser, args


@contextlib.contextmanager
def _entry_context(argv0: str, argv: list[str], stderr: io.StringIO):
    """``sys.argv`` set, output captured, argparse intercepted: ``parse_args`` (the program's full parse) stops the
    program; a partial ``parse_known_args`` that hands words on (``knn, rest = p.parse_known_args(argv)``) runs,
    once, so that the parser those words go to is reached."""
    parse_args, parse_known = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    partial, inside = [], []

    def full(self, args=None, namespace=None):
        raise _Parsed(self, list(sys.argv[1:] if args is None else args))

    def known(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        if inside:  # a subcommand's parser, within the partial parse
            return parse_known(self, args, namespace)
        if partial:
            raise _Parsed(self, args)
        partial.append(self)
        inside.append(self)
        try:
            namespace, rest = parse_known(self, args, namespace)
        finally:
            inside.pop()
        if not rest:  # nothing handed on: this was the program's own parse
            raise _Parsed(self, args)
        return namespace, rest

    saved = sys.argv[:], sys.path[:]
    sys.argv = [argv0, *argv]
    argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = full, known
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(stderr):
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: module already imported
            yield
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = parse_args, parse_known
        sys.argv, sys.path[:] = saved[0], saved[1]


def entry_source(kind: str, target: str) -> str:
    """The code ``python <script>`` / ``python -m <module>`` runs first."""
    if kind == "module":
        spec = importlib.util.find_spec(target)
        if spec.submodule_search_locations is not None:  # a package runs its __main__
            spec = importlib.util.find_spec(target + ".__main__")
        target = spec.origin if spec else ""
    return open(target, encoding="utf-8").read() if target and os.path.isfile(target) else ""


@functools.lru_cache(maxsize=None)
def parsed_by(kind: str, target: str, argv: tuple) -> tuple:
    """(parser, arguments it parses) of the entry point ``target`` (a script path or a module) given ``argv``,
    without running past its argument parsing; (None, reason) when it reaches no argparse parser. An entry point
    that does not call a ``main`` or build a parser is not run at all."""
    if not re.search(r"\bmain\(|ArgumentParser|get_parser\(", entry_source(kind, target)):
        return None, "has no command-line parser (no main() or ArgumentParser)"
    stderr = io.StringIO()
    with _entry_context(target, list(argv), stderr):
        try:
            if kind == "script":
                runpy.run_path(target, run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
        except _Parsed as p:
            return p.parser, tuple(p.args)
        except SystemExit as e:
            return None, f"exits ({e.code}) before its argument parser: {stderr.getvalue().strip()[-300:]}"
    return None, "returns without parsing any argument"


@functools.lru_cache(maxsize=None)
def config_keys() -> frozenset:
    from test_config_keys import _full_cfg, _leaves

    return frozenset(_leaves(_full_cfg()))


@functools.lru_cache(maxsize=None)
def makefile_targets() -> tuple:
    text = open(os.path.join(REPO, "Makefile"), encoding="utf-8").read()
    targets = set()
    for m in re.finditer(r"^([A-Za-z0-9_.%/$() -]+?)\s*:(?!=)", text, re.M):
        targets.update(m.group(1).split())
    variables = set(re.findall(r"^([A-Z_]+)\s*[?:]?=", text, re.M))
    return frozenset(targets), frozenset(variables)


@functools.lru_cache(maxsize=None)
def pytest_options() -> dict:
    """pytest's options (name -> takes a value), from ``pytest --help`` (its parser is not public)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--help", "-p", "no:cacheprovider"], cwd=REPO,
                         capture_output=True, text=True, timeout=120).stdout
    opts = {}
    for line in out.splitlines():
        m = re.match(r"^  (-[^ ].*?)(?:\s{2,}|$)", line)
        for part in (m.group(1).split(", ") if m else []):
            spec = re.match(r"(--?[\w-]+)(?:[ =](\S+))?", part.strip())
            if spec:
                opts[spec.group(1)] = spec.group(2) is not None
    return opts


# ---------------------------------------------------------------- checks


def is_flag(tok: str) -> bool:
    return tok.startswith("-") and len(tok) > 1 and not re.match(r"^-\.?\d", tok)


def check_keys(region: list[str], where: str) -> list[str]:
    """``KEY VALUE`` pairs: every key is a config key (placeholders skip one word)."""
    problems, j = [], 0
    while j < len(region):
        tok = region[j]
        if is_placeholder(tok):
            j += 1
            continue
        if tok not in config_keys():
            problems.append(f"{where}: {tok!r} is not a config key (dassl.config defaults + the trainers' "
                            f"extend_cfg)")
        j += 2
    return problems


def _consume(action: argparse.Action, args: list[str], i: int) -> int:
    """How many words after a flag its action takes."""
    nargs = action.nargs
    if nargs is None:
        return 1
    if isinstance(nargs, int):
        return nargs
    if nargs == argparse.REMAINDER:
        return len(args) - i - 1
    n = 0
    while i + 1 + n < len(args) and not is_flag(args[i + 1 + n]) and args[i + 1 + n] != "--":
        n += 1
        if nargs == "?":
            break
    return n


def walk(parser: argparse.ArgumentParser, args: list[str], where: str, label: str,
         stop_at_positional: bool = False) -> tuple[list[str], int]:
    """Check ``args`` against ``parser``: flags exist (exact names), subcommands exist, overrides are config keys.
    Returns the problems and, with ``stop_at_positional``, the index of the first positional word."""
    problems, i = [], 0
    options = {o: a for a in parser._actions for o in a.option_strings}
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    remainder = any(a.nargs == argparse.REMAINDER and not a.option_strings for a in parser._actions)
    while i < len(args):
        tok = args[i]
        if tok == "--":
            return problems + check_keys(args[i + 1:], where), len(args)
        if is_placeholder(tok):
            i += 1
        elif is_flag(tok):
            name = tok.split("=", 1)[0]
            action = options.get(name)
            if action is None:
                problems.append(f"{where}: {name} is not a flag of {label}")
                i += 1
                continue
            n = 0 if "=" in tok else _consume(action, args, i)
            if action.metavar and "KEY VALUE" in str(action.metavar):  # --member DIR KEY VALUE ...
                problems += check_keys(args[i + 2:i + 1 + n], where)
            i += 1 + n
        elif stop_at_positional:
            return problems, i
        elif subs:
            choices = subs[0].choices
            if tok not in choices:
                return problems + [f"{where}: {tok!r} is not a subcommand of {label} ({', '.join(choices)})"], i
            sub_problems, _ = walk(choices[tok], args[i + 1:], where, f"{label} {tok}")
            return problems + sub_problems, len(args)
        elif remainder:  # train.py's trailing KEY VALUE overrides
            return problems + check_keys(args[i:], where), len(args)
        else:
            i += 1
    return problems, i


def check_python_entry(kind: str, target: str, label: str, argv: list[str], where: str) -> list[str]:
    parser, seen = parsed_by(kind, target, tuple(argv))
    if parser is None:
        return [f"{where}: {label} {seen}"] if any(is_flag(a) for a in argv) else []
    problems, _ = walk(parser, list(seen), where, label)
    if "--" in argv and "--" not in seen:  # the program split off its `-- KEY VALUE` overrides itself
        problems += check_keys(argv[argv.index("--") + 1:], where)
    return problems


def resolve_path(path: str, cwd: str, bare: bool = False) -> list[str]:
    """Existing files the quoted ``path`` names (``<...>`` in it: every match), relative to the command's
    directory, ``CoOp/`` or the repository; a bare script name is also looked up under ``CoOp/``."""
    pattern = ANGLE.sub("*", path).replace("<PH>", "*")
    for base in dict.fromkeys([cwd, COOP, REPO]):
        found = sorted(p for p in glob.glob(os.path.join(base, pattern)) if os.path.isfile(p))
        if found:
            return found
    if bare and "/" not in path:
        for sub in ("scripts/CRoFT", "tools"):
            if os.path.isfile(os.path.join(COOP, sub, path)):
                return [os.path.join(COOP, sub, path)]
    return []


def module_alternatives(spec: str) -> list[str]:
    """``launch.setup1|setup2`` -> ``launch.setup1``, ``launch.setup2``."""
    first, *rest = spec.split("|")
    parent = first.rsplit(".", 1)[0] + "." if "." in first else ""
    return [first] + [m if "." in m else parent + m for m in rest]


def module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def check_python(cmd: Command, args: list[str], bare: bool = False) -> list[str]:
    where = cmd.where()
    if not args or args[0] == "-c":
        return []
    if args[0] == "-m":
        if len(args) < 2:
            return [f"{where}: -m without a module"]
        if args[1] == "pytest":
            return check_pytest(cmd, args[2:])
        problems = []
        for module in module_alternatives(args[1]):
            if not module_exists(module):
                problems.append(f"{where}: no module {module!r} (importable from CoOp/)")
            else:
                problems += check_python_entry("module", module, f"python -m {module}", args[2:], where)
        return problems
    scripts = resolve_path(args[0], cmd.cwd, bare)
    if not scripts:
        return [f"{where}: no script {args[0]} (looked in {os.path.relpath(cmd.cwd, REPO) or '.'}, CoOp/, the "
                f"repository)"]
    problems = []
    for script in scripts:
        problems += check_python_entry("script", script, os.path.relpath(script, REPO), args[1:], where)
    return problems


def shell_text(path: str) -> str:
    """A shell script with the files it sources, continuation lines joined."""
    text = open(path, encoding="utf-8").read()
    for m in re.finditer(r"^\s*(?:source|\.)\s+\"?\$\(dirname \"\$\{?[^)]*\)\"?/([\w.]+)\"?", text, re.M):
        sourced = os.path.join(os.path.dirname(path), m.group(1))
        if os.path.isfile(sourced):
            text += "\n" + open(sourced, encoding="utf-8").read()
    return re.sub(r"\\\n", " ", text)


def shell_usage(path: str, text: str) -> list[str] | None:
    """The words after the script's name on its ``# usage:`` line (continuation comment lines joined)."""
    m = re.search(r"^#\s*usage:(.*(?:\n#\s{2,}\[.*)*)", text, re.M | re.I)
    if not m:
        return None
    usage = re.sub(r"\n#\s*", " ", m.group(1))
    name = os.path.basename(path)
    return usage.split(name, 1)[1].split() if name in usage else []


def shell_forward(text: str) -> str | None:
    """The Python script a shell script passes its remaining arguments (``"$@"``) to."""
    copies = re.findall(r"^\s*(\w+)=.*\"\$@\"", text, re.M)
    markers = ['"$@"'] + [f"${v}" for v in copies] + [f"${{{v}}}" for v in copies]
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not any(mk in line for mk in markers):
            continue
        scripts = re.findall(r"(?<![\w/.-])([\w./-]+\.py)\b", line)
        if scripts:
            return scripts[-1]
    return None


def check_shell(cmd: Command, path: str, args: list[str]) -> list[str]:
    where = cmd.where()
    found = resolve_path(path, cmd.cwd, bare=True)
    if not found:
        return [f"{where}: no shell script {path}"]
    script = found[0]
    text = shell_text(script)
    usage = shell_usage(script, text)
    optional = [k for k, w in enumerate(usage or []) if w.startswith("[")]
    required = (usage or [])[:optional[0] if optional else None]
    given = next((k for k, a in enumerate(args) if is_flag(a) or "." in a and a.split(".")[0].isupper()),
                 len(args))
    if given < len(required):
        return [f"{where}: {os.path.relpath(script, REPO)} takes {' '.join(required)} (its usage line); "
                f"{given} given"]
    extra = args[len(required):]
    if not extra:
        return []
    forward = shell_forward(text)
    if forward is None or usage is not None and not optional:
        return [f"{where}: {os.path.relpath(script, REPO)} takes no further arguments ({' '.join(extra)})"]
    target = os.path.join(COOP, forward)
    label = f"{os.path.relpath(target, REPO)} (via {os.path.basename(script)})"
    return check_python_entry("script", target, label, extra, where)


def check_make(cmd: Command, args: list[str]) -> list[str]:
    targets, variables = makefile_targets()
    problems = []
    for a in args:
        if ENV.match(a):
            if a.split("=")[0] not in variables:
                problems.append(f"{cmd.where()}: {a.split('=')[0]} is not a Makefile variable")
        elif is_flag(a):
            if a[:2] not in ("-j", "-k", "-n", "-s"):
                problems.append(f"{cmd.where()}: make flag {a} is not expected in the docs")
        elif not is_placeholder(a) and a not in targets:
            problems.append(f"{cmd.where()}: no Makefile target {a!r}")
    return problems


def check_pytest(cmd: Command, args: list[str]) -> list[str]:
    opts, problems, i = pytest_options(), [], 0
    while i < len(args):
        a = args[i]
        if is_flag(a):
            name = a.split("=", 1)[0]
            if name not in opts:
                problems.append(f"{cmd.where()}: {name} is not a pytest option")
            i += 2 if opts.get(name) and "=" not in a else 1
            continue
        path = a.split("::")[0]
        if not is_placeholder(a) and not any(os.path.exists(os.path.join(b, path)) for b in (cmd.cwd, REPO)):
            problems.append(f"{cmd.where()}: no test path {path}")
        elif "::" in a and not is_placeholder(a):
            source = open(os.path.join(REPO, path), encoding="utf-8").read()
            if not re.search(rf"def {re.escape(a.split('::')[1].split('[')[0])}\b", source):
                problems.append(f"{cmd.where()}: no test {a.split('::')[1]} in {path}")
        i += 1
    return problems


def check_sbatch(cmd: Command, args: list[str]) -> list[str]:
    i = 0
    while i < len(args) and is_flag(args[i]):
        name = args[i].split("=", 1)[0]
        if name not in SBATCH_OPTIONS:
            return [f"{cmd.where()}: {name} is not an sbatch option"]
        i += 2 if SBATCH_OPTIONS[name] and "=" not in args[i] else 1
    if i >= len(args):
        return [f"{cmd.where()}: sbatch without a batch script"]
    return check_shell(cmd, args[i], args[i + 1:])


def check_torchrun(cmd: Command, args: list[str]) -> list[str]:
    from torch.distributed.run import get_args_parser

    problems, i = walk(get_args_parser(), args, cmd.where(), "torchrun", stop_at_positional=True)
    if i >= len(args):
        return problems + [f"{cmd.where()}: torchrun without a training script"]
    return problems + check_python(cmd, args[i:])


def check(cmd: Command) -> list[str]:
    tokens = list(cmd.tokens[command_start(list(cmd.tokens)):])
    word, args = tokens[0], tokens[1:]
    if word in PYTHONS:
        return check_python(cmd, args)
    if word in ("bash", "sh"):
        return check_shell(cmd, args[0], args[1:]) if args else []
    if word == "make":
        return check_make(cmd, args)
    if word == "pytest":
        return check_pytest(cmd, args)
    if word == "sbatch":
        return check_sbatch(cmd, args)
    if word == "torchrun":
        return check_torchrun(cmd, args)
    return check_python(cmd, tokens, bare=True)  # a bare script


def problems_in(doc: str, text: str) -> tuple[list[Command], list[str]]:
    cmds = extract(doc, text)
    return cmds, [p for c in cmds for p in check(c)]


# ---------------------------------------------------------------- tests


def read(doc: str) -> str:
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("doc", DOCS)
def test_every_quoted_command_exists(doc):
    cmds, problems = problems_in(doc, read(doc))
    assert problems == [], "\n".join(problems)


def test_the_docs_quote_every_kind_of_command():
    """The extraction finds the docs' commands (guards against a test that checks nothing)."""
    cmds = [c for doc in DOCS for c in extract(doc, read(doc))]
    words = {c.tokens[command_start(list(c.tokens))] for c in cmds}
    assert len(cmds) >= 40
    assert {"python", "make", "bash", "sbatch", "torchrun", "pytest"} <= words
    assert any("-m" in c.tokens for c in cmds) and any("--" in c.tokens for c in cmds)


GOOD = """
```bash
cd CoOp
python scripts/CRoFT/run_setup2.py --datasets PACS --dry-run -- TRAINER.CRoFT.lambda1 5   # a comment
python train.py --root $DATA --seed 1 \\
  --output-dir out TEST_ENV test_on_sketch.json DATASET.NUM_SHOTS 16
DATA=/d bash scripts/CRoFT/croft_pacs.sh PACS rn50_ep30 1 16 1000 OPTIM.MAX_EPOCH 2
```
Also `python tools/manifest.py drop --dry-run '*/x/*'`, `make test` and `python -m launch.official CRoFT 2
--cfg ViT_ep30`, `train.py --member DIR KEY VALUE ...`, `python -m demo [--quick]` and
`python -m launch.setup1|setup2 --eval --dry-run`.
"""

BAD = {  # a planted mistake per kind of entry point, and the word the problem must name
    "python scripts/CRoFT/run_setup2.py --datasets PACS --made-up-flag 3": "--made-up-flag",
    "cd CoOp && python train.py --root x --output-dir y NOT.A.KEY 1": "'NOT.A.KEY'",
    "python scripts/CoOp/test_setup2.py -- TRAINER.COOP.NOPE 1": "'TRAINER.COOP.NOPE'",
    "python train.py --member out/a TRAINER.CRoFT.lambdaX 1": "'TRAINER.CRoFT.lambdaX'",
    "python -m demo --made-up": "--made-up",
    "python -m launch.no_such_module": "'launch.no_such_module'",
    "python tools/no_such_tool.py --root x": "tools/no_such_tool.py",
    "python tools/manifest.py lst": "'lst'",
    "python tools/manifest.py drop --nope x": "--nope",
    "make no-such-target": "'no-such-target'",
    "bash scripts/CRoFT/croft_pacs.sh PACS rn50_ep30 1": "DATASET CFG SEED SHOTS LAMBDA2",
    "bash scripts/CRoFT/croft_pacs.sh PACS rn50_ep30 1 16 1000 BAD.KEY 1": "'BAD.KEY'",
    "make test NO_SUCH_VARIABLE=1": "NO_SUCH_VARIABLE",
    "python -m launch.setup2 --eval --bogus": "--bogus",
    "bash scripts/CRoFT/test_energy.sh --bogus 1": "--bogus",
    "cd CoOp && sbatch --nodes 2 scripts/slurm/extract_features.sbatch --root x --bogus": "--bogus",
    "sbatch --bogus 1 scripts/slurm/extract_features.sbatch": "--bogus",
    "torchrun --nproc_per_node 8 tools/extract_features.py --bogus": "--bogus",
    "torchrun --not-torchrun tools/extract_features.py": "--not-torchrun",
    "pytest --no-such-pytest-flag tests/test_scores.py": "--no-such-pytest-flag",
    "pytest tests/test_nope.py": "tests/test_nope.py",
    "run_setup2.py --stak": "--stak",
    "python scripts/CRoFT/test_setup2_knn.py --id-correct-only --kk 3": "--kk",  # after a partial parse
}


def test_a_correct_page_passes():
    cmds, problems = problems_in("good.md", GOOD)
    assert problems == []
    assert len(cmds) == 9, [c.text for c in cmds]


@pytest.mark.parametrize("bad", sorted(BAD))
def test_a_planted_mistake_is_found(bad):
    """The test of the test: each command holds one mistake; fenced or inline, exactly one problem names it."""
    for text in (f"```bash\n{bad}\n```\n", f"Run `{bad}` here.\n"):
        cmds, problems = problems_in("planted.md", text)
        assert len(cmds) == 1, text
        assert len(problems) == 1 and BAD[bad] in problems[0], problems
