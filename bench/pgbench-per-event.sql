-- One webhook stored the way the service stores it, one transaction per event (no batching):
-- the event row and its outbox row, the relay wake-up, then COMMIT with synchronous_commit on.
-- (The two inserts share one statement here, one round trip fewer than the service needs.)
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
