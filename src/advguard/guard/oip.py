"""The Open Inference Protocol v2 (KServe/Triton) wire format of the guard's answers: the
request body's OpenAPI schema, model metadata and the infer response built from the guard's own
answer."""

from __future__ import annotations

from typing import Any

from advguard.guard.serving import ServedModel

V2_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "inputs": {
                            "type": "array",
                            "maxItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["name", "shape", "datatype", "data"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "shape": {"type": "array", "items": {"type": "integer"}},
                                    "datatype": {"type": "string"},
                                    "data": {"type": "array", "items": {}},
                                },
                            },
                        },
                    },
                }
            }
        },
    }
}


def v2_metadata(m: ServedModel) -> dict[str, Any]:
    """``GET /v2/models/{name}``: the model's name, version and tensor signature."""
    spec = m.spec
    dtype = "BYTES" if m.kind == "text" else "FP32"
    return {
        "name": m.name,
        "versions": [m.version],
        "platform": "advguard-guard",
        "inputs": [{"name": "input-0", "datatype": dtype, "shape": [-1, *spec.shape]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, spec.num_classes]},
            {"name": "label", "datatype": "INT64", "shape": [-1]},
        ],
    }


def _tensor(name: str, rows: list[list[Any]], datatype: str) -> dict[str, Any]:
    k = len(rows[0]) if rows else 0
    return {
        "name": name,
        "shape": [len(rows), k],
        "datatype": datatype,
        "data": [v for row in rows for v in row],
    }


def v2_response(b: dict[str, Any], request_id: str | None) -> dict[str, Any]:
    """The v2 infer response for the guard's answer ``b`` (labels, optional probabilities or
    top-k, decision id and action as parameters)."""
    n = len(b["labels"])
    outputs: list[dict[str, Any]] = []
    if "probabilities" in b:
        outputs.append(_tensor("probabilities", b["probabilities"], "FP32"))
    outputs.append({"name": "label", "shape": [n], "datatype": "INT64", "data": b["labels"]})
    if "top_k" in b:
        labels = [[e["label"] for e in row] for row in b["top_k"]]
        probs = [[e["probability"] for e in row] for row in b["top_k"]]
        outputs.append(_tensor("top_k_labels", labels, "INT64"))
        outputs.append(_tensor("top_k_probabilities", probs, "FP32"))
    out: dict[str, Any] = {
        "model_name": b["model"],
        "model_version": b["model_version"],
        "outputs": outputs,
        "parameters": {"decision_id": b["decision_id"], "action": b["action"]},
    }
    if request_id is not None:
        out["id"] = request_id
    return out
