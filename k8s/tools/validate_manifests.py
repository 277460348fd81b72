"""Validate rendered Kubernetes manifests offline.

    python k8s/tools/validate_manifests.py [-k 1.32.0] rendered.yaml [more.yaml ...]

Each file is a multi-document YAML stream, as `kubectl kustomize` prints it.

* Built-in kinds are checked with kubernetes-validate against the OpenAPI schemas it bundles
  for the chosen Kubernetes version, in strict mode (unknown fields are errors).
* Custom resources of the operators the deployment relies on (KEDA: keda.sh/...; Prometheus
  Operator: monitoring.coreos.com/...) are checked with the JSON schemas in k8s/schemas/
  (<group prefix>-<kind>.json), which travel with the repository; such a kind without a
  schema there is an error.
* A few cross-references no schema can see: a ScaledObject must target a Deployment and name
  a TriggerAuthentication present in the same stream, with minReplicaCount <= maxReplicaCount.

Exit status 0 when every document passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
DEFAULT_KUBERNETES_VERSION = "1.32.0"


def load_documents(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc]


# API groups whose kinds are validated with the schemas in k8s/schemas/.
CRD_GROUPS = ("keda.sh", "monitoring.coreos.com")


def crd_schema(api_version: str, kind: str) -> dict[str, Any] | None:
    group = api_version.split("/", 1)[0]
    path = SCHEMA_DIR / f"{group.split('.', 1)[0]}-{kind.lower()}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def describe(doc: dict[str, Any]) -> str:
    meta = doc.get("metadata") or {}
    return f"{doc.get('kind')}/{meta.get('name')}"


def validate_document(doc: dict[str, Any], k8s_version: str) -> list[str]:
    api_version = str(doc.get("apiVersion", ""))
    kind = str(doc.get("kind", ""))
    if not api_version or not kind:
        return ["missing apiVersion or kind"]
    if api_version.split("/", 1)[0] in CRD_GROUPS:
        schema = crd_schema(api_version, kind)
        if schema is None:
            return [f"no schema for {api_version} {kind} in {SCHEMA_DIR}"]
        validator = jsonschema.Draft202012Validator(schema)
        return [
            f"{'/'.join(str(p) for p in err.absolute_path) or '<root>'}: {err.message}"
            for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        ]
    try:
        kubernetes_validate.validate(doc, k8s_version, strict=True)
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"no schema for {api_version} {kind} in Kubernetes {k8s_version}: {exc}"]
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(str(p) for p in exc.path) or "<root>"
        return [f"{path}: {exc.message}"]
    return []


def cross_reference(docs: list[dict[str, Any]]) -> list[str]:
    names = {(d.get("kind"), (d.get("metadata") or {}).get("name")) for d in docs}
    errors: list[str] = []
    for doc in docs:
        if doc.get("kind") != "ScaledObject":
            continue
        spec = doc.get("spec") or {}
        target = spec.get("scaleTargetRef") or {}
        kind = target.get("kind", "Deployment")
        if (kind, target.get("name")) not in names:
            errors.append(f"{describe(doc)}: scale target {kind}/{target.get('name')} not found")
        lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            errors.append(f"{describe(doc)}: minReplicaCount {lo} > maxReplicaCount {hi}")
        for trigger in spec.get("triggers") or []:
            ref = trigger.get("authenticationRef")
            if not ref:
                continue
            ref_kind = ref.get("kind", "TriggerAuthentication")
            if ref_kind == "TriggerAuthentication" and (ref_kind, ref.get("name")) not in names:
                errors.append(f"{describe(doc)}: {ref_kind}/{ref.get('name')} not found")
    return errors


def validate_file(path: Path, k8s_version: str) -> list[str]:
    try:
        docs = load_documents(path)
    except yaml.YAMLError as exc:
        return [f"{path}: not valid YAML: {exc}"]
    if not docs:
        return [f"{path}: no documents"]
    errors = [
        f"{path}: {describe(doc)}: {message}"
        for doc in docs
        for message in validate_document(doc, k8s_version)
    ]
    errors += [f"{path}: {message}" for message in cross_reference(docs)]
    if not errors:
        print(f"ok   {path}: {len(docs)} documents valid (Kubernetes {k8s_version}, strict)")
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("-k", "--kubernetes-version", default=DEFAULT_KUBERNETES_VERSION)
    args = parser.parse_args(argv)
    errors: list[str] = []
    for path in args.files:
        errors += validate_file(path, args.kubernetes_version)
    for message in errors:
        print(f"FAIL {message}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
