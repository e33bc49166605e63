"""Tests of the pure rollout core (cloud.rollouts)."""
