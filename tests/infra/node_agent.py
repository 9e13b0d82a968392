"""A test-only mini-kubelet: a GPU Node and a CPU Node whose pods run as local processes, so an end-to-end test
trains for real.

The agent registers a Node labelled as GPU Feature Discovery labels an L40S 48 GB node (with the GPU taint and
`nvidia.com/gpu` capacity) and, beside it, a CPU-only Node (`<name>-cpu`, no GPU, no taint) where the preparation
pods that run before a job's GPU pod land. It renews both Leases in kube-node-lease so the node lifecycle controller
keeps them Ready, and watches the pods the real scheduler binds to them. For each pod it does what a kubelet does,
minus containers:

- runs the first container's `command` + `args` as a process (`kontext-lora` maps to `.venv/bin/kontext-lora`),
  with the pod's environment resolved: literal values with `$(VAR)` expansion, `secretKeyRef`/`configMapKeyRef`
  (read through the API; a missing one leaves the pod waiting in CreateContainerConfigError, as a kubelet does),
  `fieldRef`;
- mounts: every volume becomes a folder (a PersistentVolumeClaim one folder per claim, shared by the pods that mount
  it); environment values under a mount path are rewritten to that folder;
- identity: mints a token for the pod's ServiceAccount (TokenRequest, bound to the pod) and hands the process a
  KUBECONFIG with it, so the process's API calls go through the pod's real RBAC;
- status: Running with the container state, then Succeeded/Failed with the exit code and the termination
  message, read from `$KONTEXT_LORA_TERMINATION_LOG` (the pod's `terminationMessagePath` mapped to a file;
  FallbackToLogsOnError uses the log tail);
- deletion: SIGTERM, SIGKILL after the grace period (the pod's `deletionGracePeriodSeconds`; a forced deletion's 0
  becomes 1 s, as on a kubelet), terminal status, then the final delete.

`kill_pod()` SIGKILLs a pod's processes, all of them as a container runtime would (node failure / OOM for the
fault-injection tests). Runs in threads of the
test process; logs of each pod's process are in `root/pods/<namespace>_<name>/log`.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config, watch

from .controlplane import ControlPlane

REPO = Path(__file__).resolve().parents[2]
DEFAULT_COMMANDS = {"kontext-lora": [str(REPO / ".venv" / "bin" / "kontext-lora")]}
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
LEASE_SECONDS = 40
RENEW_SECONDS = 10
TERMINATION_MESSAGE_LIMIT = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048
VAR_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")

log = logging.getLogger("node-agent")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: defined names are replaced, unknown ones stay as written, `$$` escapes."""
    parts = value.split("$$")
    expanded = [VAR_REFERENCE.sub(lambda m: env.get(m.group(1), m.group(0)), part) for part in parts]
    return "$".join(expanded)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children...), read from /proc."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        found += [int(c) for c in children]
        pending += [int(c) for c in children]
    return found


class ConfigError(Exception):
    """What keeps a container from starting (CreateContainerConfigError): a missing Secret, key or ConfigMap."""


@dataclass
class RunningPod:
    namespace: str
    name: str
    uid: str
    directory: Path
    process: subprocess.Popen | None = None
    started_at: str = ""
    grace_seconds: int = 30
    terminating: bool = False
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def log_path(self) -> Path:
        return self.directory / "log"


@dataclass
class NodeAgent:
    plane: ControlPlane
    root: Path
    name: str = "agent-l40s-0"
    gpu_product: str = "NVIDIA-L40S"
    gpu_memory_mib: int = 46068
    gpus: int = 1
    cpu_node: bool = True
    """Also register `<name>-cpu`, a CPU-only node (preparation pods run there)."""
    commands: dict[str, list[str]] = field(default_factory=lambda: dict(DEFAULT_COMMANDS))
    """What a container's command runs here: its first word (or that word's file name) -> argv prefix."""
    env_overrides: dict[str, str] = field(default_factory=dict)
    """Set in every process after the pod's own environment (e.g. a free metrics port on this shared host)."""
    pods: dict[str, RunningPod] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.api = config.new_client_from_config(config_file=str(self.plane.kubeconfig))
        self.core = client.CoreV1Api(self.api)
        self.coordination = client.CoordinationV1Api(self.api)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watches: list[watch.Watch] = []
        self._threads: list[threading.Thread] = []
        self.root.mkdir(parents=True, exist_ok=True)

    # ---- nodes and leases -------------------------------------------------------------------------------------

    @property
    def cpu_name(self) -> str:
        return f"{self.name}-cpu"

    @property
    def node_names(self) -> list[str]:
        return [self.name, *([self.cpu_name] if self.cpu_node else [])]

    def node_manifest(self, name: str | None = None) -> dict[str, Any]:
        name = name or self.name
        labels = {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "kontext-lora.io/node-agent": "true",
        }
        spec: dict[str, Any] = {}
        if name == self.name:
            labels |= {
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": self.gpu_product,
                "nvidia.com/gpu.memory": str(self.gpu_memory_mib),
                "nvidia.com/gpu.count": str(self.gpus),
            }
            spec["taints"] = [GPU_TAINT]
        return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}, "spec": spec}

    def node_status(self, name: str | None = None) -> dict[str, Any]:
        name = name or self.name
        capacity = {"cpu": "16", "memory": "64Gi", "pods": "20"}
        if name == self.name:
            capacity["nvidia.com/gpu"] = str(self.gpus)
        now = _now()
        return {
            "status": {
                "capacity": capacity,
                "allocatable": capacity,
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "kontext-lora test node agent is posting ready status",
                        "lastHeartbeatTime": now,
                        "lastTransitionTime": now,
                    }
                ],
                "addresses": [
                    {"type": "InternalIP", "address": "127.0.0.1"},
                    {"type": "Hostname", "address": name},
                ],
                "nodeInfo": {
                    "kubeletVersion": "v1.34.4-node-agent",
                    "kubeProxyVersion": "",
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                    "containerRuntimeVersion": "process://local",
                    "kernelVersion": os.uname().release,
                    "osImage": "test host",
                    "machineID": "",
                    "systemUUID": "",
                    "bootID": "",
                },
            }
        }

    def _register(self) -> None:
        for name in self.node_names:
            try:
                self.core.create_node(self.node_manifest(name))
            except client.ApiException as error:
                if error.status != 409:
                    raise
            self.core.patch_node_status(name, self.node_status(name))

    def _renew_lease(self, name: str | None = None) -> None:
        name = name or self.name
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": _micro_now()},
        }
        try:
            self.coordination.patch_namespaced_lease(name, "kube-node-lease", {"spec": lease["spec"]})
        except client.ApiException as error:
            if error.status != 404:
                raise
            self.coordination.create_namespaced_lease("kube-node-lease", lease)

    def _heartbeat(self) -> None:
        beats = 0
        while not self._stop.wait(0 if beats == 0 else RENEW_SECONDS):
            for name in self.node_names:
                try:
                    self._renew_lease(name)
                    if beats % 3 == 0:
                        self.core.patch_node_status(name, self.node_status(name))
                except Exception as error:  # keep beating through apiserver hiccups
                    log.warning("heartbeat of %s failed: %s", name, error)
            beats += 1

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        waiting = list(self.node_names)
        while time.monotonic() < deadline:
            for name in list(waiting):
                node = self.api.sanitize_for_serialization(self.core.read_node(name))
                ready = [c for c in node["status"].get("conditions", []) if c["type"] == "Ready"]
                taints = {t["key"] for t in node["spec"].get("taints") or []}
                if ready and ready[0]["status"] == "True" and "node.kubernetes.io/not-ready" not in taints:
                    waiting.remove(name)
            if not waiting:
                return
            time.sleep(0.2)
        raise TimeoutError(f"nodes {waiting} not Ready")

    # ---- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> NodeAgent:
        self._register()
        for name in self.node_names:
            self._renew_lease(name)
        targets = [(self._heartbeat, (), "heartbeat")]
        targets += [(self._watch_pods, (name,), f"pods-{name}") for name in self.node_names]
        for target, args, label in targets:
            thread = threading.Thread(target=target, args=args, name=f"{self.name}-{label}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self.wait_ready()
        return self

    def stop(self) -> None:
        self._stop.set()
        for stream in self._watches:
            stream.stop()
        with self._lock:
            running = list(self.pods.values())
        for pod in running:
            self._signal(pod, signal.SIGKILL)
        for name in self.node_names:
            with contextlib.suppress(client.ApiException):
                self.core.delete_node(name)
        self.api.close()

    # ---- pods -----------------------------------------------------------------------------------------------

    def _watch_pods(self, node: str) -> None:
        version = None
        stream = watch.Watch()
        self._watches.append(stream)
        while not self._stop.is_set():
            try:
                for event in stream.stream(
                    self.core.list_pod_for_all_namespaces,
                    field_selector=f"spec.nodeName={node}",
                    resource_version=version,
                    timeout_seconds=120,
                ):
                    pod = self.api.sanitize_for_serialization(event["object"])
                    version = pod["metadata"].get("resourceVersion")
                    self._on_pod(event["type"], pod)
            except client.ApiException as error:
                if error.status == 410:
                    version = None
                    continue
                if not self._stop.is_set():
                    log.warning("pod watch failed: %s", error)
                    time.sleep(1)
            except Exception as error:
                if not self._stop.is_set():
                    log.warning("pod watch failed: %s", error)
                    time.sleep(1)

    def _on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        metadata, status = pod["metadata"], pod.get("status") or {}
        uid = metadata["uid"]
        with self._lock:
            running = self.pods.get(uid)
        if kind == "DELETED":
            return
        if metadata.get("deletionTimestamp"):
            if running is None:
                if status.get("phase") in ("Succeeded", "Failed") or not status.get("containerStatuses"):
                    self._finalize_delete(metadata["namespace"], metadata["name"])
                return
            if not running.terminating:
                running.terminating = True
                grace = metadata.get("deletionGracePeriodSeconds")
                if grace is None:
                    grace = pod["spec"].get("terminationGracePeriodSeconds", running.grace_seconds)
                # The kubelet's calculateEffectiveGracePeriod: `--grace-period=0 --force` still gets 1 s of SIGTERM.
                running.grace_seconds = max(int(grace), 1)
                threading.Thread(target=self._terminate, args=(running,), daemon=True).start()
            return
        if running is None and status.get("phase") not in ("Succeeded", "Failed"):
            directory = self.root / "pods" / f"{metadata['namespace']}_{metadata['name']}"
            running = RunningPod(metadata["namespace"], metadata["name"], uid, directory)
            with self._lock:
                self.pods[uid] = running
            threading.Thread(target=self._run, args=(running, pod), name=f"pod-{metadata['name']}", daemon=True).start()

    def _secret_value(self, namespace: str, name: str, key: str, optional: bool) -> str | None:
        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except client.ApiException as error:
            if error.status == 404:
                if optional:
                    return None
                raise ConfigError(f'secret "{name}" not found') from None
            raise
        data = secret.data or {}
        if key not in data:
            if optional:
                return None
            raise ConfigError(f"couldn't find key {key} in Secret {namespace}/{name}")
        return base64.b64decode(data[key]).decode()

    def _config_map_value(self, namespace: str, name: str, key: str, optional: bool) -> str | None:
        try:
            data = self.core.read_namespaced_config_map(name, namespace).data or {}
        except client.ApiException as error:
            if error.status == 404:
                if optional:
                    return None
                raise ConfigError(f'configmap "{name}" not found') from None
            raise
        if key not in data:
            if optional:
                return None
            raise ConfigError(f"couldn't find key {key} in ConfigMap {namespace}/{name}")
        return data[key]

    @staticmethod
    def _field(pod: dict[str, Any], path: str) -> str:
        metadata = pod["metadata"]
        if match := re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path):
            return (metadata.get(match.group(1)) or {}).get(match.group(2), "")
        values = {
            "metadata.name": metadata["name"],
            "metadata.namespace": metadata["namespace"],
            "metadata.uid": metadata["uid"],
            "spec.nodeName": pod["spec"].get("nodeName", ""),
            "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
            "status.podIP": "127.0.0.1",
            "status.hostIP": "127.0.0.1",
        }
        if path not in values:
            raise ConfigError(f"unsupported fieldRef {path}")
        return values[path]

    def resolve_env(self, pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
        namespace = pod["metadata"]["namespace"]
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if ref := source.get("secretRef"):
                secret = self.core.read_namespaced_secret(ref["name"], namespace).data or {}
                env.update({prefix + k: base64.b64decode(v).decode() for k, v in secret.items()})
            if ref := source.get("configMapRef"):
                env.update(
                    {
                        prefix + k: v
                        for k, v in (self.core.read_namespaced_config_map(ref["name"], namespace).data or {}).items()
                    }
                )
        for item in container.get("env") or []:
            name = item["name"]
            if "value" in item:
                env[name] = expand(item.get("value") or "", env)
                continue
            source = item.get("valueFrom") or {}
            value: str | None
            if ref := source.get("secretKeyRef"):
                value = self._secret_value(namespace, ref["name"], ref["key"], bool(ref.get("optional")))
            elif ref := source.get("configMapKeyRef"):
                value = self._config_map_value(namespace, ref["name"], ref["key"], bool(ref.get("optional")))
            elif ref := source.get("fieldRef"):
                value = self._field(pod, ref["fieldPath"])
            else:
                raise ConfigError(f"unsupported valueFrom in env {name}: {source}")
            if value is not None:
                env[name] = value
        return env

    def _token(self, pod: dict[str, Any]) -> str:
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": 3600,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": pod["metadata"]["name"],
                    "uid": pod["metadata"]["uid"],
                },
            },
        }
        account = pod["spec"].get("serviceAccountName") or "default"
        response = self.core.create_namespaced_service_account_token(account, pod["metadata"]["namespace"], request)
        return self.api.sanitize_for_serialization(response)["status"]["token"]

    def _kubeconfig(self, running: RunningPod, token: str) -> Path:
        cluster = yaml.safe_load(self.plane.kubeconfig.read_text())["clusters"][0]["cluster"]
        path = running.directory / "kubeconfig"
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "pod",
                    "clusters": [{"name": "cluster", "cluster": cluster}],
                    "users": [{"name": "pod", "user": {"token": token}}],
                    "contexts": [
                        {
                            "name": "pod",
                            "context": {"cluster": "cluster", "user": "pod", "namespace": running.namespace},
                        }
                    ],
                }
            )
        )
        path.chmod(0o600)
        return path

    def _prepare(self, running: RunningPod, pod: dict[str, Any]) -> tuple[list[str], dict[str, str], Path]:
        container = pod["spec"]["containers"][0]
        folders: dict[str, Path] = {}
        for volume in pod["spec"].get("volumes") or []:
            if claim := (volume.get("persistentVolumeClaim") or {}).get("claimName"):
                # A claim is the same volume for every pod that mounts it (one after the other, as ReadWriteOnce).
                folder = self.root / "claims" / running.namespace / claim
            else:
                folder = running.directory / "volumes" / volume["name"]
            folder.mkdir(parents=True, exist_ok=True)
            folders[volume["name"]] = folder
        mounts: dict[str, Path] = {}
        for mount in container.get("volumeMounts") or []:
            target = folders[mount["name"]]
            mounts[mount["mountPath"].rstrip("/") or "/"] = target / mount.get("subPath", "")
        env = self.resolve_env(pod, container)
        # Values under a mount path point into that volume's folder (longest mount path first).
        for key, value in env.items():
            for path in sorted(mounts, key=len, reverse=True):
                if value == path or value.startswith(path + "/"):
                    env[key] = str(mounts[path]) + value[len(path) :]
                    break
        termination = running.directory / "termination-log"
        termination.write_text("")
        argv = [expand(arg, env) for arg in (container.get("command") or []) + (container.get("args") or [])]
        if not argv:
            raise ConfigError("the container has no command: images' entrypoints cannot run on this node")
        argv = [*self.commands.get(argv[0], self.commands.get(Path(argv[0]).name, [argv[0]])), *argv[1:]]
        base = {
            key: os.environ[key] for key in ("PATH", "LANG", "LC_ALL", "TMPDIR", "OMP_NUM_THREADS") if key in os.environ
        }
        process_env = {
            **base,
            **env,
            "KUBECONFIG": str(self._kubeconfig(running, self._token(pod))),
            "KONTEXT_LORA_TERMINATION_LOG": str(termination),
            "PYTHONUNBUFFERED": "1",
            **self.env_overrides,
        }
        working_dir = container.get("workingDir")
        cwd = mounts.get(working_dir, running.directory) if working_dir else running.directory
        return argv, process_env, cwd

    def _patch_status(self, running: RunningPod, status: dict[str, Any]) -> None:
        """Report a pod's status; while the apiserver cannot be reached (an outage, a restart) keep trying, as a
        kubelet's status manager does, so no ending is lost."""
        delay = 0.5
        while True:
            try:
                self.core.patch_namespaced_pod_status(running.name, running.namespace, {"status": status})
                return
            except client.ApiException as error:
                if error.status == 404 or self._stop.is_set():
                    return
                if error.status < 500:
                    raise
                failure: Exception = error
            except Exception as error:  # connection refused or cut
                if self._stop.is_set():  # the cluster is going away with the test session
                    return
                failure = error
            log.warning(
                "status of pod %s/%s not reported (%s); again in %.1fs", running.namespace, running.name, failure, delay
            )
            self._stop.wait(delay)
            delay = min(delay * 2, 5.0)

    def _container_status(self, pod: dict[str, Any], state: dict[str, Any], ready: bool, running: RunningPod) -> dict:
        container = pod["spec"]["containers"][0]
        return {
            "name": container["name"],
            "image": container.get("image", ""),
            "imageID": "",
            "containerID": f"process://{running.process.pid if running.process else 0}",
            "ready": ready,
            "started": ready,
            "restartCount": 0,
            "state": state,
        }

    def _run(self, running: RunningPod, pod: dict[str, Any]) -> None:
        running.directory.mkdir(parents=True, exist_ok=True)
        while not self._stop.is_set() and not running.terminating:
            try:
                argv, env, cwd = self._prepare(running, pod)
                break
            except ConfigError as error:  # a kubelet keeps retrying; so do we
                waiting = {"waiting": {"reason": "CreateContainerConfigError", "message": str(error)}}
                self._patch_status(
                    running,
                    {"phase": "Pending", "containerStatuses": [self._container_status(pod, waiting, False, running)]},
                )
                time.sleep(2)
            except Exception as error:
                log.exception("could not start pod %s/%s", running.namespace, running.name)
                self._finish(running, pod, 128, f"node agent: {error}")
                return
        else:
            self._finish(running, pod, 137, "")  # deleted before its process started
            return
        if running.terminating:
            self._finish(running, pod, 137, "")
            return
        with running.log_path.open("ab") as output:
            running.process = subprocess.Popen(
                argv, env=env, cwd=cwd, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        running.started_at = _now()
        state = {"running": {"startedAt": running.started_at}}
        self._patch_status(
            running,
            {
                "phase": "Running",
                "startTime": running.started_at,
                "hostIP": "127.0.0.1",
                "podIP": "127.0.0.1",
                "podIPs": [{"ip": "127.0.0.1"}],
                "conditions": [
                    {"type": kind, "status": "True", "lastTransitionTime": running.started_at}
                    for kind in ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready")
                ],
                "containerStatuses": [self._container_status(pod, state, True, running)],
            },
        )
        code = running.process.wait()
        exit_code = code if code >= 0 else 128 - code  # killed by signal N: 128 + N
        self._finish(running, pod, exit_code, self._termination_message(running, pod, exit_code))

    def _termination_message(self, running: RunningPod, pod: dict[str, Any], exit_code: int) -> str:
        path = running.directory / "termination-log"
        message = path.read_bytes()[:TERMINATION_MESSAGE_LIMIT].decode(errors="replace") if path.exists() else ""
        policy = pod["spec"]["containers"][0].get("terminationMessagePolicy", "File")
        if not message.strip() and exit_code != 0 and policy == "FallbackToLogsOnError" and running.log_path.exists():
            lines = running.log_path.read_bytes().decode(errors="replace").splitlines()[-FALLBACK_LOG_LINES:]
            message = "\n".join(lines)[-FALLBACK_LOG_BYTES:]
        return message

    def _finish(self, running: RunningPod, pod: dict[str, Any], exit_code: int, message: str) -> None:
        now = _now()
        terminated = {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 else "Error",
            "startedAt": running.started_at or now,
            "finishedAt": now,
        }
        if message:
            terminated["message"] = message
        self._patch_status(
            running,
            {
                "phase": "Succeeded" if exit_code == 0 else "Failed",
                "conditions": [
                    {"type": kind, "status": "False", "reason": "PodCompleted", "lastTransitionTime": now}
                    for kind in ("ContainersReady", "Ready")
                ],
                "containerStatuses": [self._container_status(pod, {"terminated": terminated}, False, running)],
            },
        )
        running.done.set()
        if running.terminating:
            self._finalize_delete(running.namespace, running.name)
        with self._lock:
            self.pods.pop(running.uid, None)

    def _signal(self, running: RunningPod, sig: int) -> None:
        if running.process and running.process.poll() is None:
            # A container's SIGKILL ends every process in it; launchers such as torchrun start their workers in
            # sessions of their own, which the process group alone would miss.
            descendants = _descendants(running.process.pid) if sig == signal.SIGKILL else []
            with contextlib.suppress(ProcessLookupError):
                os.killpg(running.process.pid, sig)
            for pid in descendants:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)

    def _terminate(self, running: RunningPod) -> None:
        """Graceful deletion: SIGTERM, SIGKILL after the grace period; `_run` then reports and deletes."""
        self._signal(running, signal.SIGTERM)
        if running.process is None:
            return
        try:
            running.process.wait(max(running.grace_seconds, 1))
        except subprocess.TimeoutExpired:
            self._signal(running, signal.SIGKILL)

    def _finalize_delete(self, namespace: str, name: str) -> None:
        try:
            self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
        except client.ApiException as error:
            if error.status != 404:
                log.warning("final delete of %s/%s failed: %s", namespace, name, error)

    # ---- for tests --------------------------------------------------------------------------------------------

    def find(self, namespace: str, name: str) -> RunningPod | None:
        with self._lock:
            return next((p for p in self.pods.values() if p.namespace == namespace and p.name == name), None)

    def wait_process(self, namespace: str, name: str, timeout: float = 60) -> RunningPod:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = self.find(namespace, name)
            if running and running.process:
                return running
            time.sleep(0.1)
        raise TimeoutError(f"no process for pod {namespace}/{name}")

    def kill_pod(self, namespace: str, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill a pod's process without deleting the pod (the node reports it Failed with 128 + signal)."""
        running = self.wait_process(namespace, name, timeout=10)
        self._signal(running, sig)

    def find_dir(self, namespace: str, name: str) -> Path:
        """The folder of a pod (its volumes, log, kubeconfig), also after it ended."""
        return self.root / "pods" / f"{namespace}_{name}"

    def pod_log(self, namespace: str, name: str) -> str:
        path = self.root / "pods" / f"{namespace}_{name}" / "log"
        return path.read_text(errors="replace") if path.exists() else ""

    def cleanup(self) -> None:
        shutil.rmtree(self.root / "pods", ignore_errors=True)
