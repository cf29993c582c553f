"""Routing of functional calls made inside a converted model's modules.

:mod:`.scope` (which module runs; the mode), :mod:`.calls` (binding each
routed function's arguments to an op), :mod:`.passthrough` (recipes through
scaling, masking and casting steps).
"""

from .scope import Scope, inside_converted_model

__all__ = ["Scope", "inside_converted_model"]
