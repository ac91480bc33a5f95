"""The OpenAPI 3.1 description of the gateway's routes (served at ``/openapi.json``)."""

from __future__ import annotations

from typing import Any

from distillgate.gateway.parse import MAX_TOKENS_CAP

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "code", "reasons"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "code": {"type": ["string", "null"]}, "param": {"type": ["string", "null"]},
                   "reasons": {"type": "array", "items": {"type": "string"}}}}}}

_METADATA = {"type": "object", "additionalProperties": {"type": "string"},
             "properties": {"policy_run_size": {"type": "integer", "minimum": 1, "maximum": 10**9}},
             "description": "policy_user, policy_project_id, policy_run_id, policy_output_type, policy_run_size "
                            "(stripped before forwarding); other keys pass through"}

_MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"enum": ["system", "user", "assistant", "tool", "developer", "function"]},
    "content": {"anyOf": [{"type": "string"}, {"type": "array"}, {"type": "null"}]}}}

_COMMON = {
    # canonical: no surrounding whitespace, no control characters (parse.py refuses anything else with a 400)
    "model": {"type": "string", "minLength": 1,
              "pattern": "^[^\\s\\x00-\\x1f\\x7f]([^\\x00-\\x1f\\x7f]*[^\\s\\x00-\\x1f\\x7f])?$"},
    "n": {"type": "integer", "minimum": 1, "maximum": 128},
    "max_tokens": {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS_CAP},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object"},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    "logit_bias": {"type": "object", "additionalProperties": {"type": "number"}},
    "metadata": _METADATA,
}

_CHAT = {"type": "object", "required": ["model", "messages"], "properties": {
    **_COMMON, "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
    "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS_CAP},
    "logprobs": {"type": "boolean"}, "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
    "response_format": {"type": "object"}, "tools": {"type": "array"}},
    "dependentSchemas": {"top_logprobs": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}}}

_COMPLETIONS = {"type": "object", "required": ["model", "prompt"], "properties": {
    **_COMMON, "prompt": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"},
                                                          "minItems": 1}]},
    "logprobs": {"type": "integer", "minimum": 0, "maximum": 5}}}

_IDENTITY_HEADERS = [
    *({"name": name, "in": "header", "required": False, "schema": {"type": "string"}}
      for name in ("X-Policy-User", "X-Policy-Project", "X-Policy-Run", "X-Policy-Output-Type")),
    {"name": "X-Policy-Run-Size", "in": "header", "required": False,
     "description": "records the whole run will ask for (the extraction monitor's volume signal)",
     "schema": {"type": "string", "pattern": "^[1-9][0-9]{0,8}$"}},
]


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): {"description": "OpenAI-shaped error",
                     "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            for c in codes}


def _inference(schema_ref: str, summary: str) -> dict[str, Any]:
    return {"post": {
        "summary": summary, "parameters": _IDENTITY_HEADERS, "security": [{"bearer": []}],
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{schema_ref}"}}}},
        "responses": {"200": {"description": "the teacher's answer with distillgate.stamp (JSON or SSE)",
                              "content": {"application/json": {"schema": {"type": "object"}},
                                          "text/event-stream": {"schema": {"type": "string"}}}},
                      **_errors(400, 401, 403, 404, 413, 422, 429, 502, 503, 504)}}}


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "distillgate policy gateway", "version": "1"},
        "paths": {
            "/v1/chat/completions": _inference("ChatCompletionRequest", "Chat completion through the policy"),
            "/v1/completions": _inference("CompletionRequest", "Legacy completion through the policy"),
            "/v1/models": {"get": {"summary": "Models the caller's projects may use", "security": [{"bearer": []}],
                                   "responses": {"200": {"description": "model list", "content": {
                                       "application/json": {"schema": {"type": "object"}}}}, **_errors(401)}}},
            "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "ok"}}}},
        },
        "components": {
            "schemas": {"Error": _ERROR, "ChatCompletionRequest": _CHAT, "CompletionRequest": _COMPLETIONS},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
