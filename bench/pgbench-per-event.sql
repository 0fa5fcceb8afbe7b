-- One webhook stored the way the service stores it, one transaction per event (no batching):
-- the event row and its outbox row (no copy of the payload), then COMMIT with synchronous_commit
-- on. No NOTIFY inside it, as in the service: PostgreSQL serialises notifying commits, WAL flush
-- included (bench/pgbench-per-event-notify.sql measures that form, the ceiling until 2026-12-03).
\set n random(1, 1000000000)
BEGIN;
WITH ev AS (
  INSERT INTO webhook_events (event_id, event_type, contact_id, payload, status, created_at, updated_at)
  VALUES ('pgb_' || :client_id || '_' || :n || '_' || md5(clock_timestamp()::text), 'contact.updated',
          'contact-' || (:n % 1000), :payload::jsonb, 'pending', now(), now())
  ON CONFLICT (event_id) DO NOTHING
  RETURNING event_id, contact_id)
INSERT INTO outbox (event_id, topic, message_key, headers, created_at, next_attempt_at)
  SELECT event_id, 'bench.contact.updated', contact_id,
         jsonb_build_object('event-id', event_id, 'event-type', 'contact.updated'), now(), now()
  FROM ev;
END;
