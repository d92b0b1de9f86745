"""The engine's partitioner places every key where aiokafka and the Java client do."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given
from hypothesis import strategies as st

from pipeline.eos.partitioner import murmur2, partition_for

# Values of Kafka's Java client (``Utils.murmur2``, signed), from its own unit test.
JAVA = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


def test_murmur2_gives_the_java_clients_values() -> None:
    for key, signed in JAVA.items():
        assert murmur2(key) == signed & 0xFFFFFFFF, key


@given(st.binary(max_size=600))
def test_murmur2_equals_aiokafkas_for_any_key(key: bytes) -> None:
    # Lengths past the cached unpackers (256 bytes) take the other path.
    assert murmur2(key) == aiokafka_murmur2(key)


def test_every_tail_length_and_the_edges_of_the_word_cache() -> None:
    for n in [*range(0, 12), 255, 256, 257, 259, 260, 1 << 16]:
        key = bytes((i * 37 + 11) % 256 for i in range(n))
        assert murmur2(key) == aiokafka_murmur2(key), n
        high = b"\xff" * n  # every byte at its largest: products at their widest
        assert murmur2(high) == aiokafka_murmur2(high), n


@given(st.binary(min_size=1, max_size=64), st.integers(min_value=1, max_value=256))
def test_partition_for_equals_aiokafkas_default_partitioner(key: bytes, count: int) -> None:
    partitions = list(range(count))
    assert partition_for(key, partitions) == DefaultPartitioner()(key, partitions, partitions)
