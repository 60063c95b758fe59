"""The two neural graphs the engine scores: neurons of a chain (:mod:`.neuron`) and channels of
any traced model (:mod:`.channel`, traced by the private ``_trace`` module). A graph turns a
model and its activities into edge problems for :mod:`curvprune.transport`."""

from .channel import ChannelGraph
from .neuron import NeuronGraph

__all__ = ["ChannelGraph", "NeuronGraph"]
