"""Malformed KontextLoRAJobs, one per rule, each with the field its error must name.

Shared by the API-model unit tests (pydantic must refuse each) and the cluster tests (the real apiserver
must refuse each through the generated CRD), so the two validators are held to the same rules.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def valid_job(name: str = "valid-job") -> dict[str, Any]:
    return {
        "apiVersion": "kontext-lora.io/v1alpha1",
        "kind": "KontextLoRAJob",
        "metadata": {"name": name},
        "spec": {
            "dataset": {
                "uri": "s3://pairs-bucket/remover/",
                "controlDir": "remover_controls",
                "targetDir": "remover_images",
                "defaultCaption": "remove the object",
                "triggerWord": "XM,",
            },
            "training": {"steps": 2000},
            "checkpoints": {"saveEvery": 500, "keep": 4},
            "output": {"uri": "s3://loras-bucket/remover/"},
            "storage": {"credentialsSecret": "s3-credentials"},
            "resources": {"gpu": "L40S-48GB"},
        },
    }


@dataclass(frozen=True)
class Malformed:
    id: str
    mutate: Callable[[dict], None]
    field: str
    """Dotted path the error message must name, e.g. `spec.lora.rank`."""

    def job(self, name: str = "malformed") -> dict[str, Any]:
        document = copy.deepcopy(valid_job(name))
        self.mutate(document["spec"])
        return document


def _set(path: str, value: Any) -> Callable[[dict], None]:
    keys = path.split(".")

    def mutate(spec: dict) -> None:
        node = spec
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value

    return mutate


def _delete(path: str) -> Callable[[dict], None]:
    keys = path.split(".")

    def mutate(spec: dict) -> None:
        node = spec
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]

    return mutate


def _both(*mutations: Callable[[dict], None]) -> Callable[[dict], None]:
    def mutate(spec: dict) -> None:
        for mutation in mutations:
            mutation(spec)

    return mutate


MALFORMED: list[Malformed] = [
    Malformed("missing-dataset", _delete("dataset"), "spec.dataset"),
    Malformed("missing-output", _delete("output"), "spec.output"),
    Malformed("missing-dataset-uri", _delete("dataset.uri"), "spec.dataset.uri"),
    Malformed("missing-output-uri", _delete("output.uri"), "spec.output.uri"),
    Malformed("rank-0", _set("lora.rank", 0), "spec.lora.rank"),
    Malformed("rank-512", _set("lora.rank", 512), "spec.lora.rank"),
    Malformed("rank-4", _set("lora.rank", 4), "spec.lora.rank"),
    Malformed("rank-string", _set("lora.rank", "big"), "spec.lora.rank"),
    Malformed("alpha-0", _set("lora.alpha", 0), "spec.lora.alpha"),
    Malformed("alpha-1000", _set("lora.alpha", 1000), "spec.lora.alpha"),
    Malformed("dropout-0.9", _set("lora.dropout", 0.9), "spec.lora.dropout"),
    Malformed("target-modules-unknown", _set("lora.targetModules", "everything"), "spec.lora.targetModules"),
    Malformed("steps-negative", _set("training.steps", -1), "spec.training.steps"),
    Malformed("steps-0", _set("training.steps", 0), "spec.training.steps"),
    Malformed("steps-word", _set("training.steps", "many"), "spec.training.steps"),
    Malformed("steps-2-million", _set("training.steps", 2_000_000), "spec.training.steps"),
    Malformed("auto-steps-per-pair-50", _set("training.autoStepsPerPair", 50), "spec.training.autoStepsPerPair"),
    Malformed("auto-steps-per-pair-200", _set("training.autoStepsPerPair", 200), "spec.training.autoStepsPerPair"),
    Malformed("learning-rate-0", _set("training.learningRate", 0), "spec.training.learningRate"),
    Malformed("learning-rate-0.5", _set("training.learningRate", 0.5), "spec.training.learningRate"),
    Malformed("batch-size-0", _set("training.batchSize", 0), "spec.training.batchSize"),
    Malformed("batch-size-64", _set("training.batchSize", 64), "spec.training.batchSize"),
    Malformed(
        "gradient-accumulation-0", _set("training.gradientAccumulation", 0), "spec.training.gradientAccumulation"
    ),
    Malformed("optimizer-sgd", _set("training.optimizer", "sgd"), "spec.training.optimizer"),
    Malformed("lr-scheduler-step", _set("training.lrScheduler", "step"), "spec.training.lrScheduler"),
    Malformed("warmup-not-below-steps", _set("training.warmupSteps", 2000), "spec.training.warmupSteps"),
    Malformed(
        "timestep-sampling-unknown", _set("training.timestepSampling", "lognorm"), "spec.training.timestepSampling"
    ),
    Malformed("timestep-shift-0", _set("training.timestepShift", 0), "spec.training.timestepShift"),
    Malformed("guidance-negative", _set("training.guidanceScale", -1), "spec.training.guidanceScale"),
    Malformed("max-grad-norm-negative", _set("training.maxGradNorm", -1), "spec.training.maxGradNorm"),
    Malformed("seed-negative", _set("training.seed", -5), "spec.training.seed"),
    Malformed(
        "gradient-checkpointing-word",
        _set("training.gradientCheckpointing", "maybe"),
        "spec.training.gradientCheckpointing",
    ),
    Malformed("keep-0", _set("checkpoints.keep", 0), "spec.checkpoints.keep"),
    Malformed("keep-1000", _set("checkpoints.keep", 1000), "spec.checkpoints.keep"),
    Malformed("save-every-0", _set("checkpoints.saveEvery", 0), "spec.checkpoints.saveEvery"),
    Malformed("save-every-above-steps", _set("checkpoints.saveEvery", 5000), "spec.checkpoints.saveEvery"),
    Malformed("gpu-class-unknown", _set("resources.gpu", "A100-80GB"), "spec.resources.gpu"),
    Malformed("gpu-count-9", _set("resources.count", 9), "spec.resources.count"),
    Malformed("nodes-0", _set("resources.nodes", 0), "spec.resources.nodes"),
    Malformed("nodes-17", _set("resources.nodes", 17), "spec.resources.nodes"),
    Malformed(
        "world-size-above-64", _both(_set("resources.count", 8), _set("resources.nodes", 16)), "spec.resources.nodes"
    ),
    Malformed(
        "learning-rate-scaling-unknown",
        _set("training.learningRateScaling", "cubic"),
        "spec.training.learningRateScaling",
    ),
    Malformed("memory-not-a-quantity", _set("resources.memory", "lots"), "spec.resources.memory"),
    Malformed(
        "cache-claim-bad-name", _set("resources.modelCacheClaim", "Model_Cache"), "spec.resources.modelCacheClaim"
    ),
    Malformed("dataset-uri-http", _set("dataset.uri", "http://example.com/pairs/"), "spec.dataset.uri"),
    Malformed("dataset-uri-bucket-uppercase", _set("dataset.uri", "s3://Pairs/remover/"), "spec.dataset.uri"),
    Malformed("output-uri-gcs", _set("output.uri", "gs://loras-bucket/remover/"), "spec.output.uri"),
    Malformed("output-name-path", _set("output.name", "../escape"), "spec.output.name"),
    Malformed("trigger-word-no-comma", _set("dataset.triggerWord", "XM"), "spec.dataset.triggerWord"),
    Malformed("trigger-word-leading-space", _set("dataset.triggerWord", " XM,"), "spec.dataset.triggerWord"),
    Malformed("resolution-640", _set("dataset.resolution", 640), "spec.dataset.resolution"),
    Malformed("resolutions-empty", _set("dataset.resolutions", []), "spec.dataset.resolutions"),
    Malformed("resolutions-640", _set("dataset.resolutions", [512, 640]), "spec.dataset.resolutions"),
    Malformed("resolutions-repeated", _set("dataset.resolutions", [1024, 1024]), "spec.dataset.resolutions"),
    Malformed("resolutions-without-resolution", _set("dataset.resolutions", [512, 768]), "spec.dataset.resolutions"),
    Malformed("caption-dropout-0.9", _set("training.captionDropout", 0.9), "spec.training.captionDropout"),
    Malformed(
        "attention-backend-unknown", _set("training.attentionBackend", "xformers"), "spec.training.attentionBackend"
    ),
    Malformed("compile-word", _set("training.compile", "fast"), "spec.training.compile"),
    Malformed("modulation-word", _set("lora.modulation", "yes"), "spec.lora.modulation"),
    Malformed("control-equals-target", _set("dataset.controlDir", "remover_images"), "spec.dataset.targetDir"),
    Malformed("control-dir-absolute", _set("dataset.controlDir", "/remover_controls"), "spec.dataset.controlDir"),
    Malformed("caption-extension-no-dot", _set("dataset.captionExtension", "txt"), "spec.dataset.captionExtension"),
    Malformed("held-out-pairs-100", _set("dataset.heldOutPairs", 100), "spec.dataset.heldOutPairs"),
    Malformed("dtype-int8", _set("model.dtype", "int8"), "spec.model.dtype"),
    Malformed("model-base-not-a-source", _set("model.base", "not a model"), "spec.model.base"),
    Malformed("endpoint-no-scheme", _set("storage.endpoint", "minio:9000"), "spec.storage.endpoint"),
    Malformed(
        "credentials-secret-bad-name", _set("storage.credentialsSecret", "S3_Creds"), "spec.storage.credentialsSecret"
    ),
    Malformed("addressing-style-unknown", _set("storage.addressingStyle", "dns"), "spec.storage.addressingStyle"),
    Malformed("backoff-limit-negative", _set("runPolicy.backoffLimit", -1), "spec.runPolicy.backoffLimit"),
    Malformed(
        "active-deadline-10s", _set("runPolicy.activeDeadlineSeconds", 10), "spec.runPolicy.activeDeadlineSeconds"
    ),
    Malformed("ttl-negative", _set("runPolicy.ttlSecondsAfterFinished", -1), "spec.runPolicy.ttlSecondsAfterFinished"),
    Malformed("suspend-word", _set("suspend", "yes"), "spec.suspend"),
    Malformed("unknown-field", _set("lora.rnk", 16), "spec.lora.rnk"),
    Malformed(
        "steps-auto-with-bad-per-pair",
        _both(_set("training.steps", "auto"), _set("training.autoStepsPerPair", 99)),
        "spec.training.autoStepsPerPair",
    ),
    # Added by the fault-injection suite (tests/faults): more ways users get a job wrong.
    Malformed("held-out-pairs-negative", _set("dataset.heldOutPairs", -1), "spec.dataset.heldOutPairs"),
    Malformed("dropout-negative", _set("lora.dropout", -0.1), "spec.lora.dropout"),
    Malformed("warmup-negative", _set("training.warmupSteps", -10), "spec.training.warmupSteps"),
    Malformed("weight-decay-2", _set("training.weightDecay", 2.0), "spec.training.weightDecay"),
    Malformed("gpu-count-0", _set("resources.count", 0), "spec.resources.count"),
    Malformed("cpu-not-a-quantity", _set("resources.cpu", "four"), "spec.resources.cpu"),
    Malformed("region-uppercase", _set("storage.region", "EU_WEST"), "spec.storage.region"),
    Malformed("endpoint-ftp", _set("storage.endpoint", "ftp://minio:9000"), "spec.storage.endpoint"),
    Malformed(
        "caption-extension-too-long", _set("dataset.captionExtension", ".description"), "spec.dataset.captionExtension"
    ),
    Malformed("default-caption-empty", _set("dataset.defaultCaption", ""), "spec.dataset.defaultCaption"),
    Malformed("backoff-limit-50", _set("runPolicy.backoffLimit", 50), "spec.runPolicy.backoffLimit"),
    Malformed("dataset-uri-no-bucket", _set("dataset.uri", "s3:///pairs/"), "spec.dataset.uri"),
    # Added with the preparation phase (issue 13): paths that leave the dataset, outputs mixed into the pairs.
    Malformed("control-dir-leaves-dataset", _set("dataset.controlDir", "../../etc"), "spec.dataset.controlDir"),
    Malformed("target-dir-parent-segment", _set("dataset.targetDir", "images/../../x"), "spec.dataset.targetDir"),
    Malformed("output-uri-is-dataset-uri", _set("output.uri", "s3://pairs-bucket/remover/"), "spec.output.uri"),
    Malformed("output-uri-is-dataset-uri-no-slash", _set("output.uri", "s3://pairs-bucket/remover"), "spec.output.uri"),
    Malformed(
        "output-uri-inside-target-dir",
        _set("output.uri", "s3://pairs-bucket/remover/remover_images/loras/"),
        "spec.output.uri",
    ),
    Malformed(
        "cache-uri-inside-control-dir",
        _set("output.cacheUri", "s3://pairs-bucket/remover/remover_controls/cache/"),
        "spec.output.cacheUri",
    ),
    Malformed("cache-uri-gcs", _set("output.cacheUri", "gs://cache-bucket/x/"), "spec.output.cacheUri"),
    Malformed("token-secret-no-name", _set("model.tokenSecret", {"key": "HF_TOKEN"}), "spec.model.tokenSecret.name"),
    Malformed(
        "token-secret-bad-key",
        _set("model.tokenSecret", {"name": "hf", "key": "HF TOKEN"}),
        "spec.model.tokenSecret.key",
    ),
]
