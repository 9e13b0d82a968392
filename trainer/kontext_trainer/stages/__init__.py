"""The stages of one training run, one module each; `train.TrainingRun` runs them in order.

- `preparation`: storage checks, the validated dataset, the model folder, the checkpoints to resume from;
- `setup`: the dataset encoded, the transformer with its LoRA, optimiser and schedule, resumed or measured;
- `loop`: the optimiser steps, with a checkpoint every `saveEvery` steps and on a stop signal;
- `checkpointing`: what a checkpoint holds and how a run resumes from one, the final LoRA.

They share a `RunEnvironment` (the job, the settings and the run's reporters) and hand each other plain
dataclasses (`context`), so each stage can be read, tested and changed without the others.
"""
