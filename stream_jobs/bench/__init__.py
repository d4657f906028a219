"""``make bench``: how fast Stormguard is, measured side by side in one run.

Every throughput figure comes from the same embedded broker and the same
pre-filled ``mail.events`` topic (keyed by list, else sender, as ``replay``
keys; the sender-keyed worker phase alone reads the same events from a second
broker of the same kind), read from its start by:

1. bare aiokafka, decoding each record's JSON (the ceiling for any Python consumer);
2. a Faust agent that does nothing (:mod:`stream_jobs.bench.noop`: the framework's ceiling);
3. the Stormguard worker (``stormguard run``), done when its ``/healthz`` counts every record;
   beside it, the worker on the SAME events keyed by sender (a second embedded broker, same
   partition count, filled alike but keyed by each event's sender, kafka-python's murmur2
   partitioner), where every list post reaches the list's owner through the by-list topic;
4. two Stormguard workers in one consumer group on the same topic.

Then: offline scoring (in-process :class:`~detectors.engine.StormDetector`
and the ``stormguard score`` CLI) over the same records; produce→freeze
latency while background traffic flows (on a second, fresh broker; the background
is sent by :mod:`stream_jobs.bench.load`, a process of its own, as gateways send it), broken
down by stage from the worker's ``STORMGUARD_LATENCY_TRACE`` lines; worker start-up to
``/healthz`` 200; bytes of detector state per sender and per list.

``--only latency`` runs start-up and latency alone; ``--latency-variant NAME:SETTING=VALUE,...``
(``tree=PATH``: the worker of another checkout) runs the latency phases again per variant, each on
a fresh broker, in turns over ``--latency-rounds``, and with ``--variant-throughput-events N`` times
each variant catching up N events: a before/after side by side in one run.

The machine is shared, so the figures that matter are the *ratios* of
figures measured in this one run; absolute numbers are labelled with the
machine they came from. Nothing here is a pass/fail threshold.

``python -m stream_jobs.bench [--quick] [--events N] [--out bench-results.json]``

Rooms: :mod:`~stream_jobs.bench.traffic` (the events), :mod:`~stream_jobs.bench.phases` (what is
measured), :mod:`~stream_jobs.bench.report` (ratios and the table), :mod:`~stream_jobs.bench.load`
(the background producer process), :mod:`~stream_jobs.bench.noop` (the no-op Faust app),
:mod:`~stream_jobs.bench.ab` (``make bench-ab``: consumers, and the worker of other commits, side by
side in interleaved rounds).
"""
