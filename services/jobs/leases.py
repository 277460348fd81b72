"""Leases: who may run a stage of a job, and until when.

Each unrecorded stage a job waits for has one lease in the job row (`jobs.leases`, JSON keyed
by seq), changed only under the job's row lock:

- granted: the stage's message is on a queue with the lease's `token`; nobody holds it;
- held: a delivery of that message (or of the reconciler's re-send of it) started the stage
  (`holder`), and keeps `until` ahead of the database clock by beating;
- released: the holder failed and gave it back (`holder` None again, the token kept), so the
  retry of the same message starts at once;
- expired: held, but the holder stopped beating: it is presumed dead. The reconciler grants
  a new token, which fences the old holder off (it can no longer record or beat).

`attempts` counts starts; a stage started `max_stage_attempts` times without being recorded
fails its job instead of looping. All times are the database's clock (epoch seconds), so
hosts with skewed clocks agree on when a lease ends.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any


def new_token() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Lease:
    token: str  # names the one message (and its re-sends) that may start the stage
    attempts: int = 0  # starts so far
    holder: str | None = None  # the delivery running the stage; None: waiting for one
    until: float = 0.0  # a holder's lease ends then (database clock) unless it beats
    granted_at: float = 0.0  # when the token's message was last sent (database clock)
    resent: int = 0  # re-sends of the token's message by the reconciler

    def held(self, now: float) -> bool:
        return self.holder is not None and self.until > now

    def expired(self, now: float) -> bool:
        return self.holder is not None and self.until <= now

    def started(self, holder: str, now: float, deadline_s: float) -> Lease:
        return replace(self, holder=holder, until=now + deadline_s, attempts=self.attempts + 1)

    def extended(self, now: float, deadline_s: float) -> Lease:
        return replace(self, until=now + deadline_s)

    def released(self) -> Lease:
        return replace(self, holder=None, until=0.0)

    def regranted(self, now: float) -> Lease:
        """A new token for a stage whose holder is presumed dead (its attempts are kept)."""
        return replace(self, token=new_token(), holder=None, until=0.0, granted_at=now, resent=0)

    def resent_at(self, now: float) -> Lease:
        return replace(self, granted_at=now, resent=self.resent + 1)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Lease:
        return cls(
            token=str(data.get("token") or ""),
            attempts=int(data.get("attempts", 0)),
            holder=data.get("holder"),
            until=float(data.get("until", 0.0)),
            granted_at=float(data.get("granted_at", 0.0)),
            resent=int(data.get("resent", 0)),
        )


def granted(now: float) -> Lease:
    return Lease(token=new_token(), granted_at=now)


Leases = dict[int, Lease]


def leases_from_json(data: Mapping[str, Any] | None) -> Leases:
    return {int(seq): Lease.from_json(lease) for seq, lease in (data or {}).items()}


def leases_to_json(leases: Leases) -> dict[str, Any]:
    return {str(seq): lease.to_json() for seq, lease in sorted(leases.items())}
