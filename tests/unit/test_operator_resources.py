"""The manifests a KontextLoRAJob becomes: names, ownership, GPU placement, env contract, pod security."""

from __future__ import annotations

import json

import pytest
from kontext_operator import resources
from kontext_operator.admission import DEPLOY_FILE, frozen_fields, render
from kontext_operator.rbac import trainer_rules

from kontext_lora.api import API_VERSION, KIND, GpuClass, parse_job
from kontext_lora.api.operator_config import OperatorConfig


def make_job(name: str = "jewels", **spec_overrides) -> object:
    spec = {
        "dataset": {"uri": "s3://data/jewels/", "controlDir": "before", "targetDir": "after"},
        "output": {"uri": "s3://out/jewels/"},
        "storage": {"credentialsSecret": "s3-credentials"},
        **spec_overrides,
    }
    document = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": "team", "uid": "uid-1", "generation": 3},
        "spec": spec,
    }
    return parse_job(document)


def env_of(job_manifest: dict) -> dict[str, dict]:
    container = job_manifest["spec"]["template"]["spec"]["containers"][0]
    return {item["name"]: item for item in container["env"]}


def test_names_are_deterministic_and_fit_63_characters() -> None:
    assert resources.child_name("jewels") == "jewels-trainer"
    long = "a" * 63
    name = resources.child_name(long)
    assert len(name) <= 63 and name.endswith("-trainer")
    assert name == resources.child_name(long), "same job, same name: a restart finds what it created"
    assert resources.child_name("a" * 60 + "bcd") != resources.child_name("a" * 60 + "bce")


def test_every_object_is_owned_by_the_job_and_labelled() -> None:
    job = make_job()
    for manifest in (
        resources.service_account(job),
        resources.role(job),
        resources.role_binding(job),
        resources.batch_job(job, OperatorConfig()),
    ):
        metadata = manifest["metadata"]
        assert metadata["name"] == "jewels-trainer" and metadata["namespace"] == "team"
        assert metadata["ownerReferences"] == [
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": "jewels",
                "uid": "uid-1",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert metadata["labels"][resources.JOB_LABEL] == "jewels"
        assert metadata["labels"][resources.MANAGED_BY_LABEL] == resources.MANAGED_BY


def test_per_job_role_is_limited_to_the_job_by_resource_names() -> None:
    job = make_job()
    assert resources.role(job)["rules"] == trainer_rules("jewels")
    binding = resources.role_binding(job)
    assert binding["roleRef"]["name"] == "jewels-trainer"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "jewels-trainer", "namespace": "team"}]


@pytest.mark.parametrize("gpu", list(GpuClass))
def test_gpu_class_becomes_affinity_tolerations_and_resource(gpu: GpuClass) -> None:
    job = make_job(resources={"gpu": gpu.value})
    config = OperatorConfig()
    manifest = resources.batch_job(job, config)
    pod = manifest["spec"]["template"]["spec"]
    placement = config.gpu_classes[gpu]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [m.to_wire() for m in placement.match_expressions]}]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"


def test_job_spec_retries_deadline_suspend_and_failure_policy() -> None:
    job = make_job(runPolicy={"backoffLimit": 5, "activeDeadlineSeconds": 3600}, suspend=True)
    spec = resources.batch_job(job, OperatorConfig())["spec"]
    assert spec["backoffLimit"] == 5 and spec["activeDeadlineSeconds"] == 3600 and spec["suspend"] is True
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert spec["podReplacementPolicy"] == "Failed"
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and rules[0]["onExitCodes"]["values"] == [2, 3, 4]
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert "ttlSecondsAfterFinished" not in spec, "the KontextLoRAJob's TTL removes the Job with it"


def test_trainer_pod_gets_time_to_checkpoint_on_sigterm() -> None:
    """The trainer saves a checkpoint on SIGTERM (exit 143, not a FailJob code): the grace period is its upload time."""
    pod = resources.batch_job(make_job(), OperatorConfig())["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 120
    config = OperatorConfig.model_validate({"trainer": {"terminationGracePeriodSeconds": 600}})
    assert resources.batch_job(make_job(), config)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 600
    rules = resources.pod_failure_policy()["rules"]
    assert 143 not in rules[0]["onExitCodes"]["values"], "a stopped trainer is retried, never failed for good"


def test_env_follows_the_contract_and_credentials_come_from_the_secret() -> None:
    job = make_job(storage={"endpoint": "http://minio:9000", "region": "eu-west-1", "credentialsSecret": "s3"})
    env = env_of(resources.batch_job(job, OperatorConfig()))
    document = json.loads(env["KONTEXT_LORA_JOB"]["value"])
    assert document["metadata"] == {"name": "jewels", "namespace": "team", "uid": "uid-1", "generation": 3}
    assert document["spec"]["dataset"]["uri"] == "s3://data/jewels/"
    assert parse_job(document).spec == job.spec, "the trainer reads back the same spec"
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://minio:9000"
    assert env["AWS_REGION"]["value"] == env["AWS_DEFAULT_REGION"]["value"] == "eu-west-1"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {"secretKeyRef": {"name": "s3", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "s3", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert env["KONTEXT_LORA_WORK_DIR"]["value"] == "/work"
    assert env["KONTEXT_LORA_REPORT_STATUS"]["value"] == "true"
    assert env["KONTEXT_LORA_METRICS_PORT"]["value"] == "9090"
    assert env["HF_HOME"]["value"] == "/cache/huggingface"
    assert all("value" in item or "valueFrom" in item for item in env.values())


def test_no_secret_means_no_credentials_env_and_cluster_defaults_fill_storage() -> None:
    job = make_job(storage={})
    config = OperatorConfig.model_validate({"defaultStorage": {"endpoint": "https://s3.local", "region": "eu-1"}})
    env = env_of(resources.batch_job(job, config))
    assert "AWS_ACCESS_KEY_ID" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "https://s3.local"
    assert env["AWS_REGION"]["value"] == "eu-1"
    assert json.loads(env["KONTEXT_LORA_JOB"]["value"])["spec"]["storage"]["endpoint"] == "https://s3.local"


def test_pod_runs_non_root_without_privileges() -> None:
    pod = resources.batch_job(make_job(), OperatorConfig())["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == resources.TRAINER_UID
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = pod["containers"][0]["securityContext"]
    assert container["allowPrivilegeEscalation"] is False and container["capabilities"] == {"drop": ["ALL"]}
    assert container["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert {"/work", "/cache", "/tmp"} <= mounts
    assert pod["serviceAccountName"] == "jewels-trainer"
    assert pod["containers"][0]["command"] == ["kontext-lora", "train", "--from-env"]
    assert pod["containers"][0]["ports"] == [{"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]


def test_model_cache_claim_is_mounted() -> None:
    pod = resources.batch_job(make_job(resources={"modelCacheClaim": "flux-cache"}), OperatorConfig())
    volumes = {v["name"]: v for v in pod["spec"]["template"]["spec"]["volumes"]}
    assert volumes["cache"] == {"name": "cache", "persistentVolumeClaim": {"claimName": "flux-cache"}}


def test_kueue_labels_go_to_the_batch_job_but_not_other_labels() -> None:
    job = make_job()
    job.metadata.labels.update({"kueue.x-k8s.io/queue-name": "gpu-queue", "team": "jewels"})
    labels = resources.batch_job(job, OperatorConfig())["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert "team" not in labels


def test_template_hash_ignores_fields_applied_in_place() -> None:
    base = make_job()
    assert resources.template_hash(base) == resources.template_hash(make_job(suspend=True))
    assert resources.template_hash(base) == resources.template_hash(make_job(runPolicy={"backoffLimit": 7}))
    assert resources.template_hash(base) != resources.template_hash(make_job(lora={"rank": 64}))


def test_admission_policy_file_is_generated_from_the_model() -> None:
    assert DEPLOY_FILE.read_text() == render(), "run `python -m kontext_operator.admission`"
    assert "suspend" not in frozen_fields() and "runPolicy" not in frozen_fields()
    assert {"lora", "training", "dataset", "output", "model"} <= set(frozen_fields())


def test_preparation_job_requests_no_gpu_and_runs_on_the_configured_cpu_nodes() -> None:
    config = OperatorConfig.model_validate(
        {
            "preparation": {
                "nodeSelector": {"node-pool": "cpu"},
                "tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}],
                "cpu": "2",
                "memory": "6Gi",
            }
        }
    )
    job = make_job(resources={"gpu": "L40S-48GB", "modelCacheClaim": "flux-cache"}, runPolicy={"backoffLimit": 7})
    manifest = resources.preparation_job(job, config)
    assert manifest["metadata"]["name"] == "jewels-prepare"
    assert manifest["metadata"]["labels"][resources.ROLE_LABEL] == resources.PREPARE_ROLE
    assert manifest["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    pod = manifest["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"] == ["kontext-lora", "prepare", "--from-env"]
    assert container["resources"] == {"requests": {"cpu": "2", "memory": "6Gi"}, "limits": {"memory": "6Gi"}}
    assert not any("gpu" in key for part in container["resources"].values() for key in part), "no GPU requested"
    assert pod["nodeSelector"] == {"node-pool": "cpu"}
    assert pod["tolerations"] == [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}]
    preferred = pod["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert preferred["preference"]["matchExpressions"] == [
        {"key": "nvidia.com/gpu.present", "operator": "NotIn", "values": ["true"]}
    ]
    assert pod["serviceAccountName"] == "jewels-trainer", "reports status through the job's own Role"
    assert {"name": "cache", "persistentVolumeClaim": {"claimName": "flux-cache"}} in pod["volumes"]
    env = env_of(manifest)
    assert env["KONTEXT_LORA_FILL_MODEL_CACHE"]["value"] == "true"
    assert "KONTEXT_LORA_METRICS_PORT" not in env and "KONTEXT_LORA_PREPARED" not in env
    spec = manifest["spec"]
    assert spec["backoffLimit"] == 2 and spec["activeDeadlineSeconds"] == 7200, "the operator config's, not runPolicy"
    assert spec["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [2, 3, 4]
    assert "kueue.x-k8s.io/queue-name" not in manifest["metadata"]["labels"]
    # The GPU Job starts from the preparation's manifest.
    assert env_of(resources.batch_job(job, config))["KONTEXT_LORA_PREPARED"]["value"] == "true"
    disabled = OperatorConfig.model_validate({"preparation": {"enabled": False}})
    assert "KONTEXT_LORA_PREPARED" not in env_of(resources.batch_job(job, disabled))


def test_hub_token_reaches_both_pods_by_secret_reference_only() -> None:
    config = OperatorConfig.model_validate(
        {"hub": {"endpoint": "https://hub-mirror.internal", "tokenSecret": {"name": "hf-default"}}}
    )
    own = make_job(model={"base": "black-forest-labs/FLUX.1-Kontext-dev", "tokenSecret": {"name": "hf", "key": "T"}})
    defaulted = make_job(model={"base": "black-forest-labs/FLUX.1-Kontext-dev"})
    not_hub = make_job(model={"base": "s3://models/flux-kontext/", "tokenSecret": {"name": "hf"}})
    for build in (resources.batch_job, resources.preparation_job):
        env = env_of(build(own, config))
        assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "T"}}}
        assert env["HF_ENDPOINT"]["value"] == "https://hub-mirror.internal"
        assert env_of(build(defaulted, config))["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": "hf-default",
            "key": "HF_TOKEN",
        }
        assert "HF_TOKEN" not in env_of(build(not_hub, config)), "only a hub model needs the token"
        assert "HF_TOKEN" not in env_of(build(defaulted, OperatorConfig()))


def test_one_gpu_keeps_the_plain_trainer_and_one_pod() -> None:
    manifest = resources.batch_job(make_job(), OperatorConfig())
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == resources.TRAINER_COMMAND
    assert not any(name.startswith("PET_") for name in env_of(manifest))
    assert "completionMode" not in manifest["spec"] and manifest["spec"]["parallelism"] == 1


def test_several_gpus_on_one_node_run_torchrun_in_one_pod() -> None:
    manifest = resources.batch_job(make_job(resources={"count": 4}), OperatorConfig())
    spec = manifest["spec"]
    container = spec["template"]["spec"]["containers"][0]
    assert container["command"] == ["torchrun", "--no-python", "kontext-lora", "train", "--from-env"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    env = env_of(manifest)
    assert {k: env[k].get("value") for k in ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK")} == {
        "PET_NNODES": "1",
        "PET_NPROC_PER_NODE": "4",
        "PET_NODE_RANK": "0",
    }
    assert env["PET_MASTER_ADDR"]["value"] == "127.0.0.1" and env["PET_MASTER_PORT"]["value"] == "29500"
    assert (spec["completions"], spec["parallelism"]) == (1, 1) and "completionMode" not in spec
    assert "subdomain" not in spec["template"]["spec"]


def test_several_nodes_make_an_indexed_job_with_a_headless_service_failing_as_one_group() -> None:
    job = make_job(resources={"count": 2, "nodes": 3}, runPolicy={"backoffLimit": 4})
    manifest = resources.batch_job(job, OperatorConfig())
    spec, pod = manifest["spec"], manifest["spec"]["template"]["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    assert pod["subdomain"] == "jewels-trainer"
    env = env_of(manifest)
    assert env["PET_NNODES"]["value"] == "3" and env["PET_NPROC_PER_NODE"]["value"] == "2"
    assert env["PET_NODE_RANK"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
    }
    # Index 0's stable hostname <job>-0 under the Service's subdomain.
    assert env["PET_MASTER_ADDR"]["value"] == "jewels-trainer-0.jewels-trainer"
    assert int(env["PET_SHUTDOWN_TIMEOUT"]["value"]) < pod["terminationGracePeriodSeconds"]
    # Any failed pod fails the whole Job (the operator replaces the group, counting runPolicy.backoffLimit).
    assert spec["backoffLimit"] == 0
    assert spec["podFailurePolicy"]["rules"][0] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "trainer", "operator": "NotIn", "values": [0]},
    }
    assert manifest["metadata"]["annotations"][resources.NODES_ANNOTATION] == "3"
    ports = {p["name"]: p["containerPort"] for p in pod["containers"][0]["ports"]}
    assert ports["rendezvous"] == 29500

    service = resources.rendezvous_service(job)
    assert service["metadata"]["name"] == "jewels-trainer"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {resources.JOB_LABEL: "jewels", resources.ROLE_LABEL: "train"}
    assert service["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert resources.rendezvous_service_name("7up") == "klj-7up-trainer", "Service names must start with a letter"
