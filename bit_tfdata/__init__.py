"""The tf.data + tensorflow-datasets input pipeline that bit_jax and bit_tf2 share
(`bit_tfdata.pipeline`), so the two frameworks see identical batches. It belongs to neither:
importing it imports TensorFlow's data API, no model code of either framework."""
