"""The adapter: the only place the project reaches into Faust, mode or aiokafka
internals, or changes what a Faust method means.

faust-streaming and aiokafka are pinned (``pyproject.toml``) because of what is listed
here: a version bump is checked against this list, module by module. Each item is
explained where it is done. Outside this package the project uses public API only.

``app.py``
    1. ``App._new_transport`` overridden, to set the transport's ``TransactionManager``
       and ``Consumer`` classes on the instance (exactly-once only).
    1a. ``Recovery._generation_id`` and ``signal_recovery_start`` read when a recovery
        ends, to tell a superseded one apart (``EngineApp.ended_recovery``).
``transactions.py`` (subclass of ``faust.transport.consumer.TransactionManager``)
    2. ``send`` routes by the event's *source* partition, not the destination.
    3. ``commit`` ignores its arguments: it commits what the coordinator recorded.
    4. ``on_rebalance`` and ``on_partitions_revoked`` run our producers and commits.
``consumer.py`` (subclasses of Faust's aiokafka ``Consumer`` and ``AIOKafkaConsumerThread``)
    5. ``Consumer._getmany`` overridden: the source topics' records are taken out of
       each fetch, as batches, before Faust makes messages of them.
    6. ``highwaters`` returns where recovery is to stop, not the high waters, and reads
       ``app.tables._changelogs``.
    7. ``position`` always returns -1.
    8. ``seek_wait`` maps an unknown offset (None) to 0.
    8a. ``resume_partitions`` never resumes our tables' standby changelog partitions
        (``pipeline.eos.standby`` follows them), and ``highwaters`` tells Faust's
        recovery they are complete, reading ``recovery.standby_offsets``.
    9. ``perform_seek`` hands the seek and resume functions and the thread's seek counts
       (``Consumer._thread``) to the coordinator.
    10. ``_new_consumer_thread`` overridden, to build the thread below.
    11. ``AIOKafkaConsumerThread._fetch_records``, ``seek`` and ``_seek_wait``
        overridden (positions before and after each fetch, seeks counted), reading
        aiokafka's ``consumer._fetcher._subscriptions``.
``producer.py`` (a wrapper of aiokafka's ``AIOKafkaProducer``)
    12. Faust's producer ``_settings_default``, ``_settings_auth`` and
        ``_settings_extra``, to build producers as Faust would.
    13. aiokafka's ``_txn_manager.maybe_add_partition_to_txn``.
    14. aiokafka's ``_message_accumulator.flush_for_commit``.
    15. aiokafka's ``_sender.sender_task``.
    16. aiokafka's ``_message_accumulator._batches``, ``MessageBatch.append`` (with its
        ``_create_future`` argument) and ``_partitioner``: a record goes straight into
        its partition's open batch, without ``send``'s per-call checks. ``put`` (and
        ``put_now``, the same without a coroutine) hands ``_create_future`` a
        placeholder that reads as done, so that the batch makes no future for the
        record, and returns the batch's ``future`` instead. ``_partitioner`` is only
        asked when it is not aiokafka's default, whose murmur2 ``pipeline.eos.partitioner``
        computes a word at a time.
``store.py`` (subclasses of Faust's RocksDB ``Store`` and of ``faust.Table``)
    17. ``Store._set``, ``_del``, ``_get`` and ``_contains`` overridden (the overlay).
    18. ``Store._db_for_partition``, ``_dbs`` and ``_key_index`` read or written.
    19. ``Store.apply_changelog_batch`` now applies standby copies only (kept as a
        guard: Faust no longer reads our changelogs at all, see 8a).
    20. ``Table.on_key_set`` and ``on_key_del`` no longer send to the changelog, and call
        ``_sensor_on_set`` and ``_sensor_on_del``.
    21. ``Table._new_store_by_url`` overridden, to build the store above.
``monitor.py`` (a subclass of Faust's ``PrometheusMonitor``)
    22. Its per-event hooks overridden, reading ``_metrics`` and ``_stream_label``.

Gone with the batch delivery: the wrapped ``Consumer.callback``, the ``wait_first``
fast path, the conductor's ``_tp_to_callback_lock`` and ``_tp_index``, and the replaced
``_read_offset``. Counted the way ``../shared/reviews/engine-structure.md`` counts (lines
that use another project's leading-underscore member) the total is about the same as
before, 37 lines: the fetch interception and the store's writes without an event add
some. Item 22 only serves Faust's own per-record path now (changelog records), and can
go.
"""
