"""Deprecated path of the channel graph, kept so old imports work (with a
``DeprecationWarning``): it is :mod:`curvprune.graphs.channel` now (the tracer behind
:func:`~curvprune.graphs.channel.trace_channels` is private, in ``graphs/_trace.py``)."""

from ._moved import moved

__getattr__, __dir__ = moved(__name__, {
    **dict.fromkeys(["ChannelDistances", "ChannelGraph", "NodeSet", "needed_distance_bytes",
                     "needed_distances", "trace_channels", "channel_distances"],
                    "curvprune.graphs.channel"),
    "UntraceableModel": "curvprune.errors",
})
