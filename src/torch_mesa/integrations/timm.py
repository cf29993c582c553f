"""timm: the family's own layer classes.

timm's ``Attention`` (fused SDPA or eager ``q @ k.transpose``), Swin's window
attention (relative position bias as an attention mask), ``Mlp`` and
``GluMlp``/``SwiGLU`` (products routed to ``ops.mul``) are built from
``torch.nn`` layers and functional calls that convert or are routed; the
entries here are timm's own norm and activation modules.
"""

from . import Rule

RULES = (
    Rule("timm.layers", "LayerNorm", "norm", "timm"),
    Rule("timm.layers", "RmsNorm", "norm", "timm"),
    Rule("timm.layers", "SimpleNorm", "norm", "timm"),
    Rule("timm.layers", "GELU", "unary", "timm"),
    Rule("timm.layers", "GELUTanh", "unary", "timm"),
    Rule("timm.layers", "QuickGELU", "unary", "timm"),
    Rule("timm.layers", "Swish", "unary", "timm"),
    Rule("timm.layers", "SiLU", "unary", "timm"),
)
