"""A stand-in for `kontext-lora train --from-env` (and `prepare --from-env`) that follows the operator/trainer contract
and nothing else.

For tests of the operator and the node agent that must not depend on the real trainer (docs/architecture.md):
it reads `$KONTEXT_LORA_JOB`; as `prepare` it reports Preparing and exits with `$FAKE_PREPARE_EXIT` (default 0);
as `train` it reports Downloading -> Training (step, loss) -> Uploading with the pod's own
identity ($KUBECONFIG from the node agent: the per-job Role), then exits with `$FAKE_TRAINER_EXIT` (default 0),
writing `$FAKE_TRAINER_MESSAGE` to the termination-message file first when it fails. With `$FAKE_TRAINER_WAIT`
set it waits for SIGTERM (a suspended or deleted job) before reporting Uploading.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from kubernetes import client, config


def main() -> int:
    job = json.loads(os.environ["KONTEXT_LORA_JOB"])
    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
    api = client.CustomObjectsApi(config.new_client_from_config())
    work = Path(os.environ["KONTEXT_LORA_WORK_DIR"])
    work.joinpath("started").write_text(str(os.getpid()))

    def report(**status: object) -> None:
        status["lastProgressTime"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        api.patch_namespaced_custom_object_status(
            "kontext-lora.io",
            "v1alpha1",
            namespace,
            "kontextlorajobs",
            name,
            {"status": status},
            _content_type="application/merge-patch+json",
        )

    if sys.argv[1:2] == ["prepare"]:
        # The preparation pod's part of the contract: report what it does, exit 0 (or $FAKE_PREPARE_EXIT).
        report(stage="Preparing", preparation={"task": "validating pairs", "done": 3, "total": 3})
        code = int(os.environ.get("FAKE_PREPARE_EXIT", "0"))
        if code:
            Path(os.environ["KONTEXT_LORA_TERMINATION_LOG"]).write_text(os.environ.get("FAKE_PREPARE_MESSAGE", "bad"))
            return code
        report(datasetPairs=3, preparation={"task": "done", "done": 3, "total": 3})
        return 0

    terminated: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: terminated.append(signum))
    steps = int(job["spec"]["training"]["steps"])
    report(stage="Downloading", totalSteps=steps)
    report(stage="Training", step=steps // 2, totalSteps=steps, loss=0.25)
    if os.environ.get("FAKE_TRAINER_WAIT"):
        while not terminated:
            time.sleep(0.05)
        work.joinpath("terminated").write_text("SIGTERM")
        return 143
    code = int(os.environ.get("FAKE_TRAINER_EXIT", "0"))
    if code:
        Path(os.environ["KONTEXT_LORA_TERMINATION_LOG"]).write_text(os.environ.get("FAKE_TRAINER_MESSAGE", "failed"))
        return code
    report(stage="Uploading", step=steps, totalSteps=steps, loss=0.125)
    report(stage="Done", loraUri=job["spec"]["output"]["uri"] + name + ".safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
