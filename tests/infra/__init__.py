"""Real components for tests and benchmarks: a Kubernetes control plane, KWOK GPU nodes, MinIO, Prometheus.

Each is a real server binary started on loopback with a temporary data dir. Binaries are built once by
tests/cluster/build_binaries.sh into ~/.cache/kontext-lora/bin.
"""
