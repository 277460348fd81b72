"""Three small code problems in HumanEval's format, written for these tests (the shared
HumanEval file is not copied into the project): a plain function, one with an import, and
one whose prompt defines a helper before the entry point, as some HumanEval prompts do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PROBLEMS: list[dict[str, Any]] = [
    {
        "task_id": "Own/0",
        "prompt": (
            "from typing import List\n\n\n"
            "def has_pair_with_sum(numbers: List[int], target: int) -> bool:\n"
            '    """ Return True when two different items of numbers add up to target.\n'
            "    >>> has_pair_with_sum([1, 2, 3], 5)\n    True\n"
            "    >>> has_pair_with_sum([1, 2], 4)\n    False\n"
            '    """\n'
        ),
        "entry_point": "has_pair_with_sum",
        "canonical_solution": (
            "    seen = set()\n    for n in numbers:\n        if target - n in seen:\n"
            "            return True\n        seen.add(n)\n    return False\n"
        ),
        "test": (
            "def check(candidate):\n    assert candidate([1, 2, 3], 5) is True\n"
            "    assert candidate([1, 2], 4) is False\n    assert candidate([], 0) is False\n"
            "    assert candidate([2, 2], 4) is True\n    assert candidate([2], 4) is False\n"
        ),
    },
    {
        "task_id": "Own/1",
        "prompt": (
            "def count_vowels(text: str) -> int:\n"
            '    """ Count the vowels (a, e, i, o, u, either case) in text.\n'
            "    >>> count_vowels('Hello')\n    2\n"
            '    """\n'
        ),
        "entry_point": "count_vowels",
        "canonical_solution": "    return sum(1 for c in text.lower() if c in 'aeiou')\n",
        "test": (
            "def check(candidate):\n    assert candidate('Hello') == 2\n"
            "    assert candidate('') == 0\n    assert candidate('AEIOU xyz') == 5\n"
        ),
    },
    {
        "task_id": "Own/2",
        "prompt": (
            "def _digits(n: int) -> list:\n    return [int(c) for c in str(abs(n))]\n\n\n"
            "def digit_sum(n: int) -> int:\n"
            '    """ The sum of the decimal digits of n, its sign ignored.\n'
            "    >>> digit_sum(-123)\n    6\n"
            '    """\n'
        ),
        "entry_point": "digit_sum",
        "canonical_solution": "    return sum(_digits(n))\n",
        "test": (
            "def check(candidate):\n    assert candidate(-123) == 6\n"
            "    assert candidate(0) == 0\n    assert candidate(9999) == 36\n"
        ),
    },
]
ENTRY_POINTS = [problem["entry_point"] for problem in PROBLEMS]


def write_problems(path: Path, n: int = len(PROBLEMS)) -> Path:
    path.write_text("".join(json.dumps(problem) + "\n" for problem in PROBLEMS[:n]))
    return path
