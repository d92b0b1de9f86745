"""The domain: the event schema, the dead-letter record, and the pure operators (route,
dedup, the order state machine and balances) as plain functions, without Kafka or asyncio.

Nothing here imports more than the standard library, orjson and each other, so that
importing one module never loads another stage's decision code."""
