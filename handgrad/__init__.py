"""handgrad: backpropagation written by hand as jax.custom_vjp rules, proven against autodiff.

    import handgrad as hg
    z = hg.dense(x, w, b)                      # a custom_vjp with dW = gᵀ·x, db = Σ g, dx = g·W
    loss = hg.softmax_cross_entropy(z, labels)  # backward (softmax(z) − y)/m
    hg.check_vjp(hg.dense, hg.reference.dense, x, w, b)   # vs autodiff and finite differences
"""

from handgrad import reference as reference
from handgrad.check import CheckResult as CheckResult
from handgrad.check import check_vjp as check_vjp
from handgrad.check import compare as compare
from handgrad.ops import BatchNormStats as BatchNormStats
from handgrad.ops import attention as attention
from handgrad.ops import avg_pool2d as avg_pool2d
from handgrad.ops import batch_norm as batch_norm
from handgrad.ops import binary_cross_entropy as binary_cross_entropy
from handgrad.ops import conv2d as conv2d
from handgrad.ops import dense as dense
from handgrad.ops import dropout as dropout
from handgrad.ops import embedding as embedding
from handgrad.ops import flash_attention as flash_attention
from handgrad.ops import flatten as flatten
from handgrad.ops import gelu as gelu
from handgrad.ops import group_norm as group_norm
from handgrad.ops import gru as gru
from handgrad.ops import gru_step as gru_step
from handgrad.ops import layer_norm as layer_norm
from handgrad.ops import leaky_relu as leaky_relu
from handgrad.ops import log_softmax as log_softmax
from handgrad.ops import lstm as lstm
from handgrad.ops import lstm_step as lstm_step
from handgrad.ops import max_pool2d as max_pool2d
from handgrad.ops import relu as relu
from handgrad.ops import rms_norm as rms_norm
from handgrad.ops import rnn as rnn
from handgrad.ops import rnn_step as rnn_step
from handgrad.ops import sigmoid as sigmoid
from handgrad.ops import sigmoid_binary_cross_entropy as sigmoid_binary_cross_entropy
from handgrad.ops import silu as silu
from handgrad.ops import softmax as softmax
from handgrad.ops import softmax_cross_entropy as softmax_cross_entropy
from handgrad.ops import squared_error as squared_error
from handgrad.ops import tanh as tanh
from handgrad.ops.fast import fast_paths as fast_paths
from handgrad.ops.fast import fast_paths_enabled as fast_paths_enabled
from handgrad.second_order import hessian as hessian
from handgrad.second_order import hvp as hvp

__version__ = "0.1.0"
