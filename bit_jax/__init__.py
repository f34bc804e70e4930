"""BiT in JAX: `models` (flax ResNet-v2 + the load_npz/predict/embed/save_npz contract), `data`
(the shared tf.data pipeline of bit_tf2.data) and `train` (`python -m bit_jax.train`).

Importing the package imports nothing heavy; `bit_jax.models` needs only jax/flax (no TensorFlow).
It does set glibc's malloc to keep freed memory (`bit_common.runtime.retain_freed_memory`): XLA
allocates each step's scratch buffer afresh, and unmapped pages cost the kernel a zero-fill each.
"""

from bit_common.runtime import retain_freed_memory

retain_freed_memory()
