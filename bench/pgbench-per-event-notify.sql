-- The per-event transaction as the service wrote it until 2026-12-03, for comparison with older
-- readings: the outbox row with a copy of the payload, and the relay wake-up (NOTIFY) inside the
-- transaction, which PostgreSQL serialises with every other notifying commit until its WAL flush.
\set n random(1, 1000000000)
BEGIN;
WITH ev AS (
  INSERT INTO webhook_events (event_id, event_type, contact_id, payload, status, created_at, updated_at)
  VALUES ('pgb_' || :client_id || '_' || :n || '_' || md5(clock_timestamp()::text), 'contact.updated',
          'contact-' || (:n % 1000), :payload::jsonb, 'pending', now(), now())
  ON CONFLICT (event_id) DO NOTHING
  RETURNING event_id, contact_id, payload)
INSERT INTO outbox (event_id, topic, message_key, payload, headers, created_at, next_attempt_at)
  SELECT event_id, 'bench.contact.updated', contact_id, payload,
         jsonb_build_object('event-id', event_id, 'event-type', 'contact.updated'), now(), now()
  FROM ev;
NOTIFY acme_webhooks_outbox;
END;
