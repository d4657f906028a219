"""Faust settings that faust-streaming 0.15 does not expose, applied in one place."""

from __future__ import annotations

from faust.transport.drivers import aiokafka as _faust_aiokafka

_original = _faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer
_fetch_max_wait_ms: int | None = None


def _create_worker_consumer(self, transport):
    consumer = _original(self, transport)
    if _fetch_max_wait_ms is not None:
        consumer._fetch_max_wait_ms = _fetch_max_wait_ms
    return consumer


def shorten_fetch_long_poll(fetch_max_wait_ms: int) -> None:
    """Cap the consumer's fetch long-poll (Faust hard-codes 1.5 s).

    A broker that does not answer a long poll early when data arrives (Tansu)
    would otherwise delay every freeze by up to that; a short long-poll costs a
    few idle fetches a second.
    """
    global _fetch_max_wait_ms
    _fetch_max_wait_ms = fetch_max_wait_ms
    _faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer = _create_worker_consumer
