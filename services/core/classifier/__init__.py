"""The trained sufficiency classifier (tandem.md, "Classifier model, labels, thresholds").

The life of a classifier, one module per step:

1. `collect`  for each question, every stage of a Tandem run: the coordinator stream cut at
              each budget (with the strategy's own `CoordinatorStream`), the 25 features of
              question + insights, the executor's answer checked against the gold answer.
              One durable JSON line per question, resumable (`services.core.jsonl`).
2. `samples`  that data on disk (`samples.jsonl` + `meta.json`) and read back as arrays.
3. `training` StandardScaler + gradient-boosted trees, cross-validated by question; the
              thresholds of each operating point searched on out-of-fold probabilities;
              `evaluate` on data it was not trained on.
4. `cascade`  the numbers behind 3: which stage each question stops at, the per-stage
              thresholds maximising `accuracy - lambda * TFLOPs`, the oracle, the report.
5. `artifact` one zip (manifest + model), checked before anything is unpickled, recording
              which feature computation (exact or top-k) it was trained on.
6. `policy`   the artifact served: `TrainedPolicy` picks the operating point of a job's
              cost preference and judges each stage; `check_classifier_artifact` is a
              worker's start-up check.

Imports go one way: `collect` and `cascade` use `samples`; `artifact` uses `cascade`'s
`OperatingPoint`; `policy` uses `artifact`; `training` uses `samples`, `cascade` and
`artifact`. So serving a classifier (this package's namespace holds only what jobs and
workers need) loads no training or collection code, and only `collect`, which runs models,
imports `engines`. The commands are in `services.classifier_cli`; collecting through a
running deployment over REST in `services.collect_remote`.
"""

from services.core.classifier.artifact import ClassifierArtifactError
from services.core.classifier.policy import (
    TrainedPolicy,
    check_classifier_artifact,
    load_policy,
    trained_policy,
)

__all__ = [
    "ClassifierArtifactError",
    "TrainedPolicy",
    "check_classifier_artifact",
    "load_policy",
    "trained_policy",
]
