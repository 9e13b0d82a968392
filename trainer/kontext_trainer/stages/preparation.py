"""The preparation stage: storage checks, model access, the validated dataset, and the manifest that hands them on.

In a cluster this is the whole of the CPU-only preparation pod (`kontext-lora prepare --from-env`), which runs
before any GPU is requested; local runs and a training pod without a usable manifest run it in-process first. In
order, each reported in `status.preparation` (task, done/total):

1. storage: the output location answers (and the shared encoding cache; a cache that cannot be reached is a
   warning, not a failure);
2. the model: `describe_model` — the hub's access check (a gated model whose licence the token's account has not
   accepted fails here, exit 4 `ModelAccessDenied`, with the hub's message), the file list with content
   identities and the commit a hub revision resolves to; a model missing a part fails naming it;
3. the pairs: listed, paired, downloaded, decoded, captioned (`prepare_dataset`): any bad file fails, named;
4. with a model cache volume (`spec.resources.modelCacheClaim`): the model's files downloaded into it;
5. the manifest `<output.uri>preparation.json`: the job, a digest of the dataset and model spec, every pair (keys,
   ETags, SHA-256 of both images, composed caption, bucket), the warnings, and the model description.

The training pod (`KONTEXT_LORA_PREPARED=true`) reads the manifest instead of preparing again (`load_prepared`):
it trains on exactly the validated pairs and the described model commit, downloads only what it still needs, and
falls back to preparing in-process (with a warning) when the manifest is missing or was made for another spec.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kontext_lora.api import PreparationStatus
from kontext_lora.api.spec import outside_dataset

from ..data.dataset import TrainingPair, prepare_dataset
from ..encoding import remote_cache
from ..errors import InvalidInputError, StorageError
from ..logs import fields
from ..model.source import COMPONENTS, ModelDescription, describe_model, fetch_model
from ..storage import Location, Storage, open_storage
from .environment import RunEnvironment

log = logging.getLogger(__name__)

MANIFEST = "preparation.json"
MANIFEST_FORMAT = 1
MAX_STATUS_WARNINGS = 20


@dataclass
class PreparedInputs:
    """What the preparation established: where things are, the validated pairs, the model."""

    dataset: Storage
    output: Storage
    pairs: list[TrainingPair]
    model: ModelDescription
    warnings: list[str] = field(default_factory=list)
    manifest_uri: str = ""
    images_local: bool = True
    """Whether every pair's images are on this machine (prepared here) or still to be fetched (from a manifest)."""


def split_held_out(pairs: list[TrainingPair], wanted: int, seed: int) -> tuple[list[TrainingPair], list[TrainingPair]]:
    """(training pairs, held-out pairs): a seeded choice, never leaving fewer than one pair to train on."""
    count = max(0, min(wanted, len(pairs) - 1))
    held = set(random.Random(seed).sample(range(len(pairs)), count))
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def spec_digest(env: RunEnvironment) -> str:
    """What a manifest was made for: the dataset spec and the model's source and revision."""
    spec = env.spec
    essence = {"dataset": spec.dataset.to_wire(), "model": {"base": spec.model.base, "revision": spec.model.revision}}
    return hashlib.sha256(json.dumps(essence, sort_keys=True).encode()).hexdigest()[:32]


class _Progress:
    """`status.preparation` as the preparation moves on (merged into every status patch)."""

    def __init__(self, env: RunEnvironment):
        self.env = env
        self.state = PreparationStatus()

    def task(self, task: str, done: int | None = None, total: int | None = None, force: bool = True, **extra) -> None:
        self.state = self.state.model_copy(update={"task": task, "done": done, "total": total, **extra})
        self.env.status.update(force=force, preparation=self.state)
        if force:
            log.info("preparation: %s", task, **fields(task=task, done=done, total=total))


def prepare_inputs(env: RunEnvironment, fill_model_cache: bool = False) -> PreparedInputs:
    """Check storage and the model, validate the pairs, fill the model cache if asked; write the manifest."""
    spec, settings = env.spec, env.settings
    progress = _Progress(env)

    progress.task("checking storage")
    dataset = open_storage(Location.parse(spec.dataset.uri, settings.base_dir), env.s3)
    output = open_storage(Location.parse(spec.output.uri, settings.base_dir), env.s3)
    cache_root = Location.parse(spec.output.effective_cache_uri(), settings.base_dir)
    _outside_dataset(env, dataset.uri(), {"spec.output.uri": output.uri(), "spec.output.cacheUri": cache_root.uri()})
    output.check()
    warnings: list[str] = []
    cache = remote_cache(spec.output.effective_cache_uri(), env.s3, settings.base_dir)
    try:
        cache.check()
    except StorageError as error:
        warnings.append(f"the encoding cache {cache.uri()} cannot be used ({error}); every run will encode again")
        log.warning("%s", warnings[-1])

    progress.task("checking model access")
    model = describe_model(spec.model, env.s3, settings.base_dir)
    log.info(
        "model %s: %d files%s",
        spec.model.base,
        len(model.files),
        f" at commit {model.revision}" if model.revision else "",
        **fields(model=spec.model.base, model_revision=model.revision, model_files=len(model.files)),
    )

    progress.task("validating pairs", model_revision=model.revision)
    pairs, dataset_warnings = prepare_dataset(
        dataset,
        spec.dataset,
        env.work / "dataset",
        settings.show_progress,
        on_file=lambda done, total: progress.task("downloading pairs", done, total, force=False),
    )
    warnings += dataset_warnings
    total_steps = spec.total_steps(len(pairs))
    env.metrics.dataset_pairs.set(len(pairs))
    env.metrics.total_steps.set(total_steps)
    log.info(
        "dataset: %d pairs from %s",
        len(pairs),
        dataset.uri(),
        **fields(pairs=len(pairs), total_steps=total_steps, warnings=len(warnings)),
    )
    env.status.update(dataset_pairs=len(pairs), total_steps=total_steps, step=0)

    if fill_model_cache:
        progress.task("downloading the model into the model cache", 0, len(model.files))
        fetch_model(model, env.s3, settings.model_cache, settings.base_dir, COMPONENTS, settings.show_progress)

    inputs = PreparedInputs(dataset, output, pairs, model, warnings)
    inputs.manifest_uri = write_manifest(env, inputs, model_cache_filled=fill_model_cache)
    progress.task(
        "done",
        len(pairs),
        len(pairs),
        warnings=[w[:2048] for w in warnings[:MAX_STATUS_WARNINGS]],
        manifest_uri=inputs.manifest_uri,
    )
    return inputs


def _outside_dataset(env: RunEnvironment, dataset_uri: str, outputs: dict[str, str]) -> None:
    """The API model's rule again on the resolved locations: relative file:// paths are only resolved here."""
    resolved = env.spec.dataset.model_copy(update={"uri": dataset_uri})
    for field_name, uri in outputs.items():
        if not outside_dataset(uri, resolved):
            raise InvalidInputError(
                f"{field_name}: {uri} is the dataset's folder {dataset_uri} or inside its {resolved.control_dir}/ or "
                f"{resolved.target_dir}/: outputs would mix with the pairs; write them elsewhere"
            )


# ---- the manifest ----------------------------------------------------------------------------------------------


def _pair_json(pair: TrainingPair) -> dict[str, Any]:
    return {
        "stem": pair.stem,
        "caption": pair.caption,
        "bucket": list(pair.bucket),
        **({"targetSize": list(pair.target_size)} if pair.target_size else {}),  # its buckets at other resolutions
        "control": {"key": pair.control_key, "etag": pair.control_etag, "sha256": pair.control_digest},
        "target": {"key": pair.target_key, "etag": pair.target_etag, "sha256": pair.target_digest},
    }


def write_manifest(env: RunEnvironment, inputs: PreparedInputs, model_cache_filled: bool) -> str:
    metadata = env.job.metadata
    document = {
        "format": MANIFEST_FORMAT,
        "job": {"namespace": metadata.namespace, "name": metadata.name, "uid": metadata.uid},
        "specDigest": spec_digest(env),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "preparedBy": env.settings.pod_name,
        "dataset": {
            "uri": inputs.dataset.uri(),
            "pairs": [_pair_json(p) for p in inputs.pairs],
            "warnings": inputs.warnings,
        },
        "model": {**inputs.model.to_json(), "cacheFilled": model_cache_filled},
    }
    with tempfile.TemporaryDirectory(dir=env.work if env.work.is_dir() else None) as scratch:
        path = Path(scratch) / MANIFEST
        path.write_text(json.dumps(document, indent=1) + "\n")
        inputs.output.put_files([(path, MANIFEST)])
    return inputs.output.uri(MANIFEST)


def load_prepared(env: RunEnvironment) -> PreparedInputs | None:
    """The preparation's result for this job from its manifest; None (with the reason logged) when there is none
    that fits, and the run prepares in-process."""
    spec, settings = env.spec, env.settings
    dataset = open_storage(Location.parse(spec.dataset.uri, settings.base_dir), env.s3)
    output = open_storage(Location.parse(spec.output.uri, settings.base_dir), env.s3)
    try:
        document = json.loads(output.get_bytes(MANIFEST))
    except FileNotFoundError:
        log.warning("no %s in %s: preparing here instead", MANIFEST, output.uri())
        return None
    except ValueError as error:
        log.warning("%s is not valid JSON (%s): preparing here instead", output.uri(MANIFEST), error)
        return None
    job = document.get("job") or {}
    uid = env.job.metadata.uid
    if document.get("format") != MANIFEST_FORMAT or (uid and job.get("uid") != uid):
        log.warning("%s was made for another job (%s): preparing here instead", output.uri(MANIFEST), job)
        return None
    if document.get("specDigest") != spec_digest(env):
        log.warning("%s was made for another dataset or model spec: preparing here instead", output.uri(MANIFEST))
        return None
    cache_dir = env.work / "dataset"
    pairs = [
        TrainingPair(
            stem=entry["stem"],
            caption=entry["caption"],
            bucket=tuple(entry["bucket"]),
            target_size=tuple(entry["targetSize"]) if entry.get("targetSize") else None,
            control_key=entry["control"]["key"],
            target_key=entry["target"]["key"],
            control_etag=entry["control"]["etag"],
            target_etag=entry["target"]["etag"],
            control_digest=entry["control"]["sha256"],
            target_digest=entry["target"]["sha256"],
            control_path=dataset.local_path(entry["control"]["key"], cache_dir),
            target_path=dataset.local_path(entry["target"]["key"], cache_dir),
        )
        for entry in document["dataset"]["pairs"]
    ]
    warnings = list(document["dataset"].get("warnings") or [])
    model = ModelDescription.from_json(document["model"])
    log.info(
        "starting from the preparation in %s: %d pairs, model %s%s",
        output.uri(MANIFEST),
        len(pairs),
        model.source,
        f" at commit {model.revision}" if model.revision else "",
        **fields(manifest=output.uri(MANIFEST), pairs=len(pairs), prepared_by=document.get("preparedBy")),
    )
    env.metrics.dataset_pairs.set(len(pairs))
    return PreparedInputs(dataset, output, pairs, model, warnings, output.uri(MANIFEST), images_local=False)
