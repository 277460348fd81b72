"""Final-answer extraction, gold answers and equivalence checking for math jobs.

``extract_answer`` tries, in order, and returns the first hit:

1. the LAST ``\\boxed{...}`` / ``\\fbox{...}`` (balanced, nested braces allowed;
   also the brace-less ``\\boxed 5``); a truncated or empty box falls back to
   the previous one;
2. the last GSM8K-style ``#### <answer>`` line;
3. the last phrase such as "the answer is X", "Final answer: $X$", "Answer: X";
4. the last number in the text (``-3``, ``2.5``, ``1,234``, ``3/4``, ``\\frac{3}{4}``).

Every candidate is cleaned: surrounding whitespace, ``$`` delimiters, trailing
periods and trailing units (``\\text{ cm}``, "dollars") are dropped. ``None``
means nothing was found.

``is_correct`` compares a prediction with a gold answer: first normalized string
equality, then plain numeric equality (decisive when both sides are plain
numbers), then ``math_verify`` with its signal-based timeouts disabled, so it is
safe in worker threads. Inputs that could make sympy compute for ever (power
towers, huge exponents or factorials, very long strings) skip math-verify.

``extract_code`` is the code task's extraction: the function a reply defines under the
item's entry point, with the imports and helpers it uses (see its docstring). It only
parses the reply (``ast``), it never runs it: code answers are run by services/grading.
"""

from __future__ import annotations

import ast
import math
import re
import textwrap
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

__all__ = ["CodeAnswer", "extract_answer", "extract_code", "is_correct", "reference_answer"]

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
_PHRASE = re.compile(r"\banswer\b[\s*]*(?:is\b|:)[\s*:]*([^\n]*)", re.IGNORECASE)
_NUMBER = re.compile(
    r"\\[dt]?frac\{-?\d+\}\{\d+\}"
    r"|(?:(?<![\w)\]}])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?(?![\d,]*\d)"
    r"|(?:(?<![\w)\]}])-)?\.\d+"
)
_MATH_SPAN = re.compile(r"\$\$?(.+?)(?<!\\)\$\$?|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_TEXT_UNIT = re.compile(r"(?<=\S)\s*\\(?:text|textrm|mbox|mathrm)\{[^{}]*[A-Za-z][^{}]*\}$")
_WORD_TAIL = re.compile(r"(?<=[\d}])(?:\s+[A-Za-z]{2,}\.?)+$")
_WORD_HEAD = re.compile(r"^(?:[A-Za-z]{2,}\s+)+(?=[-\d.$\\])")
_RISKY = re.compile(
    r"\^\s*\{[^{}]*\^|\^\s*\(?\s*\d+\s*\)?\s*\^|\^\s*\{?\s*\d{6,}|\*\*\s*\(?\s*\d+\s*\)?\s*\*\*|\d{4,}\s*!"
)
_MAX_VERIFY_CHARS = 400


# ---------------------------------------------------------------- extraction


def extract_answer(text: str) -> str | None:
    """Return the final answer written in a model's solution, or None."""
    if not text:
        return None
    for finder in (_last_boxed, _last_hashes, _last_phrase, _last_number):
        found = finder(text)
        if found:
            return found
    return None


def _last_boxed(text: str) -> str | None:
    for match in reversed(list(_BOX.finditer(text))):
        content = _box_content(text, match.end())
        if content and _clean(content):
            return _clean(content)
    return None


def _box_content(text: str, pos: int) -> str | None:
    """Content after ``\\boxed`` at ``pos``: a balanced ``{...}`` group or one bare token."""
    rest = text[pos:].lstrip()
    if not rest.startswith("{"):
        token = re.match(r"[^\s$]+", rest)
        return token.group(0) if token else None
    depth, escaped = 0, False
    for i, char in enumerate(rest):
        if escaped or char == "\\":
            escaped = not escaped
        elif char in "{}":
            depth += 1 if char == "{" else -1
            if depth == 0:
                return rest[1:i]
    return None


def _last_hashes(text: str) -> str | None:
    for match in reversed(list(_HASHES.finditer(text))):
        if _clean(match.group(1)):
            return _clean(match.group(1))
    return None


def _last_phrase(text: str) -> str | None:
    for match in reversed(list(_PHRASE.finditer(text))):
        candidate = _clean(_first_sentence(match.group(1)))
        if candidate:
            return candidate
    return None


def _first_sentence(tail: str) -> str:
    """The math span the phrase tail starts with, else the tail up to the first '. '."""
    span = _MATH_SPAN.match(tail.strip())
    if span:
        return next(group for group in span.groups() if group is not None)
    return re.split(r"\.\s", tail, maxsplit=1)[0]


def _last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _clean(answer: str) -> str:
    """Strip delimiters, markdown, trailing punctuation and trailing units."""
    answer = re.sub(r"\\?\$", "", answer).strip()
    answer = re.sub(r"^\\[(\[]|\\[)\]]$", "", answer).strip()
    answer = answer.strip("*").strip().rstrip(".,;:").strip()
    answer = _TEXT_UNIT.sub("", answer).strip()
    if re.search(r"\d", answer):
        answer = _WORD_HEAD.sub("", _WORD_TAIL.sub("", answer)).strip()
    return answer.rstrip(".").strip()


# ---------------------------------------------------------------- gold answers


def reference_answer(record: dict[str, Any]) -> str:
    """Gold answer of a GSM8K record (after '####', commas dropped) or a MATH-500 record."""
    answer = str(record["answer"])
    if "####" in answer:
        return answer.rsplit("####", 1)[1].strip().replace(",", "")
    return answer.strip()


# ---------------------------------------------------------------- equivalence


def is_correct(predicted: str | None, reference: str) -> bool:
    """True when ``predicted`` is mathematically equivalent to ``reference``; never raises."""
    if predicted is None or not predicted.strip() or not reference.strip():
        return False
    try:
        if _normalize(predicted) == _normalize(reference):
            return True
        pred_values, ref_values = _numbers(predicted), _numbers(reference)
        if pred_values and ref_values:
            return any(_close(p, r) for p in pred_values for r in ref_values)
    except (ValueError, ZeroDivisionError, OverflowError):
        pass
    return _math_verify(predicted, reference)


def _normalize(answer: str) -> str:
    answer = re.sub(r"\\(?:text|textrm|mbox|mathrm)\{([^{}]*)\}", r"\1", answer)
    answer = re.sub(r"\\[dt]frac", r"\\frac", answer)
    answer = re.sub(r"\^\s*\{?\\circ\}?|\\left|\\right|\\!|\\,|\\;|(?<!\\)\$", "", answer)
    answer = answer.replace("\\$", "").replace("{,}", ",")
    return re.sub(r"\s+", "", answer).rstrip(".")


def _numbers(answer: str) -> list[float]:
    """Values of a plain number (percent gives both readings), or [] if not one."""
    text = _normalize(answer)
    percent = text.endswith("%")
    text = text.removesuffix("%").removesuffix("\\")
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", text):
        text = text.replace(",", "")
    frac = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", text)
    if frac:
        text = f"{frac.group(1)}{frac.group(2)}/{frac.group(3)}"
    if not re.fullmatch(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?", text):
        return []
    value = float(Fraction(text))
    return [value, value / 100] if percent else [value]


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)


def _math_verify(predicted: str, reference: str) -> bool:
    """math-verify with signal timeouts disabled (thread-safe); False on any failure."""
    if any(_is_risky(s) for s in (predicted, reference)):
        return False
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    try:
        gold = parse(_wrap(reference), parsing_timeout=None)
        pred = parse(_wrap(predicted), parsing_timeout=None)
        return bool(gold and pred and verify(gold, pred, timeout_seconds=None))
    except (Exception, TimeoutException):
        return False


def _is_risky(answer: str) -> bool:
    """Inputs that can make sympy evaluate enormous integers without any way to stop it."""
    return len(answer) > _MAX_VERIFY_CHARS or bool(_RISKY.search(answer))


def _wrap(answer: str) -> str:
    """math-verify only parses LaTeX inside math delimiters."""
    answer = answer.strip()
    if "\\boxed" in answer or answer.startswith(("$", "\\(", "\\[")):
        return answer
    return f"${answer}$"


# ---------------------------------------------------------------- code answers

_PYTHON_TAGS = {"", "python", "python3", "py", "py3"}
_CONTINUES = re.compile(r"(?:else|elif|except|finally)\b|[)\]}]")
_MAX_CODE_CHARS = 200_000
_Definition = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


@dataclass(frozen=True)
class CodeAnswer:
    """The code extracted from a reply (None when there is none) and where it came from or
    why nothing was found. True when there is code."""

    code: str | None
    reason: str

    def __bool__(self) -> bool:
        return self.code is not None


def extract_code(reply: str, entry_point: str) -> CodeAnswer:
    """The function ``entry_point`` a reply defines, with the imports and helpers it uses.

    Looked for in the reply's fenced Python blocks (```python, ```py or a bare ```; an
    unclosed last fence runs to the end of the reply), the last block that defines the
    function winning; then in the whole reply, prose and all. Prose around the code is
    tolerated: when the text does not parse as a whole, the top-level chunks that do not
    parse on their own (prose, a function cut off mid-way) are left out. Of the code, only
    the last top-level definition of ``entry_point`` is kept, with the top-level imports,
    functions, classes and assignments it refers to (transitively), in their original order;
    calls, prints, asserts and ``if __name__ == "__main__":`` blocks around it are dropped.
    Only the first 200,000 characters of a reply are read.
    """
    if not entry_point.isidentifier():
        raise ValueError(f"entry point {entry_point!r} is not a Python identifier")
    if not reply or not reply.strip():
        return CodeAnswer(None, "empty reply")
    blocks = _python_blocks(reply[:_MAX_CODE_CHARS])
    for number in range(len(blocks), 0, -1):
        code = _function_with_helpers(blocks[number - 1], entry_point)
        if code:
            where = "the last fenced block" if number == len(blocks) else f"fenced block {number}"
            return CodeAnswer(code, f"from {where} of {len(blocks)}")
    code = _function_with_helpers(_without_fence_lines(reply[:_MAX_CODE_CHARS]), entry_point)
    if code:
        return CodeAnswer(code, "from the reply" + (" (no fenced Python block)" if not blocks else ""))
    read = "" if len(reply) <= _MAX_CODE_CHARS else f" (its first {_MAX_CODE_CHARS} characters)"
    if re.search(rf"\bdef\s+{entry_point}\s*\(", reply[:_MAX_CODE_CHARS]):
        return CodeAnswer(None, f"the function {entry_point} in the reply{read} does not parse")
    return CodeAnswer(None, f"no function named {entry_point} in the reply{read}")


def _python_blocks(text: str) -> list[str]:
    """Bodies of the fenced blocks tagged as Python (or untagged), in order."""
    blocks: list[str] = []
    body: list[str] | None = None
    tag = ""
    for line in text.splitlines():
        stripped = line.strip()
        if body is None:
            if stripped.startswith("```"):
                tag, body = stripped.strip("`").strip().split(" ")[0].lower(), []
        elif stripped.startswith("```") and not stripped.strip("`").strip():
            if tag in _PYTHON_TAGS:
                blocks.append(textwrap.dedent("\n".join(body)))
            body = None
        else:
            body.append(line)
    if body is not None and tag in _PYTHON_TAGS:  # the reply ended inside the block
        blocks.append(textwrap.dedent("\n".join(body)))
    return blocks


def _without_fence_lines(text: str) -> str:
    return "\n".join("" if line.strip().startswith("```") else line for line in text.splitlines())


def _function_with_helpers(source: str, entry_point: str) -> str | None:
    parsed = _parse_tolerantly(source)
    if parsed is None:
        return None
    module, lines = parsed
    targets = [
        node
        for node in module.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == entry_point
    ]
    if not targets:
        return None
    kept = _needed_statements(module, targets[-1])
    spans: list[tuple[int, int]] = []
    for node in kept:
        decorators = getattr(node, "decorator_list", [])
        start = min([node.lineno, *(d.lineno for d in decorators)])
        span = (start, node.end_lineno or node.lineno)
        if span not in spans:
            spans.append(span)
    return "\n\n".join("\n".join(lines[a - 1 : b]).rstrip() for a, b in spans) + "\n"


def _parse_tolerantly(source: str) -> tuple[ast.Module, list[str]] | None:
    """Parse the code, or else the parts of it that parse: the text is cut into top-level
    chunks (a line at column 0 and the indented lines after it) and each chunk that does not
    parse on its own (prose, a function cut off mid-way) is blanked out. Line numbers are
    kept. Linear in the text: each chunk is parsed once."""
    lines = source.splitlines()
    try:
        return ast.parse(source), lines
    except SyntaxError:
        pass
    except (ValueError, RecursionError, MemoryError):  # NUL bytes, absurd nesting
        return None
    kept = [""] * len(lines)
    for start, end in _chunks(lines):
        chunk = lines[start:end]
        try:
            ast.parse("\n".join(chunk))
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        kept[start:end] = chunk
    try:
        return ast.parse("\n".join(kept)), kept
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _chunks(lines: list[str]) -> list[tuple[int, int]]:
    """[start, end) of each top-level chunk: from a line at column 0 to the next one; a
    decorator stays with what it decorates, ``else``/``except``/closing brackets with what
    they close."""
    starts: list[int] = []
    previous = ""
    for index, line in enumerate(lines):
        if not line[:1].strip() or line.startswith("#"):
            continue
        if not (_CONTINUES.match(line) or previous.startswith("@")) or not starts:
            starts.append(index)
        previous = line
    return list(zip(starts, [*starts[1:], len(lines)][: len(starts)], strict=True))


def _needed_statements(module: ast.Module, target: ast.stmt) -> list[ast.stmt]:
    """``target`` and the top-level statements that define the names it uses, transitively;
    ``from __future__`` and star imports always. In source order."""
    defines: dict[str, list[ast.stmt]] = {}
    always: list[ast.stmt] = []
    for node in module.body:
        if node is not target:
            for name in _bound_names(node):
                defines.setdefault(name, []).append(node)
        if isinstance(node, ast.ImportFrom) and (
            node.module == "__future__" or any(alias.name == "*" for alias in node.names)
        ):
            always.append(node)
    kept: list[ast.stmt] = [target, *always]
    queue = [target]
    seen_names: set[str] = set()
    while queue:
        for name in _used_names(queue.pop()) - seen_names:
            seen_names.add(name)
            for node in defines.get(name, []):
                if not any(node is k for k in kept):
                    kept.append(node)
                    queue.append(node)
    order = {id(node): i for i, node in enumerate(module.body)}
    return sorted(kept, key=lambda node: order[id(node)])


def _bound_names(node: ast.stmt) -> list[str]:
    """Names a top-level import, definition or plain assignment binds."""
    if isinstance(node, _Definition):
        return [node.name]
    if isinstance(node, ast.Import | ast.ImportFrom):
        return [(alias.asname or alias.name).split(".")[0] for alias in node.names]
    if isinstance(node, ast.Try | ast.If | ast.With):  # try: import x / except: x = None
        inner = [*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", [])]
        for handler in getattr(node, "handlers", []):
            inner.extend(handler.body)
        return [name for statement in inner for name in _bound_names(statement)]
    targets: list[ast.expr] = []
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, ast.AnnAssign | ast.AugAssign) and getattr(node, "value", None):
        targets = [node.target]
    names: list[str] = []
    for target in targets:
        for item in ast.walk(target):
            if isinstance(item, ast.Name):
                names.append(item.id)
    return names


def _used_names(node: ast.AST) -> set[str]:
    used: set[str] = set()
    for item in ast.walk(node):
        if isinstance(item, ast.Name):
            used.add(item.id)
        elif isinstance(item, ast.Global | ast.Nonlocal):
            used.update(item.names)
    return used
