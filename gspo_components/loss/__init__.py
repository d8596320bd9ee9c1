"""The loss side: from log-probs, rewards and masks to the scalar to back-propagate.

Every module here imports only the standard library, torch and tensordict (a test enforces
it), so the loss side can be embedded in any trainer without pulling in samplers or models.
"""
