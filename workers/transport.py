"""The Redis transport of the Celery app: kombu's, with acks that cannot reach Redis still
freeing their prefetch slot.

Kombu's Redis QoS acks a message by first removing it from Redis's unacked index and only
then releasing its slot; when Redis is unreachable (a network cut), the first step raises,
Celery logs "Couldn't ack", and the slot stays taken for the life of the process. After
`concurrency` such acks a worker never asks Redis for another message, although it runs,
reconnects and answers pings: a silent stall (tests/test_netns_faults.py, workers cut off
from Redis). Here the slot is released whether or not Redis heard the ack. The message stays
in the unacked index and comes back after the visibility timeout; its stage's lease makes
that redelivery a no-op (services/jobs/start.py).
"""

from __future__ import annotations

from kombu.transport import redis, virtual


class QoS(redis.QoS):
    def ack(self, delivery_tag) -> None:
        try:
            self._remove_from_indices(delivery_tag).execute()
        finally:
            virtual.QoS.ack(self, delivery_tag)  # the slot, even when Redis did not answer

    def reject(self, delivery_tag, requeue=False) -> None:
        try:
            super().reject(delivery_tag, requeue=requeue)
        except Exception:
            virtual.QoS.ack(self, delivery_tag)
            raise


class Channel(redis.Channel):
    QoS = QoS


class Transport(redis.Transport):
    Channel = Channel
