"""Cross-field rules, written once: the apiserver runs them as CEL, the operator and the trainer in Python.

Each rule lives on the model whose fields it relates. The CRD generator emits every rule as an
`x-kubernetes-validations` entry on that model's schema node; `CrossFieldRules` runs the same rules as a
pydantic model validator, so a local run and `kubectl apply` refuse the same spec with the same message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import GetJsonSchemaHandler, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError


@dataclass(frozen=True)
class CrossFieldRule:
    cel: str
    """CEL expression over `self` (the object the rule sits on), true when the object is valid."""
    message: str
    field_path: str
    """Dotted camelCase path from the rule's object to the field the message is about, e.g. `.checkpoints.saveEvery`."""
    holds: Callable[[Any], bool]
    """The same rule in Python, over the validated model instance."""

    def to_crd(self) -> dict[str, str]:
        return {"rule": self.cel, "message": self.message, "fieldPath": self.field_path, "reason": "FieldValueInvalid"}


class CrossFieldRules:
    """Mixin for API models that carry cross-field rules in `cross_field_rules`."""

    cross_field_rules: ClassVar[tuple[CrossFieldRule, ...]] = ()

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:  # type: ignore[no-untyped-def]
        json_schema = handler(core_schema)
        if cls.cross_field_rules:
            target = handler.resolve_ref_schema(json_schema)
            target["x-kubernetes-validations"] = [rule.to_crd() for rule in cls.cross_field_rules]
        return json_schema

    @model_validator(mode="after")
    def _check_cross_field_rules(self):  # type: ignore[no-untyped-def]
        broken = [rule for rule in self.cross_field_rules if not rule.holds(self)]
        if broken:
            # `violations` lets error formatting name each field (see errors.py); the message stands alone too.
            raise PydanticCustomError(
                "cross_field_rule",
                "; ".join(f"{rule.field_path.lstrip('.')}: {rule.message}" for rule in broken),
                {"violations": [(rule.field_path.lstrip("."), rule.message) for rule in broken]},
            )
        return self
