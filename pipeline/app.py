"""The worker's entry point: ``faust -A pipeline.app worker -l info``."""

from pipeline.worker import build

topology = build()
app = topology.app

__all__ = ["app", "topology"]
