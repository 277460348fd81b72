"""Webhooks (the Standard Webhooks convention): events about an owner's jobs and batches,
signed and delivered to the owner's endpoints, at least once, from a queue of their own.

    events.py     event types, payloads, and `emit_batch` (jobs emit in job_rows)
    urls.py       what an endpoint URL may be (scheme, host, port, no credentials, length)
    addresses.py  which addresses a receiver may have (public only, unless allowed)
    signing.py    secrets and the webhook-id / webhook-timestamp / webhook-signature headers
    transport.py  one HTTP attempt: pinned to the checked address, a hard deadline, no
                  redirects, a bounded read of the answer
    delivery.py   one attempt of one delivery, its outcome, the next attempt's time
    dispatch.py   due deliveries to the `webhooks` queue (run by the reconciler loop)
    endpoints.py  creating an endpoint: checks, secret, limits

The rows: services/storage/webhook_rows.py. The Celery task: workers/webhooks.py. The API:
services/api/webhooks.py. What a receiver sees and does: docs/webhooks.md.
"""
