"""The kontext-lora trainer: FLUX.1-Kontext LoRA training from a KontextLoRAJob (runs in the GPU pod).

Entry points: `main.run_training` (`kontext-lora train`), `demo.run_demo` (`kontext-lora demo`),
`tiny_model.save_tiny_model` (`kontext-lora tiny-model`). The math is in `flux_math`, one optimiser step in
`train_step.KontextTrainStep`, a whole run in `train.TrainingRun`.
"""

import os
from importlib.metadata import PackageNotFoundError, version

# transformers warns at import time about optional image backends the trainer never uses (torchvision);
# in a pod's log that reads like a problem. Its warnings stay visible at error level.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

try:
    __version__ = version("kontext-lora")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
