"""The OpenAI routes in the OpenAPI document (/openapi.json, the /docs page): their
schemas come from the pydantic models in protocol.py, which the routes serialise, so the
reference is what is sent. /v1/batches is merged with the native API's description of it
(services.api.docs.add_paths)."""

from __future__ import annotations

from typing import Any

from services.api.docs import AUTH, IDEMPOTENCY_KEY, add_paths, errors
from services.api.openai.protocol import REQUEST_MODELS, RESPONSE_MODELS

REF = "#/components/schemas/{model}"
ERROR = {"$ref": "#/components/responses/OpenAIError"}


def _schemas() -> dict[str, Any]:
    found: dict[str, Any] = {}
    for model in RESPONSE_MODELS:
        schema = model.model_json_schema(ref_template=REF, mode="serialization")
        found.update(schema.pop("$defs", {}))
        found[model.__name__] = schema
    for model in REQUEST_MODELS:
        schema = model.model_json_schema(ref_template=REF, mode="validation")
        found.update(schema.pop("$defs", {}))
        found[model.__name__] = schema
    items = {"oneOf": [{"$ref": "#/components/schemas/OpenAIBatch"}, {"$ref": "#/components/schemas/Batch"}]}
    found["BatchList"]["properties"]["data"]["items"] = items
    return found


def openai_errors(*codes: int) -> dict[str, Any]:
    return {str(code): ERROR for code in sorted(codes)}


def _json(name: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": REF.format(model=name)}}},
    }


_FILE_ID = {"name": "file_id", "in": "path", "required": True, "schema": {"type": "string"}}
_BATCH_ID = {"name": "batch_id", "in": "path", "required": True, "schema": {"type": "string"}}

add_paths(
    {
        "/v1/models": {
            "get": {
                "summary": "OpenAI: the models (every strategy, Tandem's operating points)",
                "tags": ["OpenAI"],
                "responses": {"200": _json("ModelList", "the models"), **openai_errors(*AUTH)},
            }
        },
        "/v1/models/{model}": {
            "get": {
                "summary": "OpenAI: one model (also fixed:N and tandem@<lambda>)",
                "tags": ["OpenAI"],
                "parameters": [
                    {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": _json("ModelObject", "the model"),
                    **openai_errors(404, *AUTH),
                },
            }
        },
        "/v1/chat/completions": {
            "post": {
                "summary": "OpenAI: a chat completion: the messages become a job, waited for",
                "description": "Plain: the chat.completion when the job ends. `stream: true`: "
                "Server-Sent Events, each `data:` a ChatCompletionChunk, ending `data: [DONE]`. "
                "409: the job was cancelled; 500: the job failed; 504: the job did not end "
                "within TANDEM_OPENAI_WAIT_S (it goes on: poll /v1/jobs/{id}).",
                "tags": ["OpenAI"],
                "parameters": [IDEMPOTENCY_KEY],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": REF.format(model="ChatCompletionRequest")}
                        }
                    },
                },
                "responses": {
                    "200": {
                        "description": "the completion, or (stream) its events",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": REF.format(model="ChatCompletion")}
                            },
                            "text/event-stream": {
                                "schema": {
                                    "type": "string",
                                    "description": "data: <ChatCompletionChunk JSON> events, "
                                    "then data: [DONE]",
                                }
                            },
                        },
                    },
                    **openai_errors(400, 404, 409, 413, 415, 500, 504, *AUTH),
                },
            }
        },
        "/v1/files": {
            "post": {
                "summary": "OpenAI: upload a file (purpose batch), streamed into Postgres",
                "tags": ["OpenAI"],
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "required": ["purpose", "file"],
                                "properties": {
                                    "purpose": {"type": "string", "enum": ["batch"]},
                                    "file": {"type": "string", "format": "binary"},
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json("FileObject", "the file"),
                    **openai_errors(400, 413, 415, *AUTH),
                },
            },
            "get": {
                "summary": "OpenAI: the key's files",
                "tags": ["OpenAI"],
                "parameters": [
                    {"name": "purpose", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 10000},
                    },
                    {"name": "after", "in": "query", "schema": {"type": "string"}},
                    {"name": "order", "in": "query", "schema": {"enum": ["asc", "desc"]}},
                ],
                "responses": {
                    "200": _json("FileList", "a page of files"),
                    **openai_errors(400, *AUTH),
                },
            },
        },
        "/v1/files/{file_id}": {
            "get": {
                "summary": "OpenAI: a file",
                "tags": ["OpenAI"],
                "parameters": [_FILE_ID],
                "responses": {
                    "200": _json("FileObject", "the file"),
                    **openai_errors(404, *AUTH),
                },
            },
            "delete": {
                "summary": "OpenAI: delete a file",
                "tags": ["OpenAI"],
                "parameters": [_FILE_ID],
                "responses": {
                    "200": _json("FileDeleted", "deleted"),
                    **openai_errors(404, *AUTH),
                },
            },
        },
        "/v1/files/{file_id}/content": {
            "get": {
                "summary": "OpenAI: a file's bytes (streamed)",
                "tags": ["OpenAI"],
                "parameters": [_FILE_ID],
                "responses": {
                    "200": {
                        "description": "the bytes",
                        "content": {
                            "application/octet-stream": {
                                "schema": {"type": "string", "format": "binary"}
                            }
                        },
                    },
                    **openai_errors(404, *AUTH),
                },
            }
        },
        "/v1/batches": {
            "post": {
                "summary": "OpenAI: a batch of the input file's chat completion lines "
                "(Content-Type application/json)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": REF.format(model="BatchCreateRequest")}
                        }
                    },
                },
                "responses": {
                    "200": _json("OpenAIBatch", "the OpenAI batch (status failed with its "
                                 "errors when no line is valid)"),
                    **errors(400, 404, 415, 429, 503),
                },
            },
            "get": {
                "parameters": [
                    {
                        "name": "after",
                        "in": "query",
                        "description": "OpenAI paging: the last id of the page before",
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {"200": _json("BatchList", "a page of batches")},
            },
        },
        "/v1/batches/{batch_id}": {
            "get": {
                "parameters": [_BATCH_ID],
                "responses": {"200": _json("OpenAIBatch", "an OpenAI batch")},
            }
        },
        "/v1/batches/{batch_id}/cancel": {
            "post": {
                "parameters": [_BATCH_ID],
                "responses": {"200": _json("OpenAIBatch", "an OpenAI batch")},
            }
        },
    },
    _schemas(),
)
