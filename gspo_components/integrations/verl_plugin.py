"""Registers every stock recipe (``gspo_components.RECIPES``) that verl can feed with verl on import,
as ``gspo_components/<name>`` (the others are listed in ``integrations.verl.UNSUPPORTED``).

verl imports the modules of the ``verl.plugins`` entry-point group at ``import verl``, in every
process, Ray workers included; this package declares this module there. Where plugins are turned
off (``VERL_USE_EXTERNAL_PLUGINS=none``), name it in ``VERL_USE_EXTERNAL_MODULES`` instead, or
call :func:`gspo_components.integrations.verl.register_verl_losses` in the worker.
"""

from __future__ import annotations

from .verl import register_verl_losses

REGISTERED = tuple(register_verl_losses())
