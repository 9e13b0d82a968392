"""Prometheus metrics of a training run (names and labels per docs/architecture.md), served over HTTP."""

from __future__ import annotations

import logging

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

LABELS = ("job_name", "job_namespace")  # not job/namespace: Prometheus sets those from the scrape target
STEP_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0)


class TrainerMetrics:
    """One registry per run, so several runs in one process (tests) never collide."""

    def __init__(self, job_name: str, job_namespace: str):
        self.registry = CollectorRegistry()
        labels = {"job_name": job_name, "job_namespace": job_namespace}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, LABELS, registry=self.registry).labels(**labels)

        self.loss = gauge("kontext_train_loss", "Training loss of the latest optimiser step (raw).")
        self.loss_ema = gauge("kontext_train_loss_ema", "Training loss, moving average (as in status.loss).")
        self.step = gauge("kontext_train_step", "Optimiser steps done.")
        self.total_steps = gauge("kontext_train_total_steps", "Optimiser steps the run will take.")
        self.learning_rate = gauge("kontext_train_learning_rate", "Current learning rate.")
        self.gpu_memory = gauge("kontext_train_gpu_memory_bytes", "GPU memory allocated by the trainer (0 on CPU).")
        self.world_size = gauge(
            "kontext_train_world_size", "Training processes (GPUs) of the job; rank 0 alone exports the series."
        )
        self.dataset_pairs = gauge("kontext_dataset_pairs", "Valid control/target pairs in the dataset.")
        self.validation_loss = gauge("kontext_train_validation_loss", "Held-out loss at the newest checkpoint.")
        self.edit_score = gauge(
            "kontext_train_edit_score", "Edit score (PSNR dB against the targets) of the newest checkpoint's LoRA."
        )
        self.step_seconds = Histogram(
            "kontext_train_step_seconds",
            "Wall time of one optimiser step.",
            LABELS,
            buckets=STEP_SECONDS_BUCKETS,
            registry=self.registry,
        ).labels(**labels)
        self.checkpoints_saved = Counter(
            "kontext_train_checkpoints_saved_total", "Checkpoints written and uploaded.", LABELS, registry=self.registry
        ).labels(**labels)
        self.gpu_memory.set(0)
        self.world_size.set(1)
        self._server = None

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        """Serve /metrics on `port` (0 or less: do not serve)."""
        if port > 0:
            self._server, _ = start_http_server(port, addr=address, registry=self.registry)
            log.info("serving Prometheus metrics on :%d/metrics", port)

    def observe_memory(self) -> None:
        if torch.cuda.is_available():
            self.gpu_memory.set(torch.cuda.memory_allocated())

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
