"""BiT in JAX: `models` (flax ResNet-v2 + the load_npz/predict/embed/save_npz contract), `data`
(the shared tf.data pipeline of bit_tf2.data) and `train` (`python -m bit_jax.train`).

Importing the package imports nothing heavy; `bit_jax.models` needs only jax/flax (no TensorFlow).
"""
