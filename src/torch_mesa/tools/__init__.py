"""The tools around the library: what the ``torch-mesa`` command runs.

``cli`` (the command line), ``demo`` (the built-in ViT-on-digits run),
``bench`` (side-by-side benchmarks, Mesa's results table), ``report``
(where activation memory goes), ``zoo`` (models by name) and ``models``
(the reference ViT). They use torch-mesa as any user would, through
``torch_mesa``'s public API; the library (``config``, ``quant``, ``ops``,
``nn``, ``routing``, ``integrations``, ``convert``, ``measure``,
``verify``, ``checkpoint``, ``trainers``) never imports them.
"""
