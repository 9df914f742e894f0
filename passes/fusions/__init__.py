"""The fusion library of the ``fuse`` pass, written with ``onnxopt.pattern`` like any user's rules.

Each module holds one family of rules and the pattern builders they are written with, public so that
other passes can match the same forms (``layer_norm_pattern``, ``gelu_erf_pattern``, ...):

* ``affine``: per-channel constants and BatchNormalization folded into Conv/ConvTranspose/Gemm/MatMul weights;
* ``normalization``: LayerNormalization and RMSNormalization from their decomposed forms;
* ``activations``: Gelu (erf and tanh forms), HardSigmoid, HardSwish and Mish from element-wise chains;
* ``reshapes``: chains of Reshape/Flatten/Squeeze/Unsqueeze as one Reshape, and shape no-ops removed;
* ``transposes``: Transpose folded into Gemm/MatMul and moved through element-wise operators to cancel;
* ``horizontal``: projections of one input packed into one MatMul (+ Add) and a Split;
* ``rotary``: RotaryEmbedding (opset 23) from the rotate-half form of rotary position embeddings.
"""
