"""The app side of the adapter: a ``faust.App`` whose transport builds our consumer and
transaction manager when the policy says exactly-once."""

from __future__ import annotations

from typing import Any

import faust
from faust.types import TransportT

from pipeline.eos import collector
from pipeline.eos.coordinator import Coordinator
from pipeline.eos.faust.consumer import SettlingConsumer
from pipeline.eos.faust.transactions import ExactlyOnceTransactionManager


class EngineApp(faust.App):
    """``faust.App`` with the exactly-once engine; ``eos`` is set before the worker
    starts (:func:`pipeline.factory.create_app`)."""

    eos: Coordinator

    async def on_first_start(self) -> None:
        await super().on_first_start()
        # Everything the worker needs for its life is built by now (the modules, the
        # app, its agents and tables): see pipeline.eos.collector.
        collector.settle()

    def ended_recovery(self) -> tuple[int, bool]:
        """For the recovery that just ended: the group generation it was started for,
        and whether Faust was told to start the next one already (see
        ``Coordinator.recovered``). Reads Faust's ``Recovery._generation_id`` and
        ``signal_recovery_start``: nothing public says which assignment a recovery
        served."""
        recovery: Any = self.tables.recovery  # type: ignore[attr-defined]
        return int(recovery._generation_id), bool(recovery.signal_recovery_start.is_set())

    def _new_transport(self) -> TransportT:
        # Overrides a private factory method: the only hook where the transport's
        # classes can be chosen per app.
        transport = super()._new_transport()
        if self.eos.policy.exactly_once:
            # The transport builds the consumer's transaction manager from this class
            # attribute; an instance attribute keeps other apps in the process stock.
            transport.TransactionManager = ExactlyOnceTransactionManager  # type: ignore[misc]
            transport.Consumer = SettlingConsumer  # type: ignore[misc]
        return transport
