"""The OpenAPI 3 description of the REST API, and a self-contained /docs page.

The page renders the spec itself (no CDN): appliances often sit on networks without internet.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from appliance import __version__

routes = web.RouteTableDef()

_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            "required": ["code", "message"],
        }
    },
}
_IMAGES = {
    "type": "object",
    "properties": {
        "data": {
            "type": "array",
            "items": {"type": "string", "format": "byte"},
            "description": "base64 images",
        },
        "urls": {
            "type": "array",
            "items": {"type": "string", "format": "uri"},
            "description": "needs ALLOW_URL_INPUTS=1",
        },
    },
}
_OPTIONS: dict[str, Any] = {
    "threshold": {"type": "number", "default": 0.6, "minimum": 0, "maximum": 1},
    "embed_only": {
        "type": "boolean",
        "default": False,
        "description": "images are aligned 112x112 crops",
    },
    "return_face_data": {
        "type": "boolean",
        "default": False,
        "description": "base64 JPEG of each aligned crop",
    },
    "return_landmarks": {"type": "boolean", "default": False},
    "extract_embedding": {"type": "boolean", "default": True},
    "extract_ga": {
        "type": "boolean",
        "default": False,
        "description": "reported as null: no gender/age model",
    },
    "detect_masks": {
        "type": "boolean",
        "default": False,
        "description": "reported as null: no mask model",
    },
    "limit_faces": {"type": "integer", "default": 0, "description": "0 = all faces"},
    "min_face_size": {"type": "integer", "default": 0},
    "verbose_timings": {"type": "boolean", "default": False},
    "msgpack": {"type": "boolean", "default": False, "description": "answer in msgpack"},
    "img_req_headers": {"type": "object", "additionalProperties": {"type": "string"}},
    "max_size": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
}
_FACE = {
    "type": "object",
    "properties": {
        "num_det": {"type": "integer"},
        "prob": {"type": "number"},
        "bbox": {"type": "array", "items": {"type": "integer"}, "description": "x1, y1, x2, y2"},
        "size": {"type": "integer"},
        "landmarks": {
            "type": ["array", "null"],
            "items": {"type": "array", "items": {"type": "integer"}},
        },
        "norm": {"type": ["number", "null"]},
        "vec": {"type": ["array", "null"], "items": {"type": "number"}},
        "facedata": {"type": ["string", "null"]},
    },
}
_EXTRACT_RESPONSE = {
    "type": "object",
    "properties": {
        "took": {"type": "object", "properties": {"total_ms": {"type": "number"}}},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "status": {"type": "string", "enum": ["ok", "error"]},
                    "took_ms": {"type": "number"},
                    "faces": {"type": "array", "items": _FACE},
                    "error": {"type": "string"},
                    "code": {"type": "string"},
                },
            },
        },
        "warnings": {"type": "array", "items": {"type": "string"}},
    },
}


def _errors(*codes: int) -> dict[str, Any]:
    return {
        str(c): {"description": "error", "content": {"application/json": {"schema": _ERROR}}}
        for c in codes
    }


def build_spec() -> dict[str, Any]:
    body = {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {"images": _IMAGES, **_OPTIONS},
                }
            },
            "application/msgpack": {"schema": {"type": "object"}},
        },
    }
    multipart = {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "images": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                        },
                        **{k: {"type": "string"} for k in _OPTIONS},
                    },
                }
            }
        },
    }
    extract_ok = {
        "200": {
            "description": "faces per image",
            "content": {
                "application/json": {"schema": _EXTRACT_RESPONSE},
                "application/msgpack": {},
            },
        },
        **_errors(400, 401, 413, 415, 503, 504),
    }
    jpeg_ok = {
        "200": {"description": "image with boxes", "content": {"image/jpeg": {}}},
        **_errors(400, 401, 413, 415, 422, 503),
    }
    json_ok = {
        "200": {
            "description": "ok",
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Face appliance API",
            "version": __version__,
            "description": "InsightFace-REST-compatible face detection and recognition.",
        },
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": {
            "/extract": {
                "post": {
                    "summary": "Detect faces and extract embeddings",
                    "requestBody": body,
                    "responses": extract_ok,
                }
            },
            "/draw_detections": {
                "post": {
                    "summary": "Draw detections on the first image",
                    "requestBody": body,
                    "responses": jpeg_ok,
                }
            },
            "/multipart/extract": {
                "post": {
                    "summary": "/extract with file uploads",
                    "requestBody": multipart,
                    "responses": extract_ok,
                }
            },
            "/multipart/draw_detections": {
                "post": {
                    "summary": "/draw_detections with a file upload",
                    "requestBody": multipart,
                    "responses": jpeg_ok,
                }
            },
            "/info": {
                "get": {"summary": "Version, backend, models, settings", "responses": json_ok}
            },
            "/health/live": {
                "get": {"summary": "Process is up", "security": [], "responses": json_ok}
            },
            "/health/ready": {
                "get": {
                    "summary": "Models loaded and governor not critical",
                    "security": [],
                    "responses": {**json_ok, "503": {"description": "not ready"}},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "text exposition format",
                            "content": {"text/plain": {}},
                        }
                    },
                }
            },
            "/ws/stream": {
                "get": {
                    "summary": "WebSocket live stream (see README: protocol)",
                    "responses": {"101": {"description": "switching protocols"}},
                }
            },
        },
    }


DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Face appliance API</title>
<style>body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}
h2{border-bottom:1px solid #ccc}code,pre{background:#f4f4f4;padding:.1rem .3rem}
.m{display:inline-block;min-width:4rem;font-weight:bold}</style></head>
<body><h1>Face appliance API</h1><p>Machine-readable: <a href="openapi.json">openapi.json</a></p>
<div id="paths">loading...</div>
<script>
fetch("openapi.json").then(r => r.json()).then(spec => {
  const root = document.getElementById("paths"); root.textContent = "";
  for (const [path, ops] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      const h = document.createElement("h2");
      h.innerHTML = `<span class="m">${method.toUpperCase()}</span><code></code>`;
      h.querySelector("code").textContent = path;
      const p = document.createElement("p"); p.textContent = op.summary || "";
      const pre = document.createElement("pre");
      pre.textContent = JSON.stringify({requestBody: op.requestBody, responses: op.responses}, null, 1);
      root.append(h, p, pre);
    }
  }
});
</script></body></html>
"""


@routes.get("/openapi.json")
async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(build_spec())


@routes.get("/docs")
async def docs(request: web.Request) -> web.Response:
    return web.Response(text=DOCS_PAGE, content_type="text/html")
