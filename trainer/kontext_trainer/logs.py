"""Structured logs: JSON lines in the pod (one object per line, fields as keys), readable text locally.

Both formatters redact the values of credential environment variables from what they produce, so a secret
that ends up in an exception message (a URL with a key in it, say) never reaches the log; the termination
message is redacted the same way.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime

SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
REDACTED = "***"
NOISY_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "kubernetes", "httpx", "filelock")


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    environ = os.environ if environ is None else environ
    # Values shorter than 4 characters would redact ordinary words; real keys are far longer.
    return sorted({environ[k] for k in SECRET_ENV if len(environ.get(k, "")) >= 4}, key=len, reverse=True)


def redact(text: str, secrets: list[str] | None = None) -> str:
    for secret in secret_values() if secrets is None else secrets:
        text = text.replace(secret, REDACTED)
    return text


class _Redacting(logging.Formatter):
    """Formats, then replaces credential values: whatever handler carries the formatter, nothing leaks."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.secrets = secret_values()

    def format(self, record: logging.LogRecord) -> str:
        text = self.render(record)
        return redact(text, self.secrets) if self.secrets else text

    def render(self, record: logging.LogRecord) -> str:
        return super().format(record)


class JsonFormatter(_Redacting):
    """`{"time": ..., "level": ..., "logger": ..., "message": ..., <fields>}` per line."""

    def render(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(_Redacting):
    """`12:00:01 INFO message key=value ...` for terminals."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S")

    def render(self, record: logging.LogRecord) -> str:
        text = super().render(record)
        fields = getattr(record, "fields", None)
        if fields:
            text += " " + " ".join(f"{k}={_short(v)}" for k, v in fields.items())
        return text


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def setup_logging(json_lines: bool, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, "_kontext", False):
            root.removeHandler(existing)
    handler._kontext = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # diffusers/transformers log through their own loggers at warning level; keep them quiet but visible.
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def fields(**values: object) -> dict[str, dict[str, object]]:
    """`log.info("step", extra=fields(step=1, loss=0.5))`: structured fields of a log record."""
    return {"extra": {"fields": values}}
