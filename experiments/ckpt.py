"""The training runs' checkpoints: :class:`Checkpointer` lives in the library
(``markov_attn/nn/_checkpoint.py``), which reads runs back with :func:`markov_attn.nn.load_run`;
this module keeps the training scripts' import path."""

from markov_attn.nn import CheckpointError
from markov_attn.nn._checkpoint import Checkpointer

__all__ = ["CheckpointError", "Checkpointer"]
