"""Trajectory-recording OpenAI-compatible proxy and Rollout Manager."""
