"""Kopf operator that reconciles RLJobs into trainer, rollout and sandbox pods."""
