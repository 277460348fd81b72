"""GET /v1/models and GET /v1/models/{model}: every strategy, and Tandem's operating points
(services/api/openai/catalog.py)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from services.api.auth import authenticate
from services.api.openai import catalog
from services.api.openai.protocol import ModelList

bp = Blueprint("models", __name__)


@bp.get("/models")
def list_models() -> Response:
    authenticate()
    models = ModelList(data=[model.to_object() for model in catalog.listed()])
    return jsonify(models.model_dump(mode="json"))


@bp.get("/models/<path:model>")
def get_model(model: str) -> Response:
    authenticate()
    return jsonify(catalog.resolve(model).to_object().model_dump(mode="json"))
