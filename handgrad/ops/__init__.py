"""The ops: each a ``jax.custom_vjp`` whose backward is the textbook formula, written out.

One module per family: `_dense`, `_activations`, `_losses`, `_conv`,
`_pooling`, `_norm`, `_dropout`, `_embedding`, `_recurrent`, `_attention` (its block loops in
`_flash`).
"""

from handgrad.ops._activations import gelu as gelu
from handgrad.ops._activations import leaky_relu as leaky_relu
from handgrad.ops._activations import log_softmax as log_softmax
from handgrad.ops._activations import relu as relu
from handgrad.ops._activations import sigmoid as sigmoid
from handgrad.ops._activations import silu as silu
from handgrad.ops._activations import softmax as softmax
from handgrad.ops._activations import tanh as tanh
from handgrad.ops._attention import attention as attention
from handgrad.ops._attention import flash_attention as flash_attention
from handgrad.ops._conv import conv2d as conv2d
from handgrad.ops._dense import dense as dense
from handgrad.ops._dense import flatten as flatten
from handgrad.ops._dropout import dropout as dropout
from handgrad.ops._embedding import embedding as embedding
from handgrad.ops._losses import binary_cross_entropy as binary_cross_entropy
from handgrad.ops._losses import sigmoid_binary_cross_entropy as sigmoid_binary_cross_entropy
from handgrad.ops._losses import softmax_cross_entropy as softmax_cross_entropy
from handgrad.ops._losses import squared_error as squared_error
from handgrad.ops._norm import BatchNormStats as BatchNormStats
from handgrad.ops._norm import batch_norm as batch_norm
from handgrad.ops._norm import group_norm as group_norm
from handgrad.ops._norm import layer_norm as layer_norm
from handgrad.ops._norm import rms_norm as rms_norm
from handgrad.ops._pooling import avg_pool2d as avg_pool2d
from handgrad.ops._pooling import max_pool2d as max_pool2d
from handgrad.ops._recurrent import gru as gru
from handgrad.ops._recurrent import gru_step as gru_step
from handgrad.ops._recurrent import lstm as lstm
from handgrad.ops._recurrent import lstm_step as lstm_step
from handgrad.ops._recurrent import rnn as rnn
from handgrad.ops._recurrent import rnn_step as rnn_step

OP_NAMES = (
    "dense",
    "flatten",
    "sigmoid",
    "tanh",
    "relu",
    "leaky_relu",
    "softmax",
    "log_softmax",
    "softmax_cross_entropy",
    "binary_cross_entropy",
    "sigmoid_binary_cross_entropy",
    "squared_error",
    "conv2d",
    "max_pool2d",
    "avg_pool2d",
    "batch_norm",
    "layer_norm",
    "dropout",
    "attention",
    "flash_attention",
    "gelu",
    "silu",
    "rms_norm",
    "group_norm",
    "embedding",
    "rnn",
    "rnn_step",
    "lstm",
    "lstm_step",
    "gru",
    "gru_step",
)
