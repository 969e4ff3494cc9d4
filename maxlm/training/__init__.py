"""Training: the pure train step (`step`), the loop around it (`loop`), and what the loop uses.

step        TrainState, train/eval step, their jitted and sharded program
loop        setup, the training loop, stop requests, profiling
optim       Optax optimizer and learning-rate schedules
guard       stability guard: loss-spike and non-finite detection, skip/rollback
checkpoint  Orbax checkpoints: save, resume, reshard, parameters only
metrics     metrics.jsonl, TensorBoard, progress
hostmem     glibc malloc settings that keep XLA:CPU steps from faulting their memory in again
"""
