"""Evaluation: run strategies on the same questions, check the answers, and report accuracy
against cost (`tandem eval`).

- `harness`: datasets, strategy specs (`tandem@economy`), runners (embedded or over REST),
  the resumable results file, and `run_evaluation` tying them together;
- `metrics`: the summary (accuracy with a Wilson interval, mean cost, savings, latency);
- `report`: the markdown table and the accuracy-versus-TFLOPs plot;
- `cli`: the `tandem eval` command.
"""
