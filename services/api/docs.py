"""The OpenAPI 3 document (/openapi.json) and the interactive reference (/docs: Swagger UI,
its files served from the flask-swagger-ui package, so the page needs no network).

Modules that add endpoints add their paths with `add_paths`, beside the code they describe.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, abort, jsonify, send_from_directory

from services.api import pages
from services.core.params import MAX_STAGES
from services.core.requests import JobRequest
from services.core.strategies import STRATEGIES

bp = Blueprint("docs", __name__)

PROBLEM = {"$ref": "#/components/responses/Problem"}
ERRORS = {str(code): PROBLEM for code in (400, 401, 404, 413, 415, 422, 429, 503)}
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 200},
}

_paths: dict[str, Any] = {}
_schemas: dict[str, Any] = {}


def add_paths(paths: dict[str, Any], schemas: dict[str, Any] | None = None) -> None:
    """Publish operations (and their schemas). An operation two modules describe (the
    native and the OpenAI batch API share /v1/batches) is merged: both request bodies,
    every response code, and a response both describe differently as a oneOf."""
    for path, item in paths.items():
        operations = _paths.setdefault(path, {})
        for method, operation in item.items():
            if method in operations:
                operations[method] = _merge_operation(operations[method], operation)
            else:
                operations[method] = copy.deepcopy(operation)
    _schemas.update(schemas or {})


def _merge_operation(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(old)
    if new.get("summary") and new["summary"] != old.get("summary"):
        merged["summary"] = f"{old.get('summary', '')}; {new['summary']}".strip("; ")
    if new.get("description"):
        merged["description"] = "\n\n".join(
            part for part in (old.get("description"), new["description"]) if part
        )
    names = {(p.get("name"), p.get("in")) for p in merged.get("parameters", [])}
    for parameter in new.get("parameters", []):
        if (parameter.get("name"), parameter.get("in")) not in names:
            merged.setdefault("parameters", []).append(copy.deepcopy(parameter))
    if "requestBody" in new:
        body = merged.setdefault("requestBody", {"content": {}})
        body["content"].update(copy.deepcopy(new["requestBody"]["content"]))
        body["required"] = body.get("required", False) or new["requestBody"].get("required", False)
    responses = merged.setdefault("responses", {})
    for code, response in new.get("responses", {}).items():
        if code not in responses:
            responses[code] = copy.deepcopy(response)
        elif response != responses[code]:
            responses[code] = _either(responses[code], response)
    return merged


def _either(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """One response that is either `old` or `new` (a oneOf per media type)."""
    if "$ref" in old or "$ref" in new:
        return old  # a shared error response: the same for both
    merged = {"description": f"{old.get('description', '')}; or {new.get('description', '')}"}
    content: dict[str, Any] = copy.deepcopy(old.get("content", {}))
    for media, spec in new.get("content", {}).items():
        if media in content and content[media].get("schema") != spec.get("schema"):
            first = content[media]["schema"]
            choices = first.get("oneOf", [first])
            content[media] = {"schema": {"oneOf": [*choices, spec["schema"]]}}
        else:
            content[media] = copy.deepcopy(spec)
    if content:
        merged["content"] = content
    return merged


def _request_schemas() -> dict[str, Any]:
    """JobRequest and JobParams as JSON Schema, generated from the pydantic models that
    validate requests, so the document cannot drift from what the API accepts."""
    schema = JobRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    definitions = schema.pop("$defs", {})
    schema["properties"]["question"]["minLength"] = 1
    schema["properties"]["question"]["description"] = "Limit: TANDEM_MAX_QUESTION_CHARS (8000)."
    schema["properties"]["strategy"]["description"] = (
        f"One of {', '.join(STRATEGIES)} (N a whole number of tokens)."
    )
    budgets = definitions["JobParams"]["properties"]["budgets"]
    budgets.update(minItems=1, maxItems=MAX_STAGES, description="Strictly increasing.")
    return {"JobRequest": schema, **definitions}


NUMBER = {"type": "number"}
INTEGER = {"type": "integer"}
TIMESTAMP = {"type": ["string", "null"], "format": "date-time"}
COST = {
    "type": "object",
    "description": "Sums over stage records: the paper's TFLOPs (generated tokens), prefill "
    "TFLOPs (uncached prompt tokens and the classifier's scoring pass), tokens.",
    "required": ["tflops", "prefill_tflops", "prompt_tokens", "cached_prompt_tokens", "generated_tokens"],
    "properties": {
        "tflops": NUMBER,
        "prefill_tflops": NUMBER,
        "prompt_tokens": INTEGER,
        "cached_prompt_tokens": INTEGER,
        "generated_tokens": INTEGER,
    },
}
STAGE = {
    "type": "object",
    "description": "One executed stage of a job.",
    "required": ["seq", "kind", "role", "model", "prompt_tokens", "generated_tokens", "tflops"],
    "properties": {
        "seq": INTEGER,
        "kind": {"type": "string", "description": "coordinator, classifier, executor, draft, ..."},
        "role": {"type": "string", "enum": ["coordinator", "classifier", "executor"]},
        "model": {"type": "string"},
        "prompt_tokens": INTEGER,
        "cached_prompt_tokens": INTEGER,
        "generated_tokens": INTEGER,
        "tflops": NUMBER,
        "prefill_tflops": NUMBER,
        "latency_s": NUMBER,
        "note": {"type": "string"},
        "output": {
            "type": "object",
            "description": "A generation: text, finish_reason; the classifier: probability, "
            "threshold, sufficient, policy, features.",
        },
        "attempt": INTEGER,
        "created_at": TIMESTAMP,
    },
}
JOB_STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"]
JOB = {
    "type": "object",
    "required": ["id", "object", "status", "strategy", "question", "params", "created_at"],
    "properties": {
        "id": {"type": "string"},
        "object": {"type": "string", "enum": ["job"]},
        "status": {"type": "string", "enum": JOB_STATUSES},
        "strategy": {"type": "string"},
        "question": {"type": "string"},
        "params": {"type": "object", "description": "The params that differ from the defaults."},
        "answer": {"type": ["string", "null"]},
        "final_text": {"type": ["string", "null"]},
        "summary": {"type": "object"},
        "error": {"type": ["string", "null"]},
        "batch_id": {"type": ["string", "null"]},
        "custom_id": {"type": ["string", "null"]},
        "cancel_requested": {"type": "boolean"},
        "created_at": TIMESTAMP,
        "started_at": TIMESTAMP,
        "finished_at": TIMESTAMP,
        "status_url": {"type": "string"},
        "stages": {
            "type": "array",
            "items": {"$ref": "#/components/schemas/Stage"},
            "description": "Only on GET /v1/jobs/{job_id}.",
        },
        "cost": {"$ref": "#/components/schemas/Cost"},
        "timings": {
            "type": "object",
            "properties": {
                "queued_s": {"type": ["number", "null"]},
                "running_s": {"type": ["number", "null"]},
                "total_s": {"type": ["number", "null"]},
            },
        },
    },
}
JOB_PAGE = {
    "type": "object",
    "required": ["object", "data", "has_more", "next_cursor"],
    "properties": {
        "object": {"type": "string", "enum": ["list"]},
        "data": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}},
        "has_more": {"type": "boolean"},
        "next_cursor": {"type": ["string", "null"]},
    },
}


def errors(*codes: int) -> dict[str, Any]:
    """The error responses a route really gives (each an application/problem+json)."""
    return {str(code): PROBLEM for code in sorted(codes)}


# Every authenticated route: a bad key (401), the key's rate (429), the database (503).
AUTH = (401, 429, 503)

ID_PARAM = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
JSON_JOB = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Job"}}}}

add_paths(
    {
        "/healthz": {
            "get": {
                "summary": "Liveness",
                "security": [],
                "responses": {"200": {"description": "up"}},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: database and broker reachable",
                "security": [],
                "responses": {"200": {"description": "ready"}, "503": PROBLEM},
            }
        },
        "/v1/jobs": {
            "post": {
                "summary": "Submit a reasoning job",
                "parameters": [IDEMPOTENCY_KEY],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}}
                    },
                },
                "responses": {
                    "202": {"description": "accepted", **JSON_JOB},
                    "200": {
                        "description": "the job this Idempotency-Key already created",
                        **JSON_JOB,
                    },
                    **errors(400, 413, 415, 422, *AUTH),
                },
            },
            "get": {
                "summary": "List jobs, newest first",
                "parameters": [
                    {"name": "status", "in": "query", "schema": {"type": "string"}},
                    {"name": "strategy", "in": "query", "schema": {"type": "string"}},
                    {"name": "batch_id", "in": "query", "schema": {"type": "string"}},
                    *pages.OPENAPI_PARAMETERS,
                ],
                "responses": {
                    "200": {
                        "description": "a page of jobs (without their stages)",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/JobPage"}}
                        },
                    },
                    **errors(400, *AUTH),
                },
            },
        },
        "/v1/jobs/{job_id}": {
            "get": {
                "summary": "A job with its stages and cost",
                "parameters": [ID_PARAM],
                "responses": {"200": {"description": "the job", **JSON_JOB}, **errors(404, *AUTH)},
            }
        },
        "/v1/jobs/{job_id}/cancel": {
            "post": {
                "summary": "Cancel a job (takes effect at the next stage boundary)",
                "parameters": [ID_PARAM],
                "responses": {
                    "200": {"description": "the job (without its stages)", **JSON_JOB},
                    **errors(404, *AUTH),
                },
            }
        },
    },
    {
        **_request_schemas(),
        "Job": JOB,
        "JobPage": JOB_PAGE,
        "Stage": STAGE,
        "Cost": COST,
    },
)


def _openapi_31(node: Any) -> Any:
    """Schemas written OpenAPI 3.0 style ("nullable": true) in JSON Schema 2020-12 form."""
    if isinstance(node, list):
        return [_openapi_31(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _openapi_31(value) for key, value in node.items()}
    if node.pop("nullable", False) and isinstance(node.get("type"), str):
        node["type"] = [node["type"], "null"]
    return node


PROBLEM_SCHEMA = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "batch_id": {"type": "string", "description": "a rejected upload's failed batch"},
        "errors": {"type": "array", "items": {"type": "object"}},
        "error": {
            "$ref": "#/components/schemas/ErrorObject",
            "description": "On /v1/batches, shared with the OpenAI API: the same error in "
            "OpenAI's shape, so an OpenAI SDK reads its message.",
        },
    },
}


# Operations are grouped on the page by these tags (by path), unless they name their own.
TAGS = (
    ("/v1/jobs", "Jobs"),
    ("/v1/batches", "Batches (native and OpenAI)"),
    ("/v1/dashboard", "Dashboard"),
    ("/", "Health"),
)


def _tagged(paths: dict[str, Any]) -> dict[str, Any]:
    tagged = copy.deepcopy(paths)
    for path, item in tagged.items():
        tag = next(name for prefix, name in TAGS if path.startswith(prefix))
        for operation in item.values():
            operation.setdefault("tags", [tag])
    return tagged


def document() -> dict[str, Any]:
    return _openapi_31(
        {
            "openapi": "3.1.0",
            "info": {
                "title": "tandem",
                "version": "1",
                "description": "Reasoning jobs where a large model writes the first insights and a "
                "small model finishes. Authorize with an API key (Bearer). Errors are "
                "application/problem+json; on the OpenAI-compatible routes (tag OpenAI) they "
                "are OpenAI's `{\"error\": {...}}` (docs/openai.md).",
            },
            "servers": [{"url": "/"}],
            "security": [{"bearer": []}],
            "paths": _tagged(_paths),
            "components": {
                "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
                "schemas": dict(_schemas),
                "responses": {
                    "Problem": {
                        "description": "a problem (RFC 9457)",
                        "content": {"application/problem+json": {"schema": PROBLEM_SCHEMA}},
                    },
                    "OpenAIError": {
                        "description": "an error in OpenAI's shape (the OpenAI routes)",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/ErrorResponse"}
                            }
                        },
                    },
                },
            },
        }
    )


@bp.get("/openapi.json")
def openapi() -> Response:
    return jsonify(document())


# The page is Swagger UI, served from the files of the `flask-swagger-ui` package (no CDN:
# the page works offline). Only these files are served.
SWAGGER_FILES = ("swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png", "favicon-16x16.png")

DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tandem API reference</title>
<link rel="stylesheet" href="/docs/assets/swagger-ui.css">
<link rel="icon" type="image/png" href="/docs/assets/favicon-32x32.png" sizes="32x32">
<style>body{margin:0}</style></head>
<body><noscript>This page needs JavaScript. The document itself:
<a href="/openapi.json">/openapi.json</a>.</noscript>
<div id="swagger-ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script src="/docs/init.js"></script>
</body></html>"""

# validatorUrl null: no request to the public validator (offline, and nothing leaks).
INIT_JS = """window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  persistAuthorization: true,
  displayRequestDuration: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout"
});"""


def _swagger_dir() -> Path:
    import flask_swagger_ui

    return Path(flask_swagger_ui.__file__).parent / "dist"


@bp.get("/docs")
def docs_page() -> Response:
    return Response(DOCS_PAGE, mimetype="text/html")


@bp.get("/docs/init.js")
def docs_init() -> Response:
    return Response(INIT_JS, mimetype="text/javascript")


@bp.get("/docs/assets/<name>")
def docs_asset(name: str) -> Response:
    if name not in SWAGGER_FILES:
        abort(404)
    response = send_from_directory(_swagger_dir(), name, max_age=86400)
    return response
