"""Detections over the audit event stream: findings become 110113 alerts and review-queue items.

Rules and thresholds are data (``policies/detections.yaml``, restricted patients in
``policies/vip-patients.yaml``):

* ``after_hours``: an access to images outside the site's business hours (one finding per user and
  local day);
* ``volume_spike``: a user's accesses today far above their own daily mean over the previous
  ``baseline_days`` (``count >= min_events`` and ``count > factor * mean``);
* ``same_family_name``: a user accessing a patient whose DICOM family name is the user's family name
  (from the directory: Keycloak, :mod:`compliance.auth.directory`);
* ``vip_access``: any access to a restricted patient by a user not listed as exempt;
* ``disabled_account``: any activity recorded for an account the directory says is disabled (a
  token issued before the account was disabled is still valid until it expires);
* ``failed_auth_burst``: ``threshold`` refused authentications from one source address within
  ``window_seconds``: tokens the gateway refused (110113 / 110143) and logins Keycloak refused
  (110114 Login with a failure outcome, imported by ``compliance audit import-logins``).

How it runs: :class:`.job.DetectionJob` is a batch job, ``compliance audit detect``, meant for cron or a
systemd timer. It is not a task inside the gateway because the gateway runs one process per core:
a batch job runs once, however many workers there are. Every finding has a dedup key (rule + user
+ day, ...), unique in ``audit_review_item``, so overlapping or repeated runs never queue a finding
twice. Time comes from an injected clock; nothing sleeps.

The window, and why no event is skipped (:func:`.window.detection_window`): a run examines the events whose
time is in ``[start, end)``; ``start`` is the previous run's end (the watermark, table
``audit_detection_run``), ``end`` is now minus ``settle_seconds``, **held back to the time of the
oldest event still waiting in the outbox** (not yet shipped to every sink). Events reach
Elasticsearch asynchronously and possibly hours late (the repository was down), but an event is in
the outbox from the moment it is recorded until it is shipped, so:

1. an event recorded before the run looked at the outbox, and older than ``end``, is shipped: had it
   been pending, ``end`` would be at or before its time;
2. an event not yet recorded then is younger than ``now - settle_seconds``, hence than ``end``: events
   are built immediately before they are committed and the request waits for the commit, so
   ``settle_seconds`` (60 s) only has to exceed a commit's latency, not a shipping delay;
3. the run refreshes the indices after it looked at the outbox and before it reads, so everything
   Elasticsearch acknowledged (what the outbox counts as shipped) is searchable.

The next run starts exactly where this one ended, so every event is in exactly one window. While
the outbox has a backlog the watermark waits (the run says so: ``held_back`` in its JSON result, a
warning on the log) and catches up once the backlog is shipped. Nothing is re-examined, so late
events raise their findings in the run that first sees them, once.

Nothing is truncated either: the per-event rules page through every event of the window
(``search_after``) and keep per group only a count, the first event and at most
:data:`.rules.MAX_EVIDENCE` evidence ids, so memory does not grow with the window; the per-user rules page
through every user (composite aggregations). The run reports how many events each rule read.

Reading the trail for the detections is itself an access to the audit log: each run that reads
records one 110101 Audit Log Used event (the reader: the operator for the CLI, and whichever
service identity a scheduler would pass), durably, before any finding is raised; a run that fails
while reading records it with a failure outcome.

Findings are recorded like any event: through :class:`~compliance.audit.recorder.AuditRecorder`
into the outbox (hash-chained, shipped at least once). Their subject is the resource
``urn:compliance:detection:<rule>``; the patient-facing reports leave those alerts out.

The modules: :mod:`.policy` (the rules' settings, read from the policy files), :mod:`.rules` (the
engine that applies them), :mod:`.window` (which events a run examines), :mod:`.job` (one run: the
audited read, the alerts, the watermark).
"""
