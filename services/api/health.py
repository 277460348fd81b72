"""Liveness and readiness."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify
from sqlalchemy import text

from services.api.problems import problem_response
from services.broker import BrokerUnavailable
from services.storage.db import get_engine

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response:
    problems = []
    try:
        with get_engine(current_app.config["TANDEM"].database_url).connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as error:  # any failure means not ready
        problems.append(f"database: {str(error).splitlines()[0][:200]}")
    try:
        current_app.extensions["tandem.admission"].broker.ping()
    except BrokerUnavailable as error:
        problems.append(str(error)[:200])
    if problems:
        return problem_response(503, "; ".join(problems), headers={"Retry-After": "5"})
    return jsonify({"status": "ready"})
