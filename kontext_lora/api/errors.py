"""Turns pydantic's validation errors into the messages users read: one line per field, camelCase paths."""

from __future__ import annotations

from pydantic import ValidationError

from . import spec

# What each pattern means, in words, for the error message (the regex alone helps nobody).
PATTERN_MEANINGS = {
    spec.S3_OR_FILE_URI: "expected an s3://bucket/prefix/ or file:///path URI",
    spec.MODEL_SOURCE: "expected a hub id (org/name), an s3:// prefix, a file:// URI or an absolute path",
    spec.RELATIVE_DIR: "expected a folder relative to the dataset URI (no leading /)",
    spec.K8S_NAME: "expected a Kubernetes object name (lower-case letters, digits, '-' and '.')",
    spec.QUANTITY: "expected a Kubernetes quantity such as 4, 500m, 48Gi",
    spec.TRIGGER_WORD: 'the trigger word must end with a comma, e.g. "XM,"',
    spec.SECRET_KEY: "expected a Secret key (letters, digits, '-', '_' and '.')",
}


def field_errors(error: ValidationError, root: str = "spec") -> list[str]:
    """`spec.lora.rank: Input should be less than or equal to 128` style lines, one per offending field."""
    lines: list[str] = []
    for item in error.errors(include_url=False):
        path = ".".join([root, *(str(part) for part in item["loc"])]) if root else ".".join(map(str, item["loc"]))
        violations = (item.get("ctx") or {}).get("violations")
        if item["type"] == "cross_field_rule" and violations:
            lines.extend(f"{path}.{field}: {message}" for field, message in violations)
            continue
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing":
            message = "required field is missing"
        elif item["type"] == "string_pattern_mismatch":
            pattern = (item.get("ctx") or {}).get("pattern", "")
            message = f"{PATTERN_MEANINGS.get(pattern, f'should match {pattern}')}, got {item['input']!r}"
        elif item["type"] == "extra_forbidden":
            message = "unknown field (check the spelling against `kubectl explain kontextlorajob.spec`)"
        lines.append(f"{path}: {message}")
    return lines


def describe(error: ValidationError, root: str = "spec") -> str:
    return "; ".join(field_errors(error, root))
