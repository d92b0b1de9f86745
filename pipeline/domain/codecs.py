"""Wire encodings of the output topics. orjson is the JSON codec on the hot path."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import orjson

#: A dead letter is at most this long, whatever the input (``../shared/CONTRACT.md``).
DLQ_MAX_BYTES = 64 * 1024
#: ... and its reason at most this long.
REASON_MAX_BYTES = 1024
#: A dead letter's key: the bad record's own key when at most this long, else its hash.
DLQ_KEY_MAX_BYTES = 512


def dumps(doc: Any) -> bytes:
    return orjson.dumps(doc)


def loads(raw: bytes | str) -> Any:
    return orjson.loads(raw)


def bounded_reason(reason: str) -> str:
    """``reason`` cut to at most :data:`REASON_MAX_BYTES` of UTF-8."""
    data = reason.encode("utf-8", errors="replace")
    if len(data) <= REASON_MAX_BYTES:
        return reason
    return data[: REASON_MAX_BYTES - 3].decode("utf-8", errors="ignore") + "..."


def dlq_key(key: bytes | None) -> bytes | None:
    """The key of a dead letter: the bad record's key, or its SHA-256 (hex) when long."""
    if key is None or len(key) <= DLQ_KEY_MAX_BYTES:
        return key
    return hashlib.sha256(key).hexdigest().encode("ascii")


def dlq_value(reason: str, topic: str, partition: int, offset: int, raw: bytes | None) -> bytes:
    """The ``orders.dlq`` record: where the bad record was, why, and the record itself.

    At most :data:`DLQ_MAX_BYTES`: a value too long for that is cut, ``raw`` (text when
    the value is UTF-8) or ``raw_b64`` then hold its beginning, and ``raw_size`` and
    ``raw_sha256`` describe the whole.
    """
    doc: dict[str, Any] = {
        "reason": bounded_reason(reason),
        "topic": topic,
        "partition": partition,
        "offset": offset,
    }
    if raw is None:
        doc["raw"] = None
        return orjson.dumps(doc)
    try:
        text: str | None = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None:
        doc["raw"] = text
    else:
        doc["raw_b64"] = base64.b64encode(raw).decode("ascii")
    out = orjson.dumps(doc)
    if len(out) <= DLQ_MAX_BYTES:
        return out
    # Too long: keep as much of the beginning as fits. JSON escaping can make text up
    # to six times longer (a control character is \u00XX), so the cut is measured on
    # the encoded record and shrunk until it fits (twice at most in practice).
    doc["raw_size"] = len(raw)
    doc["raw_sha256"] = hashlib.sha256(raw).hexdigest()
    field = "raw" if text is not None else "raw_b64"
    doc[field] = ""
    room = DLQ_MAX_BYTES - len(orjson.dumps(doc))
    cut = room if text is not None else room // 4 * 3
    while True:
        head = raw[:cut]
        if text is not None:
            # Never split a character: drop a partial one at the end.
            doc[field] = head.decode("utf-8", errors="ignore")
        else:
            doc[field] = base64.b64encode(head).decode("ascii")
        out = orjson.dumps(doc)
        if len(out) <= DLQ_MAX_BYTES:
            return out
        cut = cut * (DLQ_MAX_BYTES - len(orjson.dumps({**doc, field: ""}))) // len(out) - 8
        cut = max(cut, 0)
