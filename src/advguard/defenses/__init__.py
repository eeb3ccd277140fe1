"""Defenses: input transforms, detectors and hardening."""
