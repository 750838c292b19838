"""`/openapi.json` generated from the wire types, and Swagger UI at `/docs`, offline.

The schemas come from the msgspec Structs in `api/wire.py` and `api/stream_protocol.py`
(JSON Schema 2020-12, the dialect of OpenAPI 3.1), so the description cannot drift from what
the decoders accept. Only the paths, status codes and examples are written here.

Swagger UI's files come from the `swagger-ui-py` wheel (Swagger UI 5, which renders OpenAPI
3.1; `swagger-ui-bundle` still ships 4.x, which refuses 3.1). No CDN: appliances often sit on
networks without internet.
"""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from aiohttp import web

from appliance import __version__
from appliance.api import gallery_openapi, state
from appliance.api.stream_protocol import CLIENT_TYPES, CLOSE_CODES, SERVER_TYPES
from appliance.api.wire import (
    REQUEST_TYPES,
    RESPONSE_TYPES,
    ExtractOptions,
    known_fields,
    schema_hook,
)
from appliance.config import Settings
from appliance.pipeline.images import encode_jpeg

REF = "#/components/schemas/{name}"
ERROR_STATUSES = {
    "400": "invalid body or field (`invalid_json`, `invalid_field`, `no_images`...)",
    "401": "missing or wrong bearer token",
    "408": "the body did not arrive within BODY_TIMEOUT_S",
    "413": "body over MAX_BODY_BYTES",
    "415": "wrong Content-Type",
    "503": "overloaded or inference paused (Retry-After)",
    "504": "slower than REQUEST_TIMEOUT_S",
}


def swagger_ui_dir() -> Path:
    """The static files of the `swagger-ui-py` wheel, found without importing it (its
    handlers import web frameworks this service does not use)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("swagger-ui-py is not installed (pip install swagger-ui-py)")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


def example_image() -> str:
    """A small grey JPEG: "Try it out" on /extract works as shipped (and finds no face)."""
    grey = np.full((64, 64, 3), 128, dtype=np.uint8)
    return base64.b64encode(encode_jpeg(grey)).decode("ascii")


def ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(name=name)}


def component_schemas(settings: Settings) -> dict[str, Any]:
    types = (*REQUEST_TYPES, *RESPONSE_TYPES, *CLIENT_TYPES, *SERVER_TYPES, *gallery_openapi.TYPES)
    _, components = msgspec.json.schema_components(types, schema_hook=schema_hook, ref_template=REF)
    # The defaults that come from the settings rather than the type.
    for name in ("ExtractRequest", "ConfigMessage"):
        components[name]["properties"]["threshold"]["default"] = settings.det_threshold
    components["ConfigMessage"]["properties"]["max_fps"]["default"] = settings.stream_max_fps
    return components


def multipart_schema(components: dict[str, Any]) -> dict[str, Any]:
    options = components["ExtractRequest"]["properties"]
    properties: dict[str, Any] = {
        "images": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "image files (repeat the field for several)",
        }
    }
    properties.update({k: v for k, v in options.items() if k in known_fields(ExtractOptions)})
    return {"type": "object", "properties": properties, "required": ["images"]}


def build_spec(settings: Settings) -> dict[str, Any]:
    components = component_schemas(settings)
    error = {"application/json": {"schema": ref("ErrorResponse")}}
    errors = {
        code: {"description": text, "content": error} for code, text in ERROR_STATUSES.items()
    }
    extract_ok = {
        "description": "one entry per image, in request order",
        "content": {
            "application/json": {"schema": ref("ExtractResponse")},
            "application/msgpack": {"schema": ref("ExtractResponse")},
        },
    }
    jpeg_ok = {"description": "the first image with boxes drawn", "content": {"image/jpeg": {}}}
    example = {"images": {"data": [example_image()]}, "threshold": settings.det_threshold}
    body = {
        "required": True,
        "content": {
            "application/json": {"schema": ref("ExtractRequest"), "example": example},
            "application/msgpack": {"schema": ref("ExtractRequest")},
        },
    }
    multipart = {
        "required": True,
        "content": {"multipart/form-data": {"schema": multipart_schema(components)}},
    }

    def json_ok(name: str, description: str) -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": ref(name)}}}

    public: dict[str, Any] = {"security": []}
    html_ok = {"200": {"description": "HTML page", "content": {"text/html": {}}}}
    ws_doc = "; ".join(f"{code} {why}" for code, why in CLOSE_CODES.items())
    spec: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "Face appliance",
            "version": __version__,
            "description": "SCRFD detection and ArcFace embeddings, InsightFace-REST compatible.",
        },
        "paths": {
            "/extract": {
                "post": {
                    "operationId": "extract",
                    "summary": "Detect faces and extract embeddings",
                    "requestBody": body,
                    "responses": {"200": extract_ok, **errors},
                }
            },
            "/draw_detections": {
                "post": {
                    "operationId": "draw_detections",
                    "summary": "The first image with its detections drawn",
                    "requestBody": body,
                    "responses": {"200": jpeg_ok, "422": errors["400"], **errors},
                }
            },
            "/multipart/extract": {
                "post": {
                    "operationId": "multipart_extract",
                    "summary": "/extract with file uploads",
                    "requestBody": multipart,
                    "responses": {"200": extract_ok, **errors},
                }
            },
            "/multipart/draw_detections": {
                "post": {
                    "operationId": "multipart_draw_detections",
                    "summary": "/draw_detections with a file upload",
                    "requestBody": multipart,
                    "responses": {"200": jpeg_ok, "422": errors["400"], **errors},
                }
            },
            "/info": {
                "get": {
                    "operationId": "info",
                    "summary": "Version, backend, models, settings",
                    "responses": {"200": json_ok("InfoResponse", "service facts")},
                }
            },
            "/health/live": {
                "get": {
                    "operationId": "health_live",
                    "summary": "The process answers",
                    **public,
                    "responses": {"200": json_ok("Liveness", "alive")},
                }
            },
            "/health/ready": {
                "get": {
                    "operationId": "health_ready",
                    "summary": "Models loaded and the governor not critical",
                    **public,
                    "responses": {
                        "200": json_ok("Readiness", "ready"),
                        "503": json_ok("Readiness", "not ready"),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics",
                    **public,
                    "responses": {
                        "200": {
                            "description": "text exposition format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This description (OpenAPI 3.1)",
                    **public,
                    "responses": {
                        "200": {
                            "description": "OpenAPI document",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
            "/docs": {
                "get": {
                    "operationId": "docs",
                    "summary": "Swagger UI",
                    **public,
                    "responses": html_ok,
                }
            },
            "/": {
                "get": {
                    "operationId": "live_view",
                    "summary": "The live view page (webcam through /ws/stream)",
                    **public,
                    "responses": html_ok,
                }
            },
            "/ws/stream": {
                "get": {
                    "operationId": "ws_stream",
                    "summary": "WebSocket live stream (docs/STREAMS.md)",
                    "description": "Client text messages: "
                    + ", ".join(t.__name__ for t in CLIENT_TYPES)
                    + "; binary messages are JPEG/PNG frames. Server text messages: "
                    + ", ".join(t.__name__ for t in SERVER_TYPES)
                    + f" (schemas under components). Close codes: {ws_doc}.",
                    "responses": {
                        "101": {"description": "switching protocols"},
                        "400": errors["400"] | {"description": "not a WebSocket upgrade"},
                        "401": errors["401"],
                    },
                    "x-client-messages": [ref(t.__name__) for t in CLIENT_TYPES],
                    "x-server-messages": [ref(t.__name__) for t in SERVER_TYPES],
                }
            },
        },
        "components": {"schemas": components},
    }
    spec["paths"].update(gallery_openapi.gallery_paths(ERROR_STATUSES))
    if settings.api_token is not None:
        spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        spec["security"] = [{"bearer": []}]
    return spec


DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Face appliance API</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true});
</script></body></html>
"""


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=request.app[state.OPENAPI_SPEC], content_type="application/json")


async def docs(request: web.Request) -> web.Response:
    return web.Response(text=DOCS_PAGE, content_type="text/html")


def setup_docs(app: web.Application) -> None:
    """/openapi.json (built once per app: the settings fill in defaults) and /docs."""
    app[state.OPENAPI_SPEC] = msgspec.json.encode(build_spec(app[state.SETTINGS]))
    app.router.add_get("/openapi.json", openapi_json, name="openapi")
    app.router.add_get("/docs", docs, name="docs")
    app.router.add_static("/docs/static/", swagger_ui_dir(), name="swagger_ui")
