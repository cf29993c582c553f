"""Hugging Face transformers: the family's own layer classes.

Attention needs no entry: the attention functions models dispatch through
(eager and SDPA) call ``torch.matmul``/``softmax``/``dropout``/
``F.scaled_dot_product_attention``, which are routed. Gated MLPs need none
either: ``act(gate) * up`` of two activations is routed to ``ops.mul``.
Standard ``nn.Linear``/``nn.LayerNorm``/``nn.Dropout`` convert as such.
"""

from . import Rule

RULES = (
    # GPT-2 style linear layer: weight stored (in, out), forward is addmm.
    Rule("transformers.pytorch_utils", "Conv1D", "linear_t", "transformers"),
    Rule("transformers.modeling_utils", "Conv1D", "linear_t", "transformers"),
    # nn.Linear subclasses whose own forward is the same product written out
    Rule("transformers.models.falcon", "FalconLinear", "linear", "transformers"),
    # ACT2FN activation modules (GELUActivation, NewGELUActivation,
    # FastGELUActivation, QuickGELUActivation, SiLUActivation, GELUTanh, ...).
    Rule("transformers.activations", "*", "unary", "transformers"),
    # Per-model RMSNorm classes (Llama, Mistral, Qwen2, Gemma, ...) and T5's.
    Rule("transformers.models.", "*RMSNorm", "norm", "transformers"),
    Rule("transformers.models.", "*T5LayerNorm", "norm", "transformers"),  # T5, MT5, UMT5, LongT5
)

# Activation classes that are not elementwise functions of their input alone.
EXCLUDE = (
    ("transformers.activations", "LinearActivation"),  # identity: nothing to keep
    ("transformers.activations", "ClassInstantier"),
)
