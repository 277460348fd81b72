"""Grading untrusted code answers: a bubblewrap sandbox (sandbox.py), HumanEval-format
problems and their checks (humaneval.py), and `tandem grade` (cli.py). Never imported by
the API process; see docs/grading.md."""
