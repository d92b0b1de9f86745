"""Wires the web views onto the declared order pipeline (:func:`build`).

The worker's entry point, :mod:`pipeline.app`, calls it with the settings of the
environment; tests and tools call it with their own.
"""

from __future__ import annotations

from pipeline.settings import Settings
from pipeline.topology import Topology, declare, install_views


def build(settings: Settings | None = None) -> Topology:
    topo = declare(settings or Settings())
    install_views(topo)
    return topo
