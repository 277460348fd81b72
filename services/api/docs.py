"""The OpenAPI 3 document (/openapi.json) and a self-contained docs page (/docs).

Modules that add endpoints add their paths with `add_paths`, beside the code they describe.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

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
    """Add operations; a path some module described already gets the new methods beside its
    own (a DELETE added next to a GET)."""
    for path, operations in paths.items():
        _paths.setdefault(path, {}).update(operations)
    _schemas.update(schemas or {})


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


JOB = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "object": {"type": "string", "enum": ["job"]},
        "status": {
            "type": "string",
            "enum": ["queued", "running", "succeeded", "failed", "cancelled"],
        },
        "strategy": {"type": "string"},
        "answer": {"type": ["string", "null"]},
        "stages": {"type": "array", "items": {"type": "object"}},
        "cost": {"type": "object"},
    },
}

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
                    **ERRORS,
                },
            },
            "get": {
                "summary": "List jobs, newest first",
                "parameters": [
                    {"name": "status", "in": "query", "schema": {"type": "string"}},
                    {"name": "strategy", "in": "query", "schema": {"type": "string"}},
                    {"name": "batch_id", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 200},
                    },
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {"200": {"description": "a page of jobs"}, **ERRORS},
            },
        },
        "/v1/jobs/{job_id}": {
            "get": {
                "summary": "A job with its stages and cost",
                "parameters": [ID_PARAM],
                "responses": {"200": {"description": "the job", **JSON_JOB}, **ERRORS},
            }
        },
        "/v1/jobs/{job_id}/cancel": {
            "post": {
                "summary": "Cancel a job (takes effect at the next stage boundary)",
                "parameters": [ID_PARAM],
                "responses": {"200": {"description": "the job", **JSON_JOB}, **ERRORS},
            }
        },
    },
    {**_request_schemas(), "Job": JOB},
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


def document() -> dict[str, Any]:
    return _openapi_31(
        {
            "openapi": "3.1.0",
            "info": {
                "title": "tandem",
                "version": "1",
                "description": "Reasoning jobs where a large model writes the first insights and a "
                "small model finishes. Errors are application/problem+json.",
            },
            "servers": [{"url": "/"}],
            "security": [{"bearer": []}],
            "paths": dict(_paths),
            "components": {
                "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
                "schemas": dict(_schemas),
                "responses": {
                    "Problem": {
                        "description": "a problem (RFC 9457)",
                        "content": {
                            "application/problem+json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "type": {"type": "string"},
                                        "title": {"type": "string"},
                                        "status": {"type": "integer"},
                                        "detail": {"type": "string"},
                                    },
                                }
                            }
                        },
                    }
                },
            },
        }
    )


@bp.get("/openapi.json")
def openapi() -> Response:
    return jsonify(document())


DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tandem API</title>
<style>body{font:15px system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}
code,pre{background:#f4f4f4;padding:.1rem .3rem;border-radius:3px}
.op{border-left:4px solid #36c;padding:.2rem .8rem;margin:.8rem 0}
.m{font-weight:bold;text-transform:uppercase;margin-right:.5rem}</style></head>
<body><h1>tandem API</h1>
<p>Send <code>Authorization: Bearer &lt;key&gt;</code>. Errors are
<code>application/problem+json</code>. Machine-readable: <a href="/openapi.json">/openapi.json</a>.</p>
<div id="ops">loading...</div>
<script>
fetch('/openapi.json').then(r => r.json()).then(doc => {
  const ops = document.getElementById('ops'); ops.textContent = '';
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(item)) {
      const div = document.createElement('div'); div.className = 'op';
      const head = document.createElement('div');
      const m = document.createElement('span'); m.className = 'm'; m.textContent = method;
      const p = document.createElement('code'); p.textContent = path;
      head.append(m, p); div.append(head);
      const s = document.createElement('div'); s.textContent = op.summary || ''; div.append(s);
      const codes = document.createElement('small');
      codes.textContent = 'responses: ' + Object.keys(op.responses || {}).join(', ');
      div.append(codes); ops.append(div);
    }
  }
});
</script></body></html>"""


@bp.get("/docs")
def docs_page() -> Response:
    return Response(DOCS_PAGE, mimetype="text/html")
