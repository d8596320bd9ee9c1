"""Adapters that run gspo_components recipes inside other trainers, one submodule per trainer.

Each submodule imports its trainer when it is imported; this package imports none of them, so
``import gspo_components.integrations`` works without any trainer installed.
"""
