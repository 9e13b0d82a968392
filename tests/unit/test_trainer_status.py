"""The trainer's status reports: only trainer-owned fields, throttled, and never fatal when the API is down."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest
from kontext_trainer.progress import ProgressTracker, StatusReporter, status_payload

from kontext_lora.api import CheckpointRecord, Stage


def test_payload_is_camel_case_with_only_the_fields_set() -> None:
    payload = status_payload(
        {
            "stage": Stage.Training,
            "step": 10,
            "total_steps": 100,
            "eta_seconds": None,  # explicitly cleared: null in a merge patch removes the key
            "checkpoints": [CheckpointRecord(step=10, uri="s3://b/out/x.safetensors", validation_loss=0.5)],
            "last_progress_time": datetime(2025, 1, 1, tzinfo=UTC),
        }
    )
    assert payload == {
        "stage": "Training",
        "step": 10,
        "totalSteps": 100,
        "etaSeconds": None,
        "checkpoints": [{"step": 10, "uri": "s3://b/out/x.safetensors", "validationLoss": 0.5}],
        "lastProgressTime": "2025-01-01T00:00:00Z",
    }
    assert "conditions" not in payload and "restarts" not in payload  # the operator's, even with defaults


def test_operator_fields_are_refused() -> None:
    with pytest.raises(ValueError, match="phase"):
        status_payload({"phase": "Succeeded"})


class Sink:
    def __init__(self, failures: int = 0):
        self.failures = failures
        self.calls: list[dict] = []
        self.lock = threading.Lock()

    def __call__(self, payload: dict) -> None:
        with self.lock:
            if self.failures > 0:
                self.failures -= 1
                raise ConnectionError("apiserver unreachable")
            self.calls.append(payload)


def test_progress_is_throttled_and_forced_reports_go_out_at_once() -> None:
    sink = Sink()
    reporter = StatusReporter(sink, interval=60)
    for step in range(1, 200):
        reporter.update(step=step, total_steps=200)
    time.sleep(0.3)
    assert len(sink.calls) == 1  # the first one; the rest wait for the interval
    reporter.update(force=True, stage=Stage.Uploading)
    time.sleep(0.3)
    assert len(sink.calls) == 2 and sink.calls[-1]["stage"] == "Uploading"
    assert sink.calls[-1]["step"] == 199  # every report carries all trainer fields
    reporter.close()


def test_an_unreachable_api_never_raises_and_the_latest_status_arrives_later() -> None:
    sink = Sink(failures=5)
    reporter = StatusReporter(sink, interval=0.05)
    for step in range(1, 50):
        reporter.update(step=step)
        time.sleep(0.01)
    reporter.update(force=True, stage=Stage.Done, step=50)
    reporter.close(timeout=20)
    assert sink.calls and sink.calls[-1]["stage"] == "Done" and sink.calls[-1]["step"] == 50


def test_reporter_without_sink_does_nothing() -> None:
    reporter = StatusReporter(None)
    reporter.update(force=True, stage=Stage.Training)
    reporter.close()


def test_tracker_rate_and_eta() -> None:
    tracker = ProgressTracker(total_steps=100, start_step=40)
    assert tracker.steps_per_second is None and tracker.eta_seconds is None
    for step in range(41, 51):
        time.sleep(0.01)
        tracker.update(step, loss=1.0, learning_rate=1e-4)
    assert 20 < tracker.steps_per_second < 110
    assert tracker.eta_seconds == pytest.approx(50 / tracker.steps_per_second, abs=1)
    assert tracker.percentage == 50
    assert tracker.status_fields()["progress_percentage"] == 50
