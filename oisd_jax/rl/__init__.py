"""RL pieces: advantages, losses, chunked vocabulary terms, TrainBatch packing, the step.

Import the submodules (`from oisd_jax.rl import losses`, `from oisd_jax.rl.step import
make_train_step`); nothing is imported here so the submodules can import each other
without cycles.
"""
