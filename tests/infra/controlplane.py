"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager, kube-scheduler.

Authentication is by client certificates from a throw-away CA, authorization is RBAC (so least-privilege
checks in tests are real), and each component runs under its own identity as on a real cluster.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .binaries import binary
from .pki import CertificateAuthority, KeyPair, service_account_keys
from .processes import ServerProcess, free_port, wait_for

SERVICE_CIDR = "10.96.0.0/16"


class KubectlError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return f"kubectl {' '.join(self.cmd[2:])} exited {self.returncode}:\n{self.stderr}"


@dataclass
class ControlPlane:
    root: Path
    kubeconfig: Path = field(init=False)
    server: str = field(init=False)
    processes: list[ServerProcess] = field(default_factory=list)
    started_seconds: float = 0.0
    owns_root: bool = False

    @classmethod
    def start(cls, root: Path | None = None) -> ControlPlane:
        owns = root is None
        root = Path(tempfile.mkdtemp(prefix="kontext-k8s-")) if root is None else root
        plane = cls(root=root, owns_root=owns)
        try:
            plane._start()
        except BaseException:
            plane.stop()
            raise
        return plane

    def _start(self) -> None:
        began = time.monotonic()
        pki = self.root / "pki"
        logs = self.root / "logs"
        ca = CertificateAuthority(pki)
        self.ca = ca.cert
        sa = service_account_keys(pki)
        api_port = free_port()
        self.server = f"https://127.0.0.1:{api_port}"
        serving = ca.issue(
            "apiserver",
            "kube-apiserver",
            server=True,
            hosts=("127.0.0.1", "localhost", "10.96.0.1", "kubernetes", "kubernetes.default", "kubernetes.default.svc"),
        )
        self.admin = ca.issue("admin", "kontext-admin", organization="system:masters")
        self.kubeconfig = self.write_kubeconfig("admin", self.admin)

        etcd_port, etcd_peer = free_port(), free_port()
        etcd = ServerProcess(
            "etcd",
            [
                binary("etcd"),
                "--data-dir",
                self.root / "etcd",
                "--name",
                "test",
                "--listen-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{etcd_peer}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{etcd_peer}",
                "--initial-cluster",
                f"test=http://127.0.0.1:{etcd_peer}",
                "--unsafe-no-fsync",
                "--quota-backend-bytes",
                str(4 * 1024**3),
                "--log-level",
                "warn",
            ],
            logs,
        ).start()
        self.processes.append(etcd)
        etcd.wait_ready(lambda: _http_ok(f"http://127.0.0.1:{etcd_port}/health"), timeout=30)

        apiserver = ServerProcess(
            "kube-apiserver",
            [
                binary("kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                f"--tls-cert-file={serving.cert}",
                f"--tls-private-key-file={serving.key}",
                f"--client-ca-file={ca.cert}",
                "--authorization-mode=Node,RBAC",
                f"--service-account-key-file={sa.cert}",
                f"--service-account-signing-key-file={sa.key}",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                "--endpoint-reconciler-type=none",
                "--profiling=false",
                "--v=1",
            ],
            logs,
        ).start()
        self.processes.append(apiserver)
        self.apiserver = apiserver
        apiserver.wait_ready(lambda: self._get("/readyz") == 200, timeout=90)

        controller_manager = ServerProcess(
            "kube-controller-manager",
            [
                binary("kube-controller-manager"),
                f"--kubeconfig={self._identity(ca, 'controller-manager', 'system:kube-controller-manager')}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--service-account-private-key-file={sa.key}",
                f"--root-ca-file={ca.cert}",
                "--use-service-account-credentials=true",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-node-route-controller",
                "--concurrent-job-syncs=10",
                "--concurrent-gc-syncs=20",
                "--kube-api-qps=100",
                "--kube-api-burst=200",
                "--v=1",
            ],
            logs,
        ).start()
        self.processes.append(controller_manager)

        scheduler = ServerProcess(
            "kube-scheduler",
            [
                binary("kube-scheduler"),
                f"--kubeconfig={self._identity(ca, 'scheduler', 'system:kube-scheduler')}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--v=1",
            ],
            logs,
        ).start()
        self.processes.append(scheduler)
        # Ready when the controller manager has created the default service account (its controllers run).
        controller_manager.wait_ready(
            lambda: self._get("/api/v1/namespaces/default/serviceaccounts/default") == 200, 90
        )
        scheduler.wait_ready(lambda: "Serving securely" in scheduler.log_path.read_text(), 60)
        self.started_seconds = time.monotonic() - began

    def stop_apiserver(self, grace: float = 10) -> float:
        """Stop kube-apiserver (SIGTERM, SIGKILL after `grace` seconds, as a control-plane restart or a crash does);
        etcd, the controllers and everything else keep running. Seconds it took to exit."""
        began = time.monotonic()
        self.apiserver.stop(grace=grace)
        return time.monotonic() - began

    def start_apiserver(self, timeout: float = 90) -> float:
        """Start kube-apiserver again with the same flags (port, certificates, etcd): every kubeconfig and token stays
        valid. Seconds until it is ready (/readyz)."""
        began = time.monotonic()
        restarted = ServerProcess(self.apiserver.name, self.apiserver.argv, self.apiserver.log_path.parent).start()
        self.processes[self.processes.index(self.apiserver)] = restarted
        self.apiserver = restarted
        restarted.wait_ready(lambda: self._get("/readyz") == 200, timeout=timeout)
        return time.monotonic() - began

    def wait_controllers_caught_up(self, timeout: float = 180) -> float:
        """After an apiserver restart, wait until the controller manager and the scheduler act on new objects again:
        their informers re-list after a backoff that grows during an outage (client-go: up to 30 s, jittered), so a
        namespace made right after the return may get its `default` ServiceAccount, and a Job its pod and node, only
        tens of seconds later. Probes with a namespace of its own (deleted afterwards). Seconds it took."""
        began = time.monotonic()
        name = f"probe-{uuid.uuid4().hex[:8]}"
        self.kubectl("create", "namespace", name)
        try:
            wait_for(
                lambda: self.kubectl("get", "sa", "default", "-n", name, check=False).returncode == 0,
                timeout,
                0.5,
                f"the controller manager to make the default ServiceAccount in {name}",
            )
            # A Job: the job controller must make its pod (Job and pod informers), the scheduler bind it (its own).
            job = {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": {"name": "probe", "namespace": name},
                "spec": {
                    "template": {
                        "spec": {
                            "restartPolicy": "Never",
                            "containers": [{"name": "probe", "image": "probe"}],
                            "nodeSelector": {"type": "kwok"},  # a fake node: nothing tries to run it
                            "tolerations": [{"operator": "Exists"}],
                        }
                    }
                },
            }
            self.kubectl("apply", "-f", "-", input=json.dumps(job))
            jsonpath = "-o=jsonpath={.items[*].spec.nodeName}"
            wait_for(
                lambda: self.kubectl("get", "pods", "-n", name, "-l", "job-name=probe", jsonpath).stdout.strip(),
                max(began + timeout - time.monotonic(), 1),
                0.5,
                f"a pod of the probe Job in {name}, made and bound to a node",
            )
        finally:
            self.kubectl("delete", "namespace", name, "--wait=false", check=False)
        return time.monotonic() - began

    def _identity(self, ca: CertificateAuthority, name: str, user: str) -> Path:
        return self.write_kubeconfig(name, ca.issue(name, user))

    def write_kubeconfig(
        self, name: str, pair: KeyPair | None = None, token: str | None = None, namespace: str | None = None
    ) -> Path:
        """A kubeconfig for an identity: a client certificate from the test CA or a bearer token."""
        user: dict = {"token": token} if token else {"client-certificate": str(pair.cert), "client-key": str(pair.key)}
        context: dict = {"cluster": "kontext-test", "user": name}
        if namespace:
            context["namespace"] = namespace
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": name,
            "clusters": [
                {"name": "kontext-test", "cluster": {"server": self.server, "certificate-authority": str(self.ca)}}
            ],
            "users": [{"name": name, "user": user}],
            "contexts": [{"name": name, "context": context}],
        }
        path = self.root / "kubeconfigs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def _get(self, path: str) -> int:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.admin.cert), str(self.admin.key))
        try:
            with urllib.request.urlopen(self.server + path, context=context, timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        kubeconfig: Path | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess:
        argv = [str(binary("kubectl")), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def wait_established(self, crd: str, timeout: float = 60) -> None:
        """Wait for a CRD's Established condition. Not `kubectl wait --for=condition=Established`: right after the
        create the CRD has no conditions yet, and kubectl then fails ("status.conditions accessor error: <nil>")
        instead of waiting (seen once in this suite)."""
        deadline = time.monotonic() + timeout
        jsonpath = '{.status.conditions[?(@.type=="Established")].status}'
        while True:
            result = self.kubectl("get", f"crd/{crd}", "-o", f"jsonpath={jsonpath}", check=False)
            if result.returncode == 0 and result.stdout.strip() == "True":
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRD {crd} not Established after {timeout:.0f} s: {result.stdout}{result.stderr}")
            time.sleep(0.1)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()
        if self.owns_root:
            shutil.rmtree(self.root, ignore_errors=True)


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status == 200
