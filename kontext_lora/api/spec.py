"""The KontextLoRAJob spec: the single source of truth for the CRD, the operator and the trainer.

Defaults follow the users' guide (ostris AI-Toolkit's Kontext recipe): rank 32, bf16, steps = pairs × 100
(3000 while the pair count is unknown), save every 250 steps, keep the newest 4, resolution 1024.
Nothing here imports torch: the operator image must stay small.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, ClassVar, Literal

from pydantic import Field, StrictBool, StrictInt, field_validator

from .base import ApiModel
from .rules import CrossFieldRule, CrossFieldRules

S3_OR_FILE_URI = r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|file://.+)$"
MODEL_SOURCE = (
    r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|file://.+|/.+|[A-Za-z0-9][A-Za-z0-9._\-]*/[A-Za-z0-9._\-]+)$"
)
RELATIVE_DIR = r"^[^/].*$"
# A `..` segment anywhere in a relative folder (RE2 and Python alike: CEL's matches() uses RE2).
PARENT_SEGMENT = r"(^|/)[.][.](/|$)"
K8S_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
TRIGGER_WORD = r"^\S.*,$"
# 256 is for small models (the CPU demo's toy base); 768 and [512, 768] follow ai-toolkit's Kontext example.
Resolution = Literal[256, 512, 768, 1024]
QUANTITY = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
SECRET_KEY = r"^[-._a-zA-Z0-9]+$"
HUB_TOKEN_KEY = "HF_TOKEN"

DEFAULT_BASE_MODEL = "black-forest-labs/FLUX.1-Kontext-dev"
CACHE_FOLDER = "kontext-lora-cache"
AUTO_STEPS_WHEN_PAIRS_UNKNOWN = 3000
MAX_GPUS_PER_NODE, MAX_NODES, MAX_WORLD_SIZE = 8, 16, 64


class DType(StrEnum):
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class GpuClass(StrEnum):
    """48 GB-class cards the users' guide names. The node labels each maps to live in the operator's config."""

    L40S_48GB = "L40S-48GB"
    RTX4090_48GB = "RTX4090-48GB"


class SecretKeySelector(ApiModel):
    """A key of a Secret in the job's namespace, handed to the pods by `secretKeyRef` (never read by the operator)."""

    name: Annotated[str, Field(max_length=253, pattern=K8S_NAME)] = Field(description="Name of the Secret.")
    key: Annotated[str, Field(min_length=1, max_length=253, pattern=SECRET_KEY)] = Field(
        HUB_TOKEN_KEY, description="Key in the Secret whose value is the token."
    )


class ModelSpec(ApiModel):
    """The base model the LoRA is trained against."""

    base: Annotated[str, Field(max_length=512, pattern=MODEL_SOURCE)] = Field(
        DEFAULT_BASE_MODEL,
        description="FLUX.1-Kontext-dev in diffusers format: a Hugging Face hub id (clusters with internet), "
        "an s3:// prefix, or a path (file:// or absolute) on a mounted volume.",
    )
    revision: Annotated[str, Field(max_length=128)] | None = Field(
        None, description="Hub revision (branch, tag or commit) when `base` is a hub id."
    )
    dtype: DType = Field(DType.bf16, description="Training precision: bf16 (default), fp16, or fp32 (about 2x slower).")
    token_secret: SecretKeySelector | None = Field(
        None,
        description="Secret holding a Hugging Face token (key HF_TOKEN by default) for a hub `base`: gated models "
        "such as FLUX.1-Kontext-dev need a token of an account that accepted the licence. Default: the operator's "
        "`hub.tokenSecret`.",
    )


class DatasetSpec(CrossFieldRules, ApiModel):
    """Before/after image pairs: a control folder and a target folder with the same file names."""

    uri: Annotated[str, Field(max_length=1024, pattern=S3_OR_FILE_URI)] = Field(
        description="Where the pairs live: s3://bucket/prefix/ or file:///path (relative file:// paths are "
        "resolved against the job file's folder in local runs)."
    )
    control_dir: Annotated[str, Field(min_length=1, max_length=256, pattern=RELATIVE_DIR)] = Field(
        "control", description='Folder under `uri` with the control ("before") images.'
    )
    target_dir: Annotated[str, Field(min_length=1, max_length=256, pattern=RELATIVE_DIR)] = Field(
        "target", description='Folder under `uri` with the target ("after") images and their captions.'
    )
    caption_extension: Annotated[str, Field(pattern=r"^\.[A-Za-z0-9]{1,10}$")] = Field(
        ".txt", description="Extension of the caption file beside each target image (same stem)."
    )
    default_caption: Annotated[str, Field(min_length=1, max_length=1000)] | None = Field(
        None, description="Caption (the shared instruction) for targets that have no caption file."
    )
    trigger_word: Annotated[str, Field(min_length=2, max_length=64, pattern=TRIGGER_WORD)] | None = Field(
        None, description='Word prefixed to every caption; must end with a comma, e.g. "XM,".'
    )
    resolution: Resolution = Field(
        1024,
        description="Training resolution: images are resized (aspect kept) to about this many pixels per side. "
        "1024 is what FLUX.1-Kontext-dev was tuned at; 512 and 768 train faster; 256 is for quick runs of small "
        "models (the CPU demo's toy base). With `resolutions`, the primary one of them (the flux_shift held-out "
        "timesteps are taken at its token count).",
    )
    resolutions: list[Resolution] | None = Field(
        None,
        min_length=1,
        max_length=4,
        description="Train at several resolutions (e.g. [512, 768], as ai-toolkit's Kontext example): every pair gets "
        "a bucket at each, a batch never mixes them, held-out pairs are measured at each. Must include `resolution`. "
        "Unset: `resolution` alone.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    held_out_pairs: StrictInt = Field(
        2,
        ge=0,
        le=16,
        description="Pairs kept out of training to measure validation loss and render previews at each checkpoint "
        "(0 disables; never more than leaves one pair to train on).",
    )

    cross_field_rules: ClassVar[tuple[CrossFieldRule, ...]] = (
        CrossFieldRule(
            cel="self.controlDir != self.targetDir",
            message="controlDir and targetDir must be different folders",
            field_path=".targetDir",
            holds=lambda d: d.control_dir != d.target_dir,
        ),
        CrossFieldRule(
            cel="!has(self.resolutions) || self.resolution in self.resolutions",
            message="must include resolution, the primary one: set resolution to one of them",
            field_path=".resolutions",
            holds=lambda d: d.resolutions is None or d.resolution in d.resolutions,
        ),
        *(
            CrossFieldRule(
                cel=f"!self.{field}.matches('{PARENT_SEGMENT}')",
                message="must stay inside the dataset: '..' path segments are not allowed",
                field_path=f".{field}",
                holds=lambda d, attr=attr: not re.search(PARENT_SEGMENT, getattr(d, attr)),
            )
            for field, attr in (("controlDir", "control_dir"), ("targetDir", "target_dir"))
        ),
    )

    @field_validator("resolutions")
    @classmethod
    def _no_repeated_resolution(cls, value: list[int] | None) -> list[int] | None:
        # The apiserver refuses repeats through x-kubernetes-list-type: set.
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"must not repeat a resolution, got {value}")
        return value

    @property
    def training_resolutions(self) -> tuple[int, ...]:
        """Every resolution trained at, ascending."""
        return tuple(sorted(set(self.resolutions or [self.resolution])))


class TargetModules(StrEnum):
    default = "default"
    """Attention (q, k, v, out, added projections) and MLP projections of every block."""
    attention = "attention"
    """Attention projections only: smaller files, gentler edits."""


class LoraSpec(ApiModel):
    """The LoRA adapter."""

    rank: StrictInt = Field(
        32,
        ge=8,
        le=128,
        description="LoRA rank (linear rank): 8-64; 32 is the balanced default, up to 128 for fine detail.",
    )
    alpha: StrictInt | None = Field(None, ge=1, le=256, description="LoRA alpha; defaults to the rank (scale 1.0).")
    dropout: float = Field(0.0, ge=0.0, le=0.5, description="Dropout on the LoRA branch.")
    target_modules: TargetModules = Field(
        TargetModules.default, description="Which transformer projections get adapters."
    )
    modulation: StrictBool = Field(
        False,
        description="Also adapt the AdaLN modulation projections of every block (norm1.linear, norm1_context.linear, "
        "single blocks' norm.linear), as ai-toolkit does; diffusers' example and musubi-tuner leave them out.",
    )


class Optimizer(StrEnum):
    adamw = "adamw"
    adafactor = "adafactor"


class LrScheduler(StrEnum):
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    cosine = "cosine"
    linear = "linear"


class LearningRateScaling(StrEnum):
    sqrt = "sqrt"
    """learningRate x sqrt(worldSize): the square-root rule for Adam-type optimisers (Malladi et al. 2022)."""
    linear = "linear"
    """learningRate x worldSize: Goyal et al.'s rule for SGD (large batches want a warm-up with it)."""
    none = "none"
    """learningRate as written, whatever the world size."""


class TimestepSampling(StrEnum):
    shift = "shift"
    """Logit-normal draws pushed towards high noise by the fixed `timestepShift`, with the map FLUX's scheduler
    applies to its sigmas (s·t / (1 + (s - 1)·t))."""
    flux_shift = "flux_shift"
    """Logit-normal draws shifted by what FluxKontextPipeline's dynamic shift gives the bucket's image token count
    (about 1.9 at 512², 3.2 at 1024²), as musubi-tuner's `flux_shift`."""
    sigmoid = "sigmoid"
    """Plain logit-normal (sigmoid of a standard normal): ai-toolkit's default `timestep_type`."""
    uniform = "uniform"
    """t uniform in (0, 1)."""
    weighted = "weighted"
    """ai-toolkit's `weighted` (its Kontext example): t uniform on its 1000-step grid, the loss weighted by t."""


class AttentionBackend(StrEnum):
    auto = "auto"
    """PyTorch picks (flash or memory-efficient attention on a GPU)."""
    flash = "flash"
    efficient = "efficient"
    cudnn = "cudnn"
    math = "math"
    """The unfused reference: materialises the attention matrix; for debugging."""


StepsAuto = Literal["auto"]


class TrainingSpec(CrossFieldRules, ApiModel):
    """The optimisation loop."""

    steps: Annotated[StrictInt, Field(ge=1, le=1_000_000)] | StepsAuto = Field(
        "auto",
        description='Optimiser steps, or "auto" = pairs x autoStepsPerPair / worldSize, rounded up (3000 / worldSize '
        "while the pair count is unknown): as many epochs as one GPU would train, in 1/worldSize of the steps. "
        "Explicit steps are never rescaled.",
        json_schema_extra={"x-kubernetes-int-or-string": True},
    )
    auto_steps_per_pair: StrictInt = Field(
        100, ge=100, le=150, description='Steps per training pair when steps is "auto".'
    )
    learning_rate: float = Field(
        1.0e-4,
        gt=0.0,
        le=1.0e-2,
        description="Peak learning rate for one GPU at this batchSize; with more GPUs, learningRateScaling applies.",
    )
    learning_rate_scaling: LearningRateScaling = Field(
        LearningRateScaling.sqrt,
        description="How the learning rate follows the world size (count x nodes), whose steps average the "
        "gradients of worldSize x batchSize pairs: sqrt (default), linear or none. No effect on one GPU.",
    )
    lr_scheduler: LrScheduler = Field(LrScheduler.constant, description="Learning-rate schedule after warm-up.")
    warmup_steps: StrictInt = Field(0, ge=0, le=10000, description="Linear warm-up steps.")
    batch_size: StrictInt = Field(
        1, ge=1, le=16, description="Pairs per GPU per micro-batch (one GPU: pairs per optimiser step)."
    )
    gradient_accumulation: StrictInt = Field(
        1, ge=1, le=64, description="Micro-batches accumulated per optimiser step."
    )
    optimizer: Optimizer = Field(Optimizer.adamw, description="Optimiser for the LoRA weights.")
    weight_decay: float = Field(1.0e-4, ge=0.0, le=1.0, description="Decoupled weight decay.")
    max_grad_norm: float = Field(1.0, ge=0.0, le=100.0, description="Gradient clipping norm (0 disables).")
    seed: StrictInt = Field(42, ge=0, le=2**31 - 1, description="Seed for data order, noise and timesteps.")
    gradient_checkpointing: StrictBool = Field(
        True, description="Recompute activations in the backward pass to save memory."
    )
    cache_latents: StrictBool = Field(
        True, description="Encode images and captions once, then free the VAE and text encoders."
    )
    guidance_scale: float = Field(
        1.0, ge=0.0, le=10.0, description="Value fed to the guidance embedding while training."
    )
    timestep_sampling: TimestepSampling = Field(
        TimestepSampling.sigmoid,
        description="How flow-matching timesteps are drawn (sigmoid: chosen by the recipe ablation, docs/trainer.md).",
    )
    timestep_shift: float = Field(3.0, gt=0.0, le=10.0, description="Shift applied when timestepSampling is shift.")
    caption_dropout: float = Field(
        0.0,
        ge=0.0,
        le=0.5,
        description="Probability that a sample trains with its caption dropped: the trigger word alone (the empty "
        "caption without one), as ai-toolkit drops captions (5 % in its Kontext example).",
    )
    attention_backend: AttentionBackend = Field(
        AttentionBackend.auto,
        description="Scaled-dot-product attention kernel (efficient and cudnn need a CUDA GPU; math is for debugging).",
    )
    compile: StrictBool = Field(
        False,
        description="torch.compile every transformer block (regional compilation): faster GPU steps after a "
        "one-off compile at start.",
    )

    cross_field_rules: ClassVar[tuple[CrossFieldRule, ...]] = (
        CrossFieldRule(
            cel="type(self.steps) != int || self.warmupSteps < self.steps",
            message="must be smaller than training.steps",
            field_path=".warmupSteps",
            holds=lambda t: not isinstance(t.steps, int) or t.warmup_steps < t.steps,
        ),
    )


class CheckpointSpec(ApiModel):
    """Intermediate LoRAs, so the best one can be picked afterwards and training can resume after preemption."""

    save_every: StrictInt = Field(
        250, ge=1, le=100000, description="Save a checkpoint every N steps (250, 500 or 1000 are usual)."
    )
    keep: StrictInt = Field(
        4, ge=1, le=100, description="Keep the newest K checkpoints; older ones are deleted locally and in storage."
    )


class OutputSpec(ApiModel):
    """Where LoRAs and checkpoints go."""

    uri: Annotated[str, Field(max_length=1024, pattern=S3_OR_FILE_URI)] = Field(
        description="s3://bucket/prefix/ or file:///path: receives <name>.safetensors and checkpoints/."
    )
    name: Annotated[str, Field(max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")] | None = Field(
        None, description="File name stem of the final LoRA; defaults to the job's name."
    )
    cache_uri: Annotated[str, Field(max_length=1024, pattern=S3_OR_FILE_URI)] | None = Field(
        None,
        description="Where encodings (VAE latents, text embeddings) are cached, keyed by their content: restarts and "
        "jobs on the same pairs and model that share this location encode nothing again. Default: the folder "
        f"`{CACHE_FOLDER}/` beside `uri` (in its parent prefix).",
    )

    def effective_cache_uri(self) -> str:
        """`cacheUri`, else `kontext-lora-cache/` in the parent of `uri` (the bucket root for a top-level prefix)."""
        if self.cache_uri:
            return with_slash(self.cache_uri)
        uri = with_slash(self.uri)
        scheme, _, rest = uri.partition("://")
        head, _, path = rest.partition("/")  # s3: bucket / prefix; file: "" / absolute path
        parts = [p for p in path.split("/") if p]
        parent = "/".join(parts[:-1])
        return f"{scheme}://{head}/{parent + '/' if parent else ''}{CACHE_FOLDER}/"


class AddressingStyle(StrEnum):
    auto = "auto"
    path = "path"
    virtual = "virtual"


class StorageSpec(ApiModel):
    """S3-compatible object storage for the dataset, model and outputs."""

    endpoint: Annotated[str, Field(max_length=512, pattern=r"^https?://[^\s/]+(/.*)?$")] | None = Field(
        None, description="Endpoint URL of an S3-compatible server (MinIO, R2, Ceph...); unset for AWS S3."
    )
    region: Annotated[str, Field(max_length=64, pattern=r"^[a-z0-9-]+$")] = Field(
        "us-east-1", description="Region name."
    )
    credentials_secret: Annotated[str, Field(max_length=253, pattern=K8S_NAME)] | None = Field(
        None,
        description="Secret in the job's namespace holding the access keys; "
        "unset to use the pod's identity (IRSA, instance role).",
    )
    access_key_id_key: Annotated[str, Field(max_length=253)] = Field(
        "AWS_ACCESS_KEY_ID", description="Key of the access key id in the Secret."
    )
    secret_access_key_key: Annotated[str, Field(max_length=253)] = Field(
        "AWS_SECRET_ACCESS_KEY", description="Key of the secret access key in the Secret."
    )
    addressing_style: AddressingStyle = Field(
        AddressingStyle.auto, description="Bucket addressing; auto uses path style for custom endpoints."
    )


class ResourcesSpec(CrossFieldRules, ApiModel):
    """What the training pods ask the scheduler for: `nodes` pods of `count` GPUs each, one process per GPU."""

    gpu: GpuClass = Field(
        GpuClass.L40S_48GB, description="GPU class; mapped to node labels and tolerations by the operator's config."
    )
    count: StrictInt = Field(
        1,
        ge=1,
        le=MAX_GPUS_PER_NODE,
        description="GPUs per pod (per node): one training process each, under torchrun. The world size is "
        "count x nodes; each optimiser step sees worldSize x batchSize x gradientAccumulation pairs.",
    )
    nodes: StrictInt = Field(
        1,
        ge=1,
        le=MAX_NODES,
        description="Nodes (pods) the job spans, admitted and restarted together as one group: above 1 the "
        "operator runs an Indexed Job with a headless Service for torchrun's rendezvous.",
    )
    cpu: Annotated[str, Field(max_length=32, pattern=QUANTITY)] = Field("4", description="CPU request.")
    memory: Annotated[str, Field(max_length=32, pattern=QUANTITY)] = Field(
        "48Gi", description="Memory request and limit."
    )
    model_cache_claim: Annotated[str, Field(max_length=253, pattern=K8S_NAME)] | None = Field(
        None,
        description="PersistentVolumeClaim mounted as the model cache, so the base weights download once "
        "(with nodes > 1 every pod mounts it: it must be ReadWriteMany or ReadOnlyMany).",
    )

    cross_field_rules: ClassVar[tuple[CrossFieldRule, ...]] = (
        CrossFieldRule(
            cel=f"self.count * self.nodes <= {MAX_WORLD_SIZE}",
            message=f"count x nodes (the world size) must be at most {MAX_WORLD_SIZE}: one optimiser step would "
            "see more pairs than a LoRA dataset holds",
            field_path=".nodes",
            holds=lambda r: r.world_size <= MAX_WORLD_SIZE,
        ),
    )

    @property
    def world_size(self) -> int:
        """Training processes: one per GPU, on every node."""
        return self.count * self.nodes


class RunPolicySpec(ApiModel):
    """Retries and time limits of the training run."""

    backoff_limit: StrictInt = Field(
        3, ge=0, le=20, description="Restarts after a failure or preemption; each resumes from the last checkpoint."
    )
    active_deadline_seconds: StrictInt | None = Field(
        None, ge=60, description="Fail the job when it runs longer than this."
    )
    ttl_seconds_after_finished: StrictInt | None = Field(
        None,
        ge=0,
        description="Delete the finished KontextLoRAJob (never the LoRAs in storage) this long after it ends.",
    )


def with_slash(uri: str) -> str:
    return uri if uri.endswith("/") else uri + "/"


def outside_dataset(uri: str | None, dataset: DatasetSpec) -> bool:
    """Whether an output URI stays clear of the pairs: not the dataset's URI, not in its control or target folder."""
    if uri is None:
        return True
    out, root = with_slash(uri), with_slash(dataset.uri)
    folders = (root + with_slash(dataset.control_dir), root + with_slash(dataset.target_dir))
    return out != root and not any(out.startswith(folder) for folder in folders)


def _outside_dataset_cel(field: str, optional: bool) -> str:
    """`outside_dataset` in CEL; `[x].all(v, ...)` binds the slash-terminated forms to names."""

    def slashed(expression: str) -> str:
        return f"({expression}.endsWith('/') ? {expression} : {expression} + '/')"

    check = (
        f"[{slashed(field)}].all(o, [{slashed('self.dataset.uri')}].all(d, o != d"
        f" && !o.startsWith(d + {slashed('self.dataset.controlDir')})"
        f" && !o.startsWith(d + {slashed('self.dataset.targetDir')})))"
    )
    return f"!has({field}) || {check}" if optional else check


def _defaults_of(section: type[ApiModel]) -> dict:
    """Schema extra giving an omitted section its full default, so the apiserver fills and validates it."""
    return {"default": section().to_wire()}


class KontextLoRAJobSpec(CrossFieldRules, ApiModel):
    """Train a FLUX.1-Kontext-dev LoRA on before/after image pairs."""

    model: ModelSpec = Field(
        default_factory=ModelSpec, description="Base model.", json_schema_extra=_defaults_of(ModelSpec)
    )
    dataset: DatasetSpec = Field(description="Training pairs.")
    lora: LoraSpec = Field(
        default_factory=LoraSpec, description="LoRA adapter shape.", json_schema_extra=_defaults_of(LoraSpec)
    )
    training: TrainingSpec = Field(
        default_factory=TrainingSpec, description="Optimisation loop.", json_schema_extra=_defaults_of(TrainingSpec)
    )
    checkpoints: CheckpointSpec = Field(
        default_factory=CheckpointSpec,
        description="Checkpoint saving and rotation.",
        json_schema_extra=_defaults_of(CheckpointSpec),
    )
    output: OutputSpec = Field(description="Where the LoRA and checkpoints are written.")
    storage: StorageSpec = Field(
        default_factory=StorageSpec, description="Object storage access.", json_schema_extra=_defaults_of(StorageSpec)
    )
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec,
        description="GPU class and pod resources.",
        json_schema_extra=_defaults_of(ResourcesSpec),
    )
    suspend: StrictBool = Field(
        False,
        description="Stop the training pod (progress is kept in checkpoints); clear to resume. Kueue uses this too.",
    )
    run_policy: RunPolicySpec = Field(
        default_factory=RunPolicySpec,
        description="Retries and deadlines.",
        json_schema_extra=_defaults_of(RunPolicySpec),
    )

    cross_field_rules: ClassVar[tuple[CrossFieldRule, ...]] = (
        *(
            CrossFieldRule(
                cel=_outside_dataset_cel(f"self.output.{field}", optional=field == "cacheUri"),
                message="must not be the dataset's uri or inside its controlDir/targetDir: outputs would mix with "
                "the pairs",
                field_path=f".output.{field}",
                holds=lambda s, attr=attr: outside_dataset(getattr(s.output, attr), s.dataset),
            )
            for field, attr in (("uri", "uri"), ("cacheUri", "cache_uri"))
        ),
        CrossFieldRule(
            cel="type(self.training.steps) != int || self.checkpoints.saveEvery <= self.training.steps",
            message="must not exceed training.steps",
            field_path=".checkpoints.saveEvery",
            holds=lambda s: not isinstance(s.training.steps, int) or s.checkpoints.save_every <= s.training.steps,
        ),
    )

    def total_steps(self, pairs: int | None, world_size: int | None = None) -> int:
        """Resolved step count: explicit steps, or pairs × autoStepsPerPair / world size (rounded up; 3000 pairs ×
        steps while pairs are unknown). `world_size`: the processes actually training (default: the spec's)."""
        if isinstance(self.training.steps, int):
            return self.training.steps
        world = world_size or self.resources.world_size
        single = pairs * self.training.auto_steps_per_pair if pairs else AUTO_STEPS_WHEN_PAIRS_UNKNOWN
        return -(-single // world)

    def effective_learning_rate(self, world_size: int | None = None) -> float:
        """The learning rate the optimiser uses at this world size (learningRateScaling)."""
        world = world_size or self.resources.world_size
        scaling = self.training.learning_rate_scaling
        factor = {LearningRateScaling.sqrt: world**0.5, LearningRateScaling.linear: float(world)}.get(scaling, 1.0)
        return self.training.learning_rate * factor

    @property
    def lora_alpha(self) -> int:
        return self.lora.alpha if self.lora.alpha is not None else self.lora.rank
