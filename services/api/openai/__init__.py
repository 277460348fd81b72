"""The OpenAI-compatible surface: the same jobs, queues and costs, spoken as OpenAI's API,
so the official SDKs, LiteLLM and Batch-API files work with only `base_url` and `api_key`
changed (docs/openai.md). One file per endpoint, as in SGLang's entrypoints:

    models.py            GET /v1/models, GET /v1/models/{model}
    chat_completions.py  POST /v1/chat/completions (plain and streamed): a job, waited for
    files.py             /v1/files: upload (streamed into Postgres), list, get, content, delete
    batches.py           OpenAI-format batches, served on the native /v1/batches routes
                         (create_app hands them over: see `batches.take_over`)
    errors.py            OpenAI's error shape for every failure on these routes
    protocol.py          the request and response models (pydantic), framework-free
    catalog.py           model ids <-> strategies and operating points
    mapping.py           requests -> jobs, jobs -> completions and batch output lines
    waiting.py           waking a waiting request when its job changes (LISTEN/NOTIFY)
    reference.py         these routes in the OpenAPI document (/openapi.json, /docs)

`bp` is the one blueprint to register (prefix /v1); its children are the routes above.
"""

from __future__ import annotations

from flask import Blueprint, current_app

from services.api.openai import chat_completions, errors, files, models, reference

del reference  # imported for its OpenAPI paths (services.api.docs.add_paths)

bp = Blueprint("openai", __name__, url_prefix="/v1")
for child in (models.bp, chat_completions.bp, files.bp):
    bp.register_blueprint(child)
errors.install(bp, lambda: current_app.config.get("MAX_CONTENT_LENGTH"))

__all__ = ["bp"]
