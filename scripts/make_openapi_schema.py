#!/usr/bin/env python
"""Write .cog/openapi_schema.json for predict.py:Predictor, as ``cog build`` would.

``python -m cog.server.http`` (cog 0.23.1, coglet) validates inputs (422 on out-of-range values,
unknown choices, wrong types) and serves /openapi.json only when this file exists in the
working directory; ``cog build`` writes it from the Go CLI's static parser. Without Docker we
build the same document here: the inputs come from cog's own Python inspector
(``cog._inspector.create_predictor``, the code the runtime uses), and the layout follows the
Go generator ``pkg/schema/openapi_spec.go`` of cog v0.22/0.23 (choices as ``allOf`` + enum
component, ``x-order``, ``nullable`` for Optional inputs, ``minimum``/``maximum``, ``x-cog-accept``).

Usage::

    python scripts/make_openapi_schema.py            # (re)write .cog/openapi_schema.json
    python scripts/make_openapi_schema.py --check    # exit 1 if the file is stale
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_PATH = ROOT / ".cog" / "openapi_schema.json"


def _title(name: str) -> str:
    return " ".join(w[:1].upper() + w[1:] for w in name.split("_"))


def _number(value, integer: bool):
    if value is None:
        return None
    return int(value) if integer and float(value).is_integer() else value


def _constraints(field, integer: bool) -> dict:
    """The description, ranges, lengths, pattern and deprecation of one input, as JSON schema keys."""
    values = {
        "description": field.description,
        "minimum": _number(field.ge, integer),
        "maximum": _number(field.le, integer),
        "minLength": field.min_length,
        "maxLength": field.max_length,
        "pattern": field.regex,
        "deprecated": True if field.deprecated else None,
    }
    return {key: value for key, value in values.items() if value is not None}


def build_schema(module: str = "predict", cls: str = "Predictor") -> dict:
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    import cog
    from cog import _adt
    from cog._inspector import create_predictor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        info = create_predictor(module, cls)
    predictor = getattr(sys.modules[module], cls)
    signature = inspect.signature(predictor.run)

    properties: dict = {}
    required: list[str] = []
    enums: dict = {}
    for name, field in sorted(info.inputs.items(), key=lambda kv: kv[1].order):
        ft = field.type
        nullable = ft.repetition in (_adt.Repetition.OPTIONAL, _adt.Repetition.OPTIONAL_REPEATED)
        integer = ft.primitive is _adt.PrimitiveType.INTEGER
        prop: dict = {"x-order": field.order}
        if field.choices:
            enum_type = ft.primitive.json_type().get("type", "string")
            enums[name] = {"title": name, "description": "An enumeration.", "enum": list(field.choices),
                           "type": enum_type}
            prop["allOf"] = [{"$ref": f"#/components/schemas/{name}"}]
        else:
            prop["title"] = _title(name)
            prop.update(ft.json_type())
        raw = signature.parameters[name].default
        has_default = isinstance(raw, cog.FieldInfo) or raw is not inspect.Parameter.empty
        default = raw.default if isinstance(raw, cog.FieldInfo) else (None if raw is inspect.Parameter.empty else raw)
        if has_default and default is None and not nullable:
            has_default = False  # Go generator: None on a non-Optional field means "required"
        if not has_default and ft.repetition in (_adt.Repetition.REQUIRED, _adt.Repetition.REPEATED):
            required.append(name)
        if has_default:
            prop["default"] = default
        if nullable:
            prop["nullable"] = True
        prop.update(_constraints(field, integer))
        accept = getattr(raw, "accept", None) if isinstance(raw, cog.FieldInfo) else None
        if accept:
            prop["x-cog-accept"] = accept
        properties[name] = prop

    input_schema = {"title": "Input", "type": "object", "properties": properties}
    if required:
        input_schema["required"] = required
    output_schema = info.output.json_type()

    components = {"Input": input_schema, "Output": output_schema, **enums}
    components["PredictionRequest"] = {
        "title": "PredictionRequest", "type": "object",
        "properties": {"id": {"title": "Id", "type": "string"}, "input": {"$ref": "#/components/schemas/Input"}},
    }
    components["PredictionResponse"] = {
        "title": "PredictionResponse", "type": "object",
        "properties": {
            "input": {"$ref": "#/components/schemas/Input"},
            "output": {"$ref": "#/components/schemas/Output"},
            "id": {"title": "Id", "type": "string"},
            "version": {"title": "Version", "type": "string"},
            "created_at": {"title": "Created At", "type": "string", "format": "date-time"},
            "started_at": {"title": "Started At", "type": "string", "format": "date-time"},
            "completed_at": {"title": "Completed At", "type": "string", "format": "date-time"},
            "status": {"title": "Status", "type": "string"},
            "error": {"title": "Error", "type": "string"},
            "logs": {"title": "Logs", "type": "string"},
            "metrics": {"title": "Metrics", "type": "object"},
        },
    }
    components["Status"] = {"title": "Status", "description": "An enumeration.",
                            "enum": ["starting", "processing", "succeeded", "canceled", "failed"], "type": "string"}
    components["HTTPValidationError"] = {
        "title": "HTTPValidationError", "type": "object",
        "properties": {"detail": {"title": "Detail", "type": "array",
                                  "items": {"$ref": "#/components/schemas/ValidationError"}}},
    }
    components["ValidationError"] = {
        "title": "ValidationError", "required": ["loc", "msg", "type"], "type": "object",
        "properties": {
            "loc": {"title": "Location", "type": "array",
                    "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
            "msg": {"title": "Message", "type": "string"},
            "type": {"title": "Error Type", "type": "string"},
        },
    }
    ok = {"200": {"description": "Successful Response", "content": {"application/json": {"schema": {}}}}}
    invalid = {"422": {"description": "Validation Error", "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}}}}
    paths = {
        "/": {"get": {"summary": "Root", "operationId": "root__get", "responses": ok}},
        "/health-check": {"get": {"summary": "Healthcheck", "operationId": "healthcheck_health_check_get",
                                  "responses": ok}},
        "/predictions": {"post": {
            "summary": "Predict", "description": "Run a single prediction on the model",
            "operationId": "predict_predictions_post",
            "requestBody": {"content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/PredictionRequest"}}}},
            "responses": {"200": {"description": "Successful Response", "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/PredictionResponse"}}}}, **invalid},
        }},
        "/predictions/{prediction_id}/cancel": {"post": {
            "summary": "Cancel", "operationId": "cancel_predictions__prediction_id__cancel_post",
            "parameters": [{"required": True, "schema": {"title": "Prediction Id", "type": "string"},
                            "name": "prediction_id", "in": "path"}],
            "responses": {**ok, **invalid},
        }},
    }
    return {"openapi": "3.0.2", "info": {"title": "Cog", "version": cog.__version__}, "paths": paths,
            "components": {"schemas": components}}


def render(schema: dict) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed schema is out of date")
    parser.add_argument("--out", type=Path, default=SCHEMA_PATH)
    args = parser.parse_args(argv)
    text = render(build_schema())
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date: run python scripts/make_openapi_schema.py", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
