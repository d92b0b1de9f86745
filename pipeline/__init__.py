"""Exactly-once order pipeline on Kafka with Faust."""
