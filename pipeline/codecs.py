"""Wire encodings of the output topics. orjson is the JSON codec on the hot path."""

from __future__ import annotations

import base64
from typing import Any

import orjson


def dumps(doc: Any) -> bytes:
    return orjson.dumps(doc)


def loads(raw: bytes | str) -> Any:
    return orjson.loads(raw)


def dlq_value(reason: str, topic: str, partition: int, offset: int, raw: bytes | None) -> bytes:
    """The ``orders.dlq`` record: where the bad record was, why, and the record itself."""
    doc: dict[str, Any] = {
        "reason": reason,
        "topic": topic,
        "partition": partition,
        "offset": offset,
    }
    if raw is None:
        doc["raw"] = None
    else:
        try:
            doc["raw"] = raw.decode("utf-8")
        except UnicodeDecodeError:
            doc["raw_b64"] = base64.b64encode(raw).decode("ascii")
    return orjson.dumps(doc)
