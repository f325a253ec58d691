"""Kopf operator that reconciles RLJobs into trainer, rollout and sandbox pods.

One concern per module:

- builders (pure, `desired_*(job, config) -> manifest`): `trainer`, `rollout`, `sandbox`,
  `network`, `rbac`, `configmap`, `podgroup`, composed by `children`; shared pieces in
  `podspec` and `labels`;
- decisions (pure): `lifecycle.plan` (one reconcile pass), `failure` (what failed, backoff),
  `validation` (semantic rules, immutable fields), `status` (conditions, minimal patch),
  `observed` (what the caches keep of each object);
- I/O: `kube` (the apply layer), `events`, `reconcile` (read, plan, act, write status once),
  `workqueue`, `metrics`, `runtime`, `progress` (the trainer's status reports);
- wiring: `handlers` (Kopf decorators only) and `runner` (`trieflow operator`).
"""
