"""The edges of the chain: the transactional outbox (DB row and publish, atomically),
the idempotent database sink, and the database access they share."""
