"""The trained sufficiency classifier: features against raw logits, threshold search,
artifact checks, resumable collection, and the trained policy inside a real Tandem run."""

from __future__ import annotations

import itertools
import json
import math
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services import collect_remote
from services.core import classifier, jsonl
from services.core.backends.base import ConfigurationError, entropy_from_top_k
from services.core.classifier import artifact as artifact_io
from services.core.classifier import cascade, training
from services.core.classifier import collect as collecting
from services.core.classifier import samples as samples_io
from services.core.engines import Engines
from services.core.params import JobParams
from services.core.prompts import classifier_text
from services.core.requests import JobRequest
from services.core.sufficiency import FEATURE_NAMES, features_from_scoring
from services.settings import Settings
from tests.code_problems import PROBLEMS, write_problems

TEXT = classifier_text(
    "A baker has 3 trays of 12 rolls and sells 20 rolls. How many rolls are left?",
    "Goal: rolls left. Planning: total = 3 * 12 = 36, then subtract the 20 sold.",
)
BUDGETS = (0, 8, 16)
QUESTIONS = [
    {"question": "What is 2 + 3?", "answer": "#### 5"},
    {"question": "Tom has 4 apples and eats 1. How many apples are left?", "answer": "#### 3"},
    {"question": "What is 10 - 7?", "answer": "#### 3"},
]


# ------------------------------------------------------------------ synthetic data


def synthetic_lines(n: int, budgets: tuple[int, ...], seed: int = 0) -> list[dict[str, Any]]:
    """Questions whose difficulty shows in a feature: easy ones are right from stage 0,
    harder ones need more coordinator tokens."""
    rng = np.random.default_rng(seed)
    lines = []
    for q in range(n):
        difficulty = rng.uniform()
        stages = []
        for s, budget in enumerate(budgets):
            features = rng.normal(size=len(FEATURE_NAMES))
            features[1] = difficulty - 0.3 * s + rng.normal(scale=0.05)
            features[-2:] = (s, budget)
            stages.append(
                {
                    "stage": s,
                    "budget": budget,
                    "features": features.tolist(),
                    "features_exact": True,
                    "correct": bool(difficulty < 0.3 + 0.3 * s),
                    "tflops": 1.0 + 2.0 * s,
                    "reached": True,
                }
            )
        lines.append({"id": f"q{q}", "stages": stages})
    return lines


def write_samples(directory: Path, lines: list[dict[str, Any]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for line in lines:
        jsonl.append(directory / samples_io.SAMPLES_FILE, line)
    meta = {
        "budgets": list(lines[0]["stages"][i]["budget"] for i in range(len(lines[0]["stages"])))
    }
    (directory / samples_io.META_FILE).write_text(json.dumps(meta))
    return directory


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("artifact")
    data = write_samples(root / "data", synthetic_lines(60, BUDGETS))
    path = root / "classifier.zip"
    training.train_artifact(data, path, folds=3)
    return path


# ------------------------------------------------------------------ threshold search


def brute_force(probs, correct, cost, lam) -> float:
    """The best objective over every threshold tuple of the grid, by plain simulation."""
    n, s = probs.shape
    best = -math.inf
    for ts in itertools.product(cascade.THRESHOLD_GRID, repeat=s - 1):
        acc = spent = 0.0
        for q in range(n):
            stop = next((i for i in range(s - 1) if probs[q, i] >= ts[i]), s - 1)
            acc += correct[q, stop]
            spent += cost[q, stop]
        best = max(best, (acc - lam * spent) / n)
    return best


@pytest.mark.parametrize("stages,lam,seed", [(2, 0.0, 0), (3, 0.05, 1), (3, 0.3, 2), (4, 0.1, 3)])
def test_search_matches_brute_force(stages: int, lam: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 12 if stages == 4 else 30
    probs = rng.uniform(size=(n, stages))
    correct = rng.uniform(size=(n, stages)) < probs
    cost = np.cumsum(rng.uniform(0.5, 1.5, size=(n, stages)), axis=1)
    got = cascade.search_thresholds(probs, correct, cost, lam)
    assert got.objective(lam) == pytest.approx(brute_force(probs, correct, cost, lam), abs=1e-12)
    again = cascade.simulate(probs, correct, cost, got.thresholds)
    assert (again.accuracy, again.tflops) == (got.accuracy, got.tflops)


def test_search_recovers_known_optimum() -> None:
    """Right at stage 0 exactly when p0 >= 0.6, at stage 1 exactly when p1 >= 0.3, always at
    stage 2, each stage dearer: the best cascade stops each question at its first right
    stage, which only thresholds (0.6, 0.3) do (probabilities sit between grid points)."""
    dense = np.arange(20) * 0.05 + 0.025
    p0, p1 = (g.ravel() for g in np.meshgrid(dense, dense, indexing="ij"))
    probs = np.stack([p0, p1, np.full_like(p0, 0.5)], axis=1)
    correct = np.stack([p0 >= 0.6, p1 >= 0.3, np.ones_like(p0, dtype=bool)], axis=1)
    cost = np.tile([1.0, 2.0, 4.0], (len(p0), 1))
    for lam in (0.0, 0.01, 0.1):
        got = cascade.search_thresholds(probs, correct, cost, lam)
        assert got.thresholds == (0.6, 0.3, 0.0)
        assert got.accuracy == 1.0
    cheapest = cascade.search_thresholds(probs, correct, cost, 10.0)
    assert cheapest.thresholds[0] == 0.0 and cheapest.stop_share[0] == 1.0
    best = cascade.oracle(correct, cost)
    assert best.accuracy == 1.0 and best.tflops == got.tflops


# ------------------------------------------------------------------ training and artifact


def test_train_drops_constant_questions_and_reports(tmp_path: Path) -> None:
    lines = synthetic_lines(40, BUDGETS, seed=5)
    samples = samples_io.load_samples(write_samples(tmp_path / "d", lines))
    kept = samples.kept()
    assert 0 < kept.sum() < samples.n  # the synthetic set has both kinds
    result = training.train(samples, folds=4)
    cls = result.report["classifier"]
    assert cls["questions_kept"] == int(kept.sum())
    assert cls["rows"] == int(kept.sum()) * len(BUDGETS)
    assert cls["auc"] > 0.8  # difficulty is in the features
    rows = {r["policy"]: r for r in result.report["rows"]}
    assert rows["fixed stage 2 (16 tok)"]["accuracy"] == pytest.approx(
        np.mean([ln["stages"][2]["correct"] for ln in lines])
    )
    assert [p.fraction for p in result.points] == list(cascade.LAMBDA_FRACTIONS)
    assert result.presets["balanced"] == pytest.approx(0.05 / result.cost_scale)
    text = cascade.format_report(result.report)
    assert "oracle" in text and "[balanced]" in text


def test_too_few_varying_questions_is_a_clear_error(tmp_path: Path) -> None:
    lines = synthetic_lines(5, BUDGETS)
    for line in lines:
        for stage in line["stages"]:
            stage["correct"] = False
    with pytest.raises(samples_io.TrainingError, match="at least 2"):
        training.train(samples_io.load_samples(write_samples(tmp_path / "d", lines)))


def test_artifact_round_trip(artifact: Path, tmp_path: Path) -> None:
    loaded = artifact_io.load_artifact(artifact)
    manifest = loaded.manifest
    assert manifest["schema_version"] == artifact_io.SCHEMA_VERSION
    assert manifest["features"]["names"] == list(FEATURE_NAMES)
    assert manifest["features"]["count"] == 25
    assert manifest["features"]["max_tokens"] == 1024
    assert manifest["features"]["text_format"] == "Question: {question}\n\nHint: {hint}\n\nAnswer:"
    assert manifest["budgets"] == list(BUDGETS)
    assert set(manifest["presets"]) == {"quality", "balanced", "economy"}
    prov = manifest["provenance"]
    assert prov["questions"] == 60 and len(prov["data_sha256"]) == 64 and prov["sklearn_version"]
    assert artifact_io.report_path(artifact).exists()
    # the same model: same probabilities as a fresh fit on the same data
    samples = samples_io.load_samples(artifact.parent / "data")
    x = samples.features.reshape(-1, 25)
    fresh = training.train(samples, folds=3).model
    np.testing.assert_allclose(loaded.model.predict_proba(x), fresh.predict_proba(x))


def test_policy_operating_points(artifact: Path) -> None:
    policy = classifier.load_policy(artifact)
    points = policy.points
    assert policy.point_for("quality").lam == 0.0
    assert policy.point_for("balanced").lam == pytest.approx(policy.presets["balanced"])
    assert policy.point_for(0).lam == 0.0
    mid = points[3].lam
    assert policy.point_for(mid * 1.2).lam == mid
    assert policy.point_for(points[1].lam * 0.4).lam == 0.0  # below half the smallest
    assert policy.point_for(1e9).lam == points[-1].lam
    features = samples_io.load_samples(artifact.parent / "data").features[0, 0]
    verdict = policy.judge(features.tolist(), 0, "quality")
    assert verdict.policy == "trained" and 0.0 <= verdict.probability <= 1.0
    assert verdict.threshold == policy.point_for("quality").thresholds[0]
    assert verdict.sufficient == (verdict.probability >= verdict.threshold)
    assert policy.judge(features.tolist(), 2, "quality").threshold == 0.0  # last stage
    with pytest.raises(ConfigurationError, match="25 features"):
        policy.judge([1.0, 2.0], 0, "quality")


def test_train_evaluate_inspect_commands(artifact: Path, tmp_path: Path) -> None:
    """The CLI on synthetic data; evaluate on questions the classifier was not trained on."""
    from click.testing import CliRunner

    from services.cli import cli

    runner = CliRunner()
    data = write_samples(tmp_path / "train", synthetic_lines(30, BUDGETS, seed=7))
    out = tmp_path / "m.zip"
    trained = runner.invoke(cli, ["classifier", "train", "--data", str(data), "--out", str(out)])
    assert trained.exit_code == 0, trained.output
    assert "oracle" in trained.output and "[economy]" in trained.output
    report = json.loads(artifact_io.report_path(out).read_text())
    assert report["classifier"]["questions"] == 30
    other = write_samples(tmp_path / "other", synthetic_lines(20, (0, 8), seed=9))
    args = ["classifier", "evaluate", "--artifact", str(out), "--data", str(other)]
    evaluated = runner.invoke(cli, [*args, "--out", str(tmp_path / "e.json")])
    assert evaluated.exit_code == 0, evaluated.output
    assert "differ from the artifact's" in evaluated.output  # budgets (0, 8) vs (0, 8, 16)
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["classifier"]["evaluated_on"].startswith("data the classifier was not")
    assert len(result["rows"]) == 2 + 1 + len(cascade.LAMBDA_FRACTIONS)
    shown = runner.invoke(cli, ["classifier", "inspect", str(out)])
    assert shown.exit_code == 0 and json.loads(shown.output)["schema_version"] == 1
    missing = runner.invoke(cli, ["classifier", "inspect", str(tmp_path / "nope.zip")])
    assert missing.exit_code != 0


def _rewrite(src: Path, dst: Path, edit) -> Path:
    with zipfile.ZipFile(src) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        blob = archive.read("model.joblib")
    manifest, blob = edit(manifest, blob)
    with zipfile.ZipFile(dst, "w") as archive:
        archive.writestr("manifest.json", json.dumps(manifest))
        archive.writestr("model.joblib", blob)
    return dst


def _bad_artifacts(artifact: Path, tmp: Path) -> Iterator[tuple[Path, str]]:
    yield tmp / "missing.zip", "no such file"
    version = _rewrite(artifact, tmp / "v.zip", lambda m, b: (m | {"schema_version": 99}, b))
    yield version, "schema version 99"

    def rename(m, b):
        m["features"]["names"] = [*FEATURE_NAMES[:-1], "budget_squared"]
        return m, b

    yield _rewrite(artifact, tmp / "names.zip", rename), "feature names differ"
    flipped = _rewrite(artifact, tmp / "flip.zip", lambda m, b: (m, b[:100] + b"X" + b[101:]))
    yield flipped, "checksum"
    sha = __import__("hashlib").sha256

    def garbage(m, b):
        junk = b"not a pickle at all"
        return m | {"model_sha256": sha(junk).hexdigest()}, junk

    yield _rewrite(artifact, tmp / "junk.zip", garbage), "cannot be loaded"
    truncated = tmp / "truncated.zip"
    truncated.write_bytes(artifact.read_bytes()[: artifact.stat().st_size // 2])
    yield truncated, "not a readable classifier artifact"
    text = tmp / "text.zip"
    text.write_text("hello")
    yield text, "not a readable classifier artifact"


def test_incompatible_artifacts_are_rejected(artifact: Path, tmp_path: Path) -> None:
    for path, problem in _bad_artifacts(artifact, tmp_path):
        with pytest.raises(classifier.ClassifierArtifactError) as caught:
            classifier.load_policy(path)
        message = str(caught.value)
        assert problem in message and str(path) in message and "\n" not in message
        assert "tandem classifier train" in message
        assert isinstance(caught.value, ConfigurationError)
        settings = Settings(classifier_artifact=str(path))
        with pytest.raises(classifier.ClassifierArtifactError):
            classifier.check_classifier_artifact(settings)
        with pytest.raises(classifier.ClassifierArtifactError):
            Engines(settings).policy("trained")
        assert Engines(settings).policy("entropy").name == "entropy"
    assert classifier.check_classifier_artifact(Settings(classifier_artifact=None)) is None
    assert classifier.check_classifier_artifact(Settings(classifier_artifact=str(artifact))) is not None


# ------------------------------------------------------------------ feature computation (issue 22)


def _top_k_artifact(tmp_path: Path) -> Path:
    lines = synthetic_lines(40, BUDGETS, seed=11)
    for line in lines:
        for stage in line["stages"]:
            stage["features_exact"] = False
    path = tmp_path / "top_k.zip"
    training.train_artifact(write_samples(tmp_path / "top_k", lines), path, folds=3)
    return path


def test_an_artifact_is_served_only_with_the_feature_computation_it_was_trained_on(
    artifact: Path, tmp_path: Path
) -> None:
    from typing import get_args

    from services.settings import BackendKind

    assert set(artifact_io.COMPUTATION_OF_BACKEND) == set(get_args(BackendKind))
    assert artifact_io.read_manifest(artifact)["features"]["computation"] == "exact"
    http = {"feature_backend": "sglang", "feature_url": "http://127.0.0.1:9"}
    for backend in ("local", "torch"):
        settings = Settings(classifier_artifact=str(artifact), feature_backend=backend)
        assert classifier.check_classifier_artifact(settings) is not None
    served_over_http = [
        Settings(classifier_artifact=str(artifact), **http),
        # the feature model defaults to the executor's, here an OpenAI-compatible server
        Settings(
            classifier_artifact=str(artifact),
            executor_backend="sglang",
            executor_url="http://127.0.0.1:9",
        ),
    ]
    for settings in served_over_http:
        with pytest.raises(classifier.ClassifierArtifactError) as caught:
            classifier.check_classifier_artifact(settings)
        message = str(caught.value)
        assert "trained on exact features" in message and "computes top-k features" in message
        assert "TANDEM_FEATURE_BACKEND=local or torch" in message and "\n" not in message
        assert str(artifact) in message
        with pytest.raises(classifier.ClassifierArtifactError):
            Engines(settings).policy("trained")

    top_k = _top_k_artifact(tmp_path)
    assert artifact_io.read_manifest(top_k)["features"]["computation"] == "top-k"
    assert classifier.check_classifier_artifact(Settings(classifier_artifact=str(top_k), **http))
    with pytest.raises(classifier.ClassifierArtifactError, match="=sglang"):
        classifier.check_classifier_artifact(Settings(classifier_artifact=str(top_k)))
    exact_data = samples_io.load_samples(artifact.parent / "data")
    report = training.evaluate(artifact_io.load_artifact(top_k), exact_data)
    assert "trained on top-k features" in report["warning"]


def test_artifacts_without_the_computation_field(artifact: Path, tmp_path: Path) -> None:
    """Written before `features.computation`: the older `features.exact` flag decides; an
    artifact with neither counts as exact."""

    def without(keys: tuple[str, ...], **features: Any):
        def edit(m, b):
            for key in keys:
                m["features"].pop(key)
            m["features"].update(features)
            return m, b

        return edit

    legacy_http = _rewrite(artifact, tmp_path / "a.zip", without(("computation",), exact=False))
    neither = _rewrite(artifact, tmp_path / "b.zip", without(("computation", "exact")))
    unknown = _rewrite(artifact, tmp_path / "c.zip", without((), computation="top-3"))
    assert artifact_io.load_artifact(legacy_http).computation == "top-k"
    assert artifact_io.load_artifact(neither).computation == "exact"
    assert classifier.check_classifier_artifact(Settings(classifier_artifact=str(neither)))
    with pytest.raises(classifier.ClassifierArtifactError, match="trained on top-k features"):
        classifier.check_classifier_artifact(Settings(classifier_artifact=str(legacy_http)))
    with pytest.raises(classifier.ClassifierArtifactError, match="unknown feature computation"):
        artifact_io.load_artifact(unknown)


def test_samples_mixing_feature_computations_do_not_train(tmp_path: Path) -> None:
    lines = synthetic_lines(10, BUDGETS)
    lines[3]["stages"][1]["features_exact"] = False
    with pytest.raises(samples_io.TrainingError, match="mixes exact features with top-k"):
        samples_io.load_samples(write_samples(tmp_path / "d", lines))


def test_a_worker_refuses_an_artifact_served_with_other_features(
    artifact: Path, tmp_path: Path, redis_url: str
) -> None:
    """A classifier worker started as the tests start every worker, its feature model on an
    OpenAI-compatible server (top-k features), with an artifact trained on exact ones."""
    from tests import infra

    settings = {
        "TANDEM_CLASSIFIER_ARTIFACT": str(artifact),
        "TANDEM_REDIS_URL": redis_url,
        "TANDEM_FEATURE_BACKEND": "sglang",
        "TANDEM_FEATURE_URL": "http://127.0.0.1:9",
    }
    worker = infra.Processes(settings, tmp_path).worker("classifier")
    assert worker.wait(120) == 78  # EX_CONFIG: before taking any message
    log = (tmp_path / "classifier.log").read_text()
    refused = [line for line in log.splitlines() if line.startswith("tandem worker:")]
    assert len(refused) == 1 and "TANDEM_FEATURE_BACKEND" in refused[0]
    assert "Traceback" not in log


# ------------------------------------------------------------------ collection (no model)


def _fake_line(item: collecting.Item, params: JobParams) -> dict[str, Any]:
    return {"id": item.qid, "question": item.question, "stages": []}


@pytest.mark.parametrize("workers", [1, 3])
def test_collect_resumes_without_redoing_or_losing(tmp_path: Path, workers: int) -> None:
    items = [collecting.Item(f"q{i}", i, f"question {i}", "1") for i in range(8)]
    out, params, meta = tmp_path / "c", JobParams(budgets=BUDGETS), {"budgets": list(BUDGETS)}
    calls: list[str] = []
    lock = threading.Lock()

    def one(item: collecting.Item, p: JobParams) -> dict[str, Any]:
        with lock:
            calls.append(item.qid)
        return _fake_line(item, p)

    first = collecting.collect(items[:3], out, params, one, meta, workers)
    assert (first.collected, first.done_before) == (3, 0)

    def interrupted(item: collecting.Item, p: JobParams) -> dict[str, Any]:
        if item.qid == "q4":
            raise KeyboardInterrupt
        return one(item, p)

    with pytest.raises(KeyboardInterrupt):
        collecting.collect(items[:6], out, params, interrupted, meta, workers)
    # a crash in the middle of a write leaves a torn last line: it is cut off, not parsed
    with (out / samples_io.SAMPLES_FILE).open("ab") as handle:
        handle.write(b'{"id":"q5","stag')
    final = collecting.collect(items, out, params, one, meta, workers)
    ids = collecting.collected_ids(out / samples_io.SAMPLES_FILE)
    assert sorted(ids) == [f"q{i}" for i in range(8)]  # none lost, none twice
    assert sorted(calls) == sorted(set(calls)) and len(calls) == 8  # none redone
    assert final.done_before + final.collected == 8
    with pytest.raises(collecting.CollectError, match="budgets"):
        collecting.collect(items, out, JobParams(budgets=(0, 8)), one, {"budgets": [0, 8]})


def test_read_dataset_ids(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [*QUESTIONS, QUESTIONS[0], {"question": "x", "answer": "y", "unique_id": "u/1"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = collecting.read_dataset(path)
    assert len(items) == 4 and items[0].reference == "5" and items[-1].qid == "u/1"
    assert items[0].qid == collecting.read_dataset(path)[0].qid  # stable


# ------------------------------------------------------------------ with the real model


def reference_stats(values: list[float]) -> list[float]:
    """The ten series summaries, written out independently of `sufficiency.series_stats`."""
    m = len(values)
    mean = sum(values) / m
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / m)
    xbar = (m - 1) / 2
    slope = sum((i - xbar) * (v - mean) for i, v in enumerate(values)) / sum(
        (i - xbar) ** 2 for i in range(m)
    )
    steps = [b - a for a, b in itertools.pairwise(values)]
    signs = [1 if d > 0 else -1 for d in steps if d != 0]
    q = max(1, m // 4)
    return [
        mean,
        std,
        max(values),
        min(values),
        slope,
        sum(d > 0 for d in steps) / len(steps),
        sum(d < 0 for d in steps) / len(steps),
        sum(values[:q]) / q,
        sum(values[-q:]) / q,
        float(sum(a != b for a, b in itertools.pairwise(signs))),
    ]


@pytest.fixture(scope="module")
def raw_logits(engines: Engines) -> tuple[list[int], np.ndarray]:
    from tests.infra import reference_logits

    # The weights the engine runs (by default a Q8_0 copy of the packaged Q4_1 file).
    return reference_logits(engines.backend("classifier").model_path, TEXT)  # type: ignore[attr-defined]


def exact_series(tokens: list[int], logits: np.ndarray) -> tuple[list[float], list[float]]:
    logp = logits - logits.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    logprobs = [float(logp[i, tokens[i + 1]]) for i in range(len(tokens) - 1)]
    entropies = [float(-(np.exp(row) * row).sum()) for row in logp[:-1]]
    return logprobs, entropies


@pytest.fixture(scope="module")
def engines(artifact: Path) -> Iterator[Engines]:
    settings = Settings(
        classifier_artifact=str(artifact), local_max_batch=4, local_context=2048, local_threads=1
    )
    engines = Engines(settings)
    yield engines
    engines.close()


@pytest.mark.model
def test_features_equal_reference_from_raw_logits(engines: Engines, raw_logits) -> None:
    from services.core.execution import execute
    from services.core.steps import Judge

    scoring = engines.backend("classifier").score(TEXT, 1024)
    logprobs, entropies = exact_series(*raw_logits)
    tokens = raw_logits[0]
    log_ppl = -sum(logprobs) / len(logprobs)
    want = [
        math.exp(log_ppl),
        log_ppl,
        *reference_stats(entropies),
        *reference_stats(logprobs),
        float(len(tokens)),
        2.0,
        16.0,
    ]
    assert scoring.n_tokens == len(tokens) and scoring.exact
    np.testing.assert_allclose(scoring.token_logprobs, logprobs, atol=1e-3)
    np.testing.assert_allclose(scoring.entropies, entropies, atol=1e-3)
    got = features_from_scoring(scoring, 2, 16)
    assert len(got) == len(want) == 25
    for name, g, w in zip(FEATURE_NAMES, got, want, strict=True):
        assert g == pytest.approx(w, rel=1e-3, abs=2e-3), name
    # the classifier step of a job computes the same features over the same text
    question = "A baker has 3 trays of 12 rolls and sells 20 rolls. How many rolls are left?"
    hint = "Goal: rolls left. Planning: total = 3 * 12 = 36, then subtract the 20 sold."
    judge = Judge(question=question, hint=hint, stage_index=2, budget=16)
    record = execute(0, judge, engines, JobParams(policy="entropy"))
    np.testing.assert_allclose(record.output["features"], want, rtol=1e-3, atol=2e-3)


@pytest.mark.model
def test_top_k_entropy_approximation_error(raw_logits) -> None:
    """What HTTP engines lose: entropies from the top-20 log-probs (+ the actual token)
    against the exact ones, with the true vocabulary size and with the HTTP default."""
    tokens, logits = raw_logits
    _, exact = exact_series(tokens, logits)
    logp = logits - logits.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    errors = {}
    for vocab in (logits.shape[1], 128_000):
        estimates = []
        for i in range(len(tokens) - 1):
            top = set(np.argsort(-logp[i])[:20].tolist()) | {tokens[i + 1]}
            estimates.append(entropy_from_top_k([float(logp[i, t]) for t in top], vocab))
        diff = np.array(estimates) - np.array(exact)
        assert (diff >= -1e-9).all()  # uniform tail: never below the truth
        errors[vocab] = float(np.abs(diff).mean())
    print(f"\ntop-20 entropy MAE (nats): {errors}, mean exact entropy {np.mean(exact):.3f}")
    assert errors[logits.shape[1]] < 1.0


@pytest.mark.model
def test_trained_policy_in_a_tandem_run(engines: Engines, artifact: Path) -> None:
    from services.core.runner import run_job

    params = JobParams(
        budgets=BUDGETS, executor_max_tokens=8, policy="trained", cost_preference="quality"
    )
    result = run_job(JobRequest(question=QUESTIONS[1]["question"], params=params), engines)
    judged = [s for s in result.stages if s.kind == "classifier"]
    assert judged, "the run consulted no classifier"
    policy = classifier.load_policy(artifact)
    thresholds = policy.point_for("quality").thresholds
    for stage in judged:
        assert stage.output["policy"] == "trained"
        index = stage.note.split()[1].rstrip(":")
        assert stage.output["threshold"] == thresholds[int(index)]
        want = policy.probability(stage.output["features"])
        assert stage.output["probability"] == pytest.approx(want, abs=1e-4)
    assert result.stages[-1].kind == "executor"


@pytest.mark.model
def test_collect_embedded_matches_tandem_runs_and_services(
    engines: Engines, tmp_path: Path
) -> None:
    """The embedded collector's stages equal fixed:B jobs of the real strategy, and the
    services collector (fixed:B jobs over REST, here served in-process) agrees."""
    import httpx

    from services.core.runner import run_job

    item = collecting.Item("q0", 0, QUESTIONS[0]["question"], "5")
    params = JobParams(budgets=(0, 8), executor_max_tokens=8)
    line = collecting.collect_question(engines, item, params)
    assert [s["budget"] for s in line["stages"]] == [0, 8]
    for stage in line["stages"]:
        job = run_job(
            JobRequest(
                question=item.question,
                strategy=f"fixed:{stage['budget']}",
                params=JobParams(executor_max_tokens=8),
            ),
            engines,
        )
        assert stage["tflops"] == pytest.approx(job.cost.tflops)
        assert stage["coordinator_tokens"] == job.outcome.summary["coordinator_tokens"]
        assert stage["answer"] == job.outcome.answer
        assert len(stage["features"]) == 25 and stage["reached"]

    jobs: dict[str, dict[str, Any]] = {}

    def api(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer k"
        if request.method == "POST":
            body = json.loads(request.content)
            result = run_job(JobRequest.model_validate(body), engines)
            job_id = f"j{len(jobs)}"
            jobs[job_id] = {"id": job_id, "status": "succeeded", **result.to_json()}
            return httpx.Response(202, json={"id": job_id, "status": "queued"})
        return httpx.Response(200, json=jobs[request.url.path.rsplit("/", 1)[1]])

    collector = collect_remote.ServicesCollector(
        "http://api", "k", engines, poll_s=0.0, transport=httpx.MockTransport(api)
    )
    try:
        remote = collector.collect_question(item, params)
    finally:
        collector.close()
    assert len(jobs) == 2
    for mine, theirs in zip(line["stages"], remote["stages"], strict=True):
        for key in ("correct", "answer", "coordinator_tokens", "tflops", "features"):
            assert mine[key] == pytest.approx(theirs[key]), key


@pytest.mark.model
def test_collect_command_end_to_end(tmp_path: Path, monkeypatch) -> None:
    from click.testing import CliRunner

    from services.cli import cli
    from services.settings import get_settings

    dataset = tmp_path / "q.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in QUESTIONS))
    monkeypatch.setenv("TANDEM_LOCAL_MAX_BATCH", "4")
    monkeypatch.setenv("TANDEM_LOCAL_CONTEXT", "2048")
    get_settings.cache_clear()
    out = tmp_path / "c"
    args = ["classifier", "collect", "--dataset", str(dataset), "--out", str(out)]
    args += ["--budgets", "0,8", "--executor-max-tokens", "4", "--no-progress"]
    runner = CliRunner()
    first = runner.invoke(cli, [*args, "--limit", "1"])
    assert first.exit_code == 0, first.output
    second = runner.invoke(cli, [*args, "--limit", "2", "--workers", "2"])
    assert second.exit_code == 0, second.output
    assert "1 questions collected now, 1 before" in second.output
    lines = [json.loads(x) for x in (out / samples_io.SAMPLES_FILE).read_text().splitlines()]
    assert [ln["index"] for ln in lines] == [0, 1]
    meta = json.loads((out / samples_io.META_FILE).read_text())
    assert meta["budgets"] == [0, 8] and meta["models"]["feature"]["name"]
    bad = runner.invoke(cli, [*(a if a != "0,8" else "0,4" for a in args), "--limit", "3"])
    assert bad.exit_code != 0 and "budgets" in bad.output
    get_settings.cache_clear()


# ------------------------------------------------------------------ torch scoring


@pytest.mark.slow
@pytest.mark.model
def test_torch_scoring_matches_llama_cpp(engines: Engines, model_path: Path) -> None:
    """transformers de-quantizes the GGUF to float32; llama.cpp multiplies the quantized
    weights with 8-bit activations, so values agree only up to quantization noise."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from services.core.backends.torch_scoring import TorchScoringBackend

    backend = TorchScoringBackend(model_path, name="smollm2")
    try:
        texts = [TEXT, classifier_text(QUESTIONS[1]["question"]), TEXT + " 36 - 20 = 16."]
        exact = [engines.backend("classifier").score(t) for t in texts]
        alone = [backend.score(t) for t in texts]
        together: list[Any] = [None] * len(texts)

        def run(i: int) -> None:
            together[i] = backend.score(texts[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(texts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        lp_err, h_err = [], []
        for ref, one, batched in zip(exact, alone, together, strict=True):
            assert one.n_tokens == ref.n_tokens and one.exact
            np.testing.assert_allclose(batched.token_logprobs, one.token_logprobs, atol=1e-3)
            lp_err += list(np.abs(np.subtract(one.token_logprobs, ref.token_logprobs)))
            h_err += list(np.abs(np.subtract(one.entropies, ref.entropies)))
        print(
            f"\ntorch vs llama.cpp: logprob MAE {np.mean(lp_err):.4f} (max {np.max(lp_err):.3f}), "
            f"entropy MAE {np.mean(h_err):.4f} (max {np.max(h_err):.3f}) nats"
        )
        assert np.mean(lp_err) < 0.1 and np.mean(h_err) < 0.1
        assert np.max(lp_err) < 1.0 and np.max(h_err) < 1.0
        f_torch = features_from_scoring(alone[0], 1, 8)
        f_exact = features_from_scoring(exact[0], 1, 8)
        assert f_torch[FEATURE_NAMES.index("log_perplexity")] == pytest.approx(
            f_exact[FEATURE_NAMES.index("log_perplexity")], abs=0.1
        )
        with pytest.raises(Exception, match="only scores"):
            backend.generate(None)  # type: ignore[arg-type]
    finally:
        backend.close()


# ------------------------------------------------------------------ code: labels by the grader

def humaneval_file(tmp_path: Path, n: int) -> Path:
    return write_problems(tmp_path / "code.jsonl", n)


@pytest.fixture(scope="module")
def code_grade():
    """The CLI's labelling function (a real bubblewrap sandbox); skips where bwrap is not
    installed, like the grader's own tests."""
    from services.classifier_cli import _code_grade
    from services.grading.sandbox import SandboxUnavailable, find_bwrap

    try:
        find_bwrap()
    except SandboxUnavailable as error:
        pytest.skip(f"bubblewrap is not installed: run scripts/install_test_deps.sh ({error})")
    return _code_grade()


def test_read_dataset_of_code_problems(tmp_path: Path) -> None:
    items = collecting.read_dataset(humaneval_file(tmp_path, 3))
    assert [i.qid for i in items] == ["Own/0", "Own/1", "Own/2"]
    assert {i.task for i in items} == {"code"} and items[0].reference is None
    assert items[0].job_params == {"task": "code", "entry_point": "has_pair_with_sum"}
    assert collecting.dataset_task(items) == "code"
    params = collecting.item_params(items[0], JobParams(budgets=BUDGETS))
    assert (params.task, params.entry_point, params.budgets) == ("code", "has_pair_with_sum", BUDGETS)
    math_item = collecting.Item("q", 0, "What is 2 + 3?", "5")
    assert collecting.item_params(math_item, JobParams()) == JobParams()  # math: unchanged
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps(PROBLEMS[0]) + "\n" + json.dumps(QUESTIONS[0]) + "\n")
    with pytest.raises(collecting.CollectError, match="line 2: not a HumanEval problem"):
        collecting.read_dataset(mixed)


def test_code_stages_are_labelled_by_the_sandboxed_grader(tmp_path: Path, code_grade) -> None:
    item = collecting.read_dataset(humaneval_file(tmp_path, 1))[0]
    params = collecting.item_params(item, JobParams(budgets=BUDGETS))
    solution = item.problem["prompt"] + PROBLEMS[0]["canonical_solution"]
    right = collecting.label(item, params, f"Here it is:\n```python\n{solution}```", code_grade)
    assert right["correct"] is True and right["verdict"] == "passed"
    assert right["answer"].startswith("from typing import List\n\ndef has_pair_with_sum(")
    wrong = "```python\ndef has_pair_with_sum(numbers, target):\n    return True\n```"
    failed = collecting.label(item, params, wrong, code_grade)
    assert failed["correct"] is False and failed["verdict"] == "failed"
    assert failed["grade_reason"].startswith("AssertionError")
    none = collecting.label(item, params, "no idea", code_grade)
    assert none["answer"] is None and none["verdict"] == "error" and not none["correct"]
    assert none["extraction"] == "has_pair_with_sum: no function named has_pair_with_sum in the reply"
    with pytest.raises(collecting.CollectError, match="labelled by the sandboxed grader"):
        collecting.label(item, params, wrong, None)


def test_evaluate_reports_the_transfer_from_math_to_code(artifact: Path, tmp_path: Path) -> None:
    """A classifier trained on one task, evaluated on another's samples: the cascade per
    operating point against the fixed stages and the oracle, with both tasks named."""
    from click.testing import CliRunner

    from services.cli import cli

    data = write_samples(tmp_path / "code", synthetic_lines(20, BUDGETS, seed=3))
    meta = json.loads((data / samples_io.META_FILE).read_text())
    meta |= {"task": "code", "dataset": "/data/humaneval.jsonl"}
    (data / samples_io.META_FILE).write_text(json.dumps(meta))
    out = tmp_path / "transfer.json"
    args = ["classifier", "evaluate", "--artifact", str(artifact), "--data", str(data)]
    shown = CliRunner().invoke(cli, [*args, "--out", str(out)])
    assert shown.exit_code == 0, shown.output
    assert "trained on math (?), evaluated on code (humaneval.jsonl)" in shown.output
    report = json.loads(out.read_text())
    assert report["transfer"]["evaluated_on"] == {"task": "code", "dataset": "/data/humaneval.jsonl"}
    policies = [row["policy"] for row in report["rows"]]
    assert [p for p in policies if p.startswith("fixed stage")] == [
        f"fixed stage {s} ({b} tok)" for s, b in enumerate(BUDGETS)
    ]
    assert any(p.startswith("oracle") for p in policies)
    assert sum(p.startswith("cascade") for p in policies) == len(cascade.LAMBDA_FRACTIONS)


@pytest.mark.model
def test_collect_command_on_code_problems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code_grade
) -> None:
    from click.testing import CliRunner

    from services.cli import cli
    from services.settings import get_settings

    dataset = humaneval_file(tmp_path, 2)
    monkeypatch.setenv("TANDEM_LOCAL_THREADS", "1")
    monkeypatch.setenv("TANDEM_LOCAL_MAX_BATCH", "4")
    monkeypatch.setenv("TANDEM_GRADER_TIMEOUT_S", "5")
    get_settings.cache_clear()
    out = tmp_path / "c"
    args = ["classifier", "collect", "--dataset", str(dataset), "--out", str(out)]
    args += ["--budgets", "0,8", "--executor-max-tokens", "24", "--no-progress", "--workers", "2"]
    try:
        done = CliRunner().invoke(cli, args)
        assert done.exit_code == 0, done.output
        lines = [json.loads(x) for x in (out / samples_io.SAMPLES_FILE).read_text().splitlines()]
        assert sorted(ln["id"] for ln in lines) == ["Own/0", "Own/1"]
        for line in lines:
            assert line["task"] == "code" and line["reference"] is None
            for stage in line["stages"]:
                assert stage["verdict"] in {"passed", "failed", "timeout", "error"}, stage
                assert stage["correct"] == (stage["verdict"] == "passed")
                assert stage["extraction"].split(": ")[0] in {"has_pair_with_sum", "count_vowels"}
                assert len(stage["features"]) == 25
        meta = json.loads((out / samples_io.META_FILE).read_text())
        assert meta["task"] == "code"
        # the same folder does not take math questions
        math = tmp_path / "math.jsonl"
        math.write_text("".join(json.dumps(r) + "\n" for r in QUESTIONS))
        bad = CliRunner().invoke(cli, ["classifier", "collect", "--dataset", str(math), "--out",
                                       str(out), "--budgets", "0,8", "--executor-max-tokens", "24"])  # fmt: skip
        assert bad.exit_code != 0 and "task 'code' (now 'math')" in bad.output
    finally:
        get_settings.cache_clear()


def test_services_collection_sends_code_jobs(tmp_path: Path) -> None:
    """Through a deployment, a code item's fixed:B jobs carry its task and entry point."""
    import httpx

    item = collecting.read_dataset(humaneval_file(tmp_path, 1))[0]
    posted: list[dict[str, Any]] = []

    def api(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            posted.append(json.loads(request.content))
            return httpx.Response(202, json={"id": "j1", "status": "queued"})
        return httpx.Response(200, json={"id": "j1", "status": "succeeded", "stages": []})

    collector = collect_remote.ServicesCollector(
        "http://api", "k", engines=None, poll_s=0.0, transport=httpx.MockTransport(api)  # type: ignore[arg-type]
    )
    try:
        collector._run(item, JobParams(budgets=BUDGETS, executor_max_tokens=8), 8)
    finally:
        collector.close()
    [body] = posted
    assert body["strategy"] == "fixed:8" and body["question"] == item.question
    assert body["params"]["task"] == "code"
    assert body["params"]["entry_point"] == "has_pair_with_sum"
