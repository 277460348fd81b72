"""Tests for services.core.answers.extract_code: the function a code reply defines.

The replies are our own, written the way small models answer: prose around fenced blocks,
usage examples after the function, unclosed fences, no fences at all.
"""

from __future__ import annotations

import ast
import time

import pytest

from services.core.answers import CodeAnswer, extract_answer, extract_code


def functions(code: str | None) -> list[str]:
    """Names of the top-level definitions and imports in extracted code (which must parse)."""
    assert code is not None
    names = []
    for node in ast.parse(code).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.append(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.extend(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Assign):
            names.extend(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def test_the_function_from_a_fenced_block_with_prose_around() -> None:
    reply = (
        "Sure! We sort the list and compare neighbours.\n\n"
        "```python\n"
        "def has_close(numbers, threshold):\n"
        "    ordered = sorted(numbers)\n"
        "    return any(b - a < threshold for a, b in zip(ordered, ordered[1:]))\n"
        "```\n\n"
        "This runs in O(n log n) time."
    )
    answer = extract_code(reply, "has_close")
    assert answer and answer.reason == "from the last fenced block of 1"
    assert answer.code == (
        "def has_close(numbers, threshold):\n"
        "    ordered = sorted(numbers)\n"
        "    return any(b - a < threshold for a, b in zip(ordered, ordered[1:]))\n"
    )


def test_the_last_block_that_defines_the_function_wins() -> None:
    reply = (
        "First try:\n```python\ndef f(x):\n    return x\n```\n"
        "Fixed:\n```py\ndef f(x):\n    return x + 1\n```\n"
        "Usage:\n```python\nprint(f(2))\n```\n"
        "Output:\n```\n3\n```\n"
    )
    answer = extract_code(reply, "f")
    assert answer.code == "def f(x):\n    return x + 1\n"
    assert answer.reason == "from fenced block 2 of 4"


def test_plain_fences_count_and_other_languages_do_not() -> None:
    plain = extract_code("```\ndef f():\n    return 1\n```", "f")
    assert plain.code == "def f():\n    return 1\n"
    shell = extract_code("```bash\nf() { echo 1; }\n```\n\ndef f():\n    return 1\n", "f")
    assert shell == CodeAnswer("def f():\n    return 1\n", "from the reply (no fenced Python block)")


def test_imports_helpers_and_constants_come_along_but_not_the_script_around() -> None:
    reply = """```python
from typing import List
import math, os
import re as regex
from collections import Counter

LIMIT = 10
UNUSED = 3

class Box:
    size = LIMIT

def scale(value):
    return value * Box.size

def square_roots(values: List[int]) -> List[float]:
    return [math.sqrt(scale(v)) for v in values]

print(square_roots([1, 4]))
assert square_roots([1]) == [math.sqrt(10)]
if __name__ == "__main__":
    import doctest
    doctest.testmod()
```"""
    answer = extract_code(reply, "square_roots")
    assert functions(answer.code) == ["List", "math", "os", "LIMIT", "Box", "scale", "square_roots"]
    assert "print(" not in answer.code and "__main__" not in answer.code
    assert "Counter" not in answer.code and "UNUSED" not in answer.code


def test_decorators_async_globals_and_future_imports_are_kept() -> None:
    reply = (
        "from __future__ import annotations\n"
        "import functools\n"
        "count = 0\n"
        "@functools.lru_cache(maxsize=None)\n"
        "def fib(n):\n"
        "    global count\n"
        "    count += 1\n"
        "    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
    )
    answer = extract_code(reply, "fib")
    assert answer.code is not None
    assert answer.code.startswith("from __future__ import annotations\n")
    assert "@functools.lru_cache(maxsize=None)\ndef fib(n):" in answer.code
    assert functions(answer.code) == ["annotations", "functools", "count", "fib"]
    asynchronous = extract_code("async def fetch():\n    return 1\n", "fetch")
    assert asynchronous.code == "async def fetch():\n    return 1\n"


def test_no_fence_prose_lines_are_tolerated() -> None:
    reply = (
        "Here's the function you asked for:\n"
        "def add(a, b):\n"
        "    return a + b\n"
        "It's simple: it returns the sum of a and b.\n"
        "Example: add(2, 3) gives 5.\n"
    )
    answer = extract_code(reply, "add")
    assert answer.code == "def add(a, b):\n    return a + b\n"
    assert answer.reason == "from the reply (no fenced Python block)"


def test_an_unclosed_fence_runs_to_the_end_and_a_cut_off_tail_is_dropped() -> None:
    reply = (
        "```python\n"
        "def first(xs):\n"
        "    return xs[0]\n"
        "\n"
        "def unfinished(xs):\n"
        "    return [x for x in\n"
    )
    assert extract_code(reply, "first").code == "def first(xs):\n    return xs[0]\n"
    cut = extract_code(reply, "unfinished")
    assert cut.code is None and cut.reason == "the function unfinished in the reply does not parse"


def test_indented_fenced_blocks_are_dedented() -> None:
    reply = "1. Define it:\n\n    ```python\n    def f():\n        return 2\n    ```\n"
    assert extract_code(reply, "f").code == "def f():\n    return 2\n"


def test_the_last_of_two_definitions_in_a_block_is_the_one() -> None:
    answer = extract_code("def f():\n    return 1\n\ndef f():\n    return 2\n", "f")
    assert answer.code == "def f():\n    return 2\n"


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ("", "empty reply"),
        ("   \n", "empty reply"),
        ("I cannot solve this.", "no function named target in the reply"),
        ("    return x + 1\n", "no function named target in the reply"),  # a bare body
        ("```python\ndef other():\n    pass\n```", "no function named target in the reply"),
        ("```python\nclass target:\n    pass\n```", "no function named target in the reply"),
        ("def target(:\n    pass\n", "the function target in the reply does not parse"),
    ],
)
def test_no_function_gives_none_and_a_reason(reply: str, reason: str) -> None:
    answer = extract_code(reply, "target")
    assert answer == CodeAnswer(None, reason)
    assert not answer


def test_a_nested_function_of_that_name_is_not_the_answer() -> None:
    reply = "def outer():\n    def target():\n        return 1\n    return target\n"
    assert extract_code(reply, "target").code is None


def test_the_entry_point_must_be_an_identifier() -> None:
    with pytest.raises(ValueError, match="not a Python identifier"):
        extract_code("def f(): pass", "f()")


def test_long_prose_and_pathological_code_end_quickly() -> None:
    prose = "\n".join(f"Line {i} of prose, isn't it? Here: (see above" for i in range(2000))
    started = time.monotonic()
    found = extract_code(prose + "\nimport math\ndef f():\n    return math.pi\n" + prose, "f")
    assert found.code == "import math\n\ndef f():\n    return math.pi\n"
    deep = "(" * 5000 + ")" * 5000
    assert extract_code(f"def f():\n    return {deep}\n", "f").code is None
    assert time.monotonic() - started < 5
    huge = "x" * 300_000 + "\ndef f():\n    return 1\n"
    assert extract_code(huge, "f") == CodeAnswer(
        None, "no function named f in the reply (its first 200000 characters)"
    )


def test_nul_bytes_and_stray_lines_in_prose_are_left_out() -> None:
    answer = extract_code("Note: x = '\0'\ndef target():\n    return 1\n", "target")
    assert answer.code == "def target():\n    return 1\n"


def test_decorators_and_else_stay_with_their_chunk_among_prose() -> None:
    reply = (
        "The code:\n"
        "@decorate\n"
        "def f():\n"
        "    return 1\n"
        "try:\n"
        "    import numpy\n"
        "except ImportError:\n"
        "    numpy = None\n"
        "values = [\n"
        "    1,\n"
        "]\n"
        "def g():\n"
        "    return numpy, values, f\n"
        "That's all.\n"
    )
    answer = extract_code(reply, "g")
    assert answer.code is not None
    assert "@decorate\ndef f():" in answer.code and "except ImportError:" in answer.code
    assert "values = [\n    1,\n]" in answer.code and "That's" not in answer.code


def test_math_extraction_is_unchanged() -> None:
    assert extract_answer("so the answer is \\boxed{42}.") == "42"
    assert extract_answer("```python\ndef f():\n    return 1\n```") == "1"
