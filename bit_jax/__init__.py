"""BiT in JAX: `models` (flax ResNet-v2 and the load_npz/predict/embed/save_npz contract), `ops`
(its CPU kernels with hand-written gradients), `data` (the tf.data pipeline shared with bit_tf2),
`backend` (the training step) and `train` (`python -m bit_jax.train`).

Importing the package or any module of it changes nothing process-wide; the settings that make
JAX train fast here (glibc keeping freed memory, the persistent compilation cache, inline CPU
dispatch) are applied by `bit_common.runtime.configure("jax")`, which the CLI calls.
"""
