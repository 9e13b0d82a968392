"""kontext-lora: a Kubernetes-native operator and trainer for FLUX.1-Kontext-dev image-edit LoRAs."""

__version__ = "0.1.0"
