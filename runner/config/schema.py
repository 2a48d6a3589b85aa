"""The JSON Schema of a config file (``dq-run schema``), from the pydantic models.

Every scalar also accepts a ``${VAR:-default}`` reference string, since those are expanded only
when the file is loaded.
"""

from __future__ import annotations

from typing import Any

from runner.config.models import PipelineConfig

_REFERENCE_SCHEMA = {"type": "string", "pattern": r"\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}"}


_LEAF_TYPES = ("string", "integer", "number", "boolean")


_DOC_KEYS = ("title", "description", "default", "examples")


def config_json_schema() -> dict[str, Any]:
    """JSON Schema of a config file; every scalar also accepts a ``${VAR:-default}`` string."""
    schema: dict[str, Any] = _allow_references(PipelineConfig.model_json_schema())
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "distributed-queue pipeline (dq-run)"
    return schema


def _allow_references(node: Any) -> Any:
    if isinstance(node, list):
        return [_allow_references(item) for item in node]
    if not isinstance(node, dict):
        return node
    # ge/gt leak into a nullable field's schema as non-standard keys; minimum says it already.
    out = {k: _allow_references(v) for k, v in node.items() if k not in ("ge", "gt", "le", "lt")}
    if isinstance(out.get("anyOf"), list):
        # Flatten the anyOf-of-anyOf that wrapping each branch makes, and list the reference once.
        branches: list[Any] = []
        for branch in out["anyOf"]:
            inner = branch.get("anyOf") if isinstance(branch, dict) and len(branch) == 1 else None
            for item in inner if isinstance(inner, list) else [branch]:
                if item not in branches:
                    branches.append(item)
        out["anyOf"] = branches
    elif out.get("type") in _LEAF_TYPES or "enum" in out or "const" in out:
        docs = {key: out.pop(key) for key in _DOC_KEYS if key in out}
        return {**docs, "anyOf": [out, _REFERENCE_SCHEMA]}
    return out
