"""How a GPU class becomes pod scheduling: NVIDIA GPU Feature Discovery labels, the GPU taint, the request.

These are the defaults; the Helm chart's values (operator config) replace them for clusters labelled
differently. 48 GB-class cards are selected with a `Gt` rule on `nvidia.com/gpu.memory` (MiB) rather than
an exact value, which differs between driver versions.
"""

from __future__ import annotations

from pydantic import Field

from .base import ApiModel
from .spec import GpuClass

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
GPU_PRESENT_LABEL = "nvidia.com/gpu.present"


class NodeSelectorRequirement(ApiModel):
    key: str
    operator: str = Field(pattern=r"^(In|NotIn|Exists|DoesNotExist|Gt|Lt)$")
    values: list[str] = Field(default_factory=list)


class Toleration(ApiModel):
    key: str | None = None
    operator: str = Field("Exists", pattern=r"^(Exists|Equal)$")
    value: str | None = None
    effect: str | None = Field(None, pattern=r"^(NoSchedule|PreferNoSchedule|NoExecute)$")


class GpuClassPlacement(ApiModel):
    """Node affinity terms, tolerations and the extended resource for one GPU class."""

    match_expressions: list[NodeSelectorRequirement]
    tolerations: list[Toleration] = Field(
        default_factory=lambda: [Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")]
    )
    resource_name: str = GPU_RESOURCE


def _products(*products: str) -> NodeSelectorRequirement:
    # GFD appends -SHARED to the product when time-slicing or MPS shares the card.
    values = [variant for product in products for variant in (product, f"{product}-SHARED")]
    return NodeSelectorRequirement(key=GPU_PRODUCT_LABEL, operator="In", values=values)


def _memory_above(mib: int) -> NodeSelectorRequirement:
    return NodeSelectorRequirement(key=GPU_MEMORY_LABEL, operator="Gt", values=[str(mib)])


# 48 GB cards report about 46,000-49,152 MiB; anything above 45,000 MiB is the class the guide needs.
DEFAULT_GPU_CLASSES: dict[GpuClass, GpuClassPlacement] = {
    GpuClass.L40S_48GB: GpuClassPlacement(match_expressions=[_products("NVIDIA-L40S"), _memory_above(45000)]),
    GpuClass.RTX4090_48GB: GpuClassPlacement(
        match_expressions=[_products("NVIDIA-GeForce-RTX-4090", "NVIDIA-GeForce-RTX-4090-D"), _memory_above(45000)]
    ),
}
