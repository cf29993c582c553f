"""MesaConfig.from_mesa_policy: policy files of the original Mesa on torch-mesa models."""

import textwrap
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import torch_mesa
from torch_mesa import MesaConfig
from torch_mesa.mesa_policy import MesaPolicyError, mesa_layers, read_mesa_policy
from torch_mesa.tools.models import VisionTransformer

FAST = MesaConfig(kernel="reference")  # eager quantizer: no compile time in these short runs

README = """\
on gelu: # layer tag, choices: fc, conv, gelu, bn, relu, softmax, matmul, layernorm
    by_index: all # layer index
    enable: True # enable for compressing
    level: 256 # 8-bit quantization
    ema_decay: 0.9 # the decay rate for running estimates
    by_index: 1 2 # e.g. excluding GELU layers indexed by 1 and 2.
    enable: False
"""


def _file(tmp_path, text, name="policy.txt"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def _config(path, model, **kw):
    """from_mesa_policy, failing on any warning (tests that expect one catch it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return MesaConfig.from_mesa_policy(path, model, **kw)


def _compress(model, cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # patterns of modules the model lacks: none here
        return torch_mesa.compress_(model, cfg)


def _tiny_vit(fused_attn=False, depth=3):
    torch.manual_seed(0)
    return VisionTransformer(image_size=16, patch_size=8, num_classes=5, dim=32, depth=depth, heads=2,
                             fused_attn=fused_attn)


def _says(plan_entry, expected):
    """Does the report's line for a module say ``expected`` (8/4/2 bits or None)?"""
    if expected is None:
        return "exact (kept exact by policy)" in plan_entry or "routes no call (exact by policy)" in plan_entry
    return f"converted ({expected} bits)" in plan_entry or f"routes its calls ({expected} bits)" in plan_entry


def _check_plan(report, expected):
    for name, bits in expected.items():
        assert _says(report.plan[name], bits), (name, bits, report.plan[name])


def _tagged(model):
    return {n for names in mesa_layers(model).values() for n in names}


# ------------------------------------------------------------- the README
def test_readme_example_on_a_timm_vit(tmp_path):
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              depth=4, num_classes=10)
    cfg = _config(_file(tmp_path, README), model, base=FAST)
    layers = mesa_layers(model)
    assert layers["gelu"] == [f"blocks.{i}.mlp.act" for i in range(4)]
    assert layers["softmax"] == [f"blocks.{i}.attn" for i in range(4)]
    assert layers["matmul"] == [f"blocks.{i // 2}.attn" for i in range(8)]
    assert layers["conv"] == ["patch_embed.proj"] and len(layers["fc"]) == 17

    # GELU 0 and 3 compressed with running estimates (ema_decay 0.9), 1 and 2 exact
    for i in (0, 3):
        spec = cfg.resolve(f"blocks.{i}.mlp.act")
        assert spec.bits == 8 and spec.running and spec.momentum == 0.9
    report = _compress(model, cfg)
    expected = {n: None for n in _tagged(model)}  # Mesa's layers start disabled
    expected.update({"blocks.0.mlp.act": 8, "blocks.3.mlp.act": 8})
    _check_plan(report, expected)
    # what Mesa had no tag for follows base (8 bits); inside an exact attention module, exact
    assert _says(report.plan["blocks.0.mlp.drop1"], 8)
    assert _says(report.plan["blocks.0.attn.attn_drop"], None)
    model(torch.randn(2, 3, 32, 32)).sum().backward()


def test_base_bits_none_compresses_only_what_the_file_enables(tmp_path):
    model = _tiny_vit(depth=4)
    cfg = _config(_file(tmp_path, README), model, base=MesaConfig(bits=None))
    report = _compress(model, cfg)
    assert report.converted == [("blocks.0.mlp.act", "GELU", 8), ("blocks.3.mlp.act", "GELU", 8)]


# -------------------------------------------- sections, overrides, values
POLICY = """\
# a comment line
on fc:
  by_index: all
  enable: True
  level: 16            # 4 bits
  by_index: 0, 4       # commas work too
  enable: False
  by_index: 2
  level: 4

on layernorm:
  by_index: all
  enable: true
  ema_decay: 0.8

on softmax:
  by_index: 1
  enable: True
  level: 16

on matmul:
  by_index: all
  enable: True
  ema_decay: 0.7
  by_index: 0 1        # both matmuls of attention module 0
  enable: False

on conv:
  by_index: all
  enable: True
  level: 256
"""


def test_sections_all_lists_and_later_blocks_override(tmp_path):
    model = _tiny_vit()
    cfg = _config(_file(tmp_path, POLICY), model, base=FAST)
    layers = mesa_layers(model)
    fc = layers["fc"]
    assert fc[:4] == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    # this ViT's attention holds an nn.Softmax: that is the softmax layer, its
    # own calls (q @ k^T, attn @ v) are the two matmul layers
    assert layers["softmax"] == [f"blocks.{i}.attn.softmax" for i in range(3)]
    assert layers["matmul"] == [f"blocks.{i // 2}.attn" for i in range(6)]

    expected = {n: 4 for n in fc}
    expected.update({fc[0]: None, fc[4]: None, fc[2]: 2})
    expected.update({n: 8 for n in layers["layernorm"]})
    expected.update({n: None for n in layers["softmax"]})
    expected["blocks.1.attn.softmax"] = 4
    expected.update({"blocks.0.attn": None, "blocks.1.attn": 8, "blocks.2.attn": 8})
    expected["patch_embed"] = 8
    expected.update({n: None for n in layers["gelu"]})  # no gelu section: exact
    report = _compress(model, cfg)
    _check_plan(report, expected)

    ln = cfg.resolve("blocks.0.norm1")
    assert ln.running and ln.momentum == 0.8
    attn = cfg.resolve("blocks.1.attn")
    assert attn.bits == 8 and attn.running and attn.momentum == 0.7
    # no ema_decay: base's range estimate; the enclosing module's running one does not leak in
    proj = cfg.resolve("blocks.1.attn.proj")
    assert proj.bits == 4 and not proj.running  # inside an 8-bit attention module
    assert not cfg.resolve("blocks.1.attn.softmax").running
    assert cfg.resolve("blocks.1.attn.attn_drop").running  # no Mesa tag: follows its module
    # a module the file enables inside one it keeps exact is compressed
    assert cfg.resolve("blocks.0.attn.proj").bits == 4
    assert cfg.resolve("blocks.0.attn.attn_drop") is None  # follows its exact attention module

    x = torch.randn(2, 3, 16, 16)
    model(x).sum().backward()


def test_levels_map_to_bits_and_missing_level_follows_base(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    path = _file(tmp_path, """\
        on fc:
          by_index: 0
          enable: True
          level: 256
          by_index: 1
          enable: True
          level: 16
          by_index: 2
          enable: True
          level: 4
        on gelu:
          by_index: all
          enable: True
        on relu:
          by_index: 0
          enable: True
          ema_decay: 0.95
        """)
    cfg = _config(path, model)
    assert [cfg.resolve(n).bits for n in ("0", "2", "4")] == [8, 4, 2]
    assert cfg.resolve("1").bits == 8 and not cfg.resolve("1").running
    relu = cfg.resolve("3")
    assert relu.bits == 8 and relu.running and relu.momentum == 0.95
    cfg4 = _config(path, model, base=MesaConfig(bits=4, range_estimate="running", momentum=0.5))
    assert cfg4.resolve("1").bits == 4 and cfg4.resolve("1").momentum == 0.5
    assert cfg4.resolve("3").momentum == 0.95
    assert cfg4.resolve("0").bits == 8


def test_base_policy_is_kept_before_the_file_entries(tmp_path):
    model = _tiny_vit(depth=2)
    base = MesaConfig(policy={"head": {"bits": 2}, "blocks.0.*": {"group_size": None}})
    cfg = _config(_file(tmp_path, "on fc:\n  by_index: all\n  enable: True\n"), model, base=base)
    patterns = [p for p, _ in cfg.policy]
    assert patterns[0] == "blocks.0.*" and patterns.count("head") == 1  # the file's entry for head wins
    assert cfg.resolve("head").bits == 8
    assert cfg.resolve("blocks.0.mlp.fc1").group_size is None  # base policy still applies
    assert cfg.resolve("blocks.1.mlp.fc1").group_size == 1
    assert MesaConfig.from_dict(cfg.to_dict()) == cfg


def test_conv_bn_relu_tags():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv1d(4, 4, 1), nn.BatchNorm1d(4), nn.Conv3d(4, 4, 1), nn.BatchNorm3d(4))
    layers = mesa_layers(model)
    assert layers["conv"] == ["0", "3", "5"] and layers["bn"] == ["1", "4", "6"] and layers["relu"] == ["2"]


def test_enabled_bn_layers_convert(tmp_path):
    """Mesa compressed the batch norms a file enables: torch-mesa converts
    exactly those (batch norms are otherwise exact by default)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    text = "on conv:\n  by_index: all\n  enable: True\non bn:\n  by_index: 0\n  enable: True\n"
    cfg = _config(_file(tmp_path, text), model)
    assert cfg.resolve("1").batch_norm and cfg.resolve("4") is None
    report = torch_mesa.compress_(model, cfg)
    assert report.plan["1"].endswith("converted (8 bits)") and "exact" in report.plan["4"]


def test_several_tags_in_one_header(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4))
    cfg = _config(_file(tmp_path, "on fc gelu:\n  by_index: 0\n  enable: True\n"), model)
    assert cfg.resolve("0").bits == 8 and cfg.resolve("1").bits == 8 and cfg.resolve("2") is None


# ------------------------------------------------------ Hugging Face models
def test_bert_attention_and_gelu_activation(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, vocab_size=100, max_position_embeddings=32)
    model = transformers.BertModel(cfg)
    layers = mesa_layers(model)
    # the innermost *Attention module makes the calls (not BertAttention)
    assert layers["softmax"] == [f"encoder.layer.{i}.attention.self" for i in range(2)]
    assert layers["gelu"] == [f"encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(2)]
    assert len(layers["fc"]) == 13 and len(layers["layernorm"]) == 5
    path = _file(tmp_path, """\
        on softmax:
          by_index: all
          enable: True
          level: 16
        on matmul:
          by_index: all
          enable: True
          level: 16
          by_index: 2 3
          enable: False
        on softmax:      # a later section for a tag replaces the earlier one
          by_index: 0
          enable: True
          level: 16
        on gelu:
          by_index: 1
          enable: True
        """)
    with pytest.warns(UserWarning, match="replaces the one at line 1"):
        mcfg = MesaConfig.from_mesa_policy(path, model, base=FAST)
    report = _compress(model, mcfg)
    expected = {n: None for n in _tagged(model)}
    expected.update({"encoder.layer.0.attention.self": 4,
                     "encoder.layer.1.intermediate.intermediate_act_fn": 8})
    _check_plan(report, expected)
    ids = torch.randint(0, 100, (2, 8))
    model(ids).last_hidden_state.sum().backward()


def test_llama_softmax_without_matmul_compresses_the_module_and_warns(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                   max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg)
    assert mesa_layers(model)["softmax"] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    path = _file(tmp_path, "on softmax:\n  by_index: 1\n  enable: True\n")
    with pytest.warns(UserWarning, match=r"one setting.*model\.layers\.1\.self_attn \(softmax 1: 8 bits, "
                                         r"matmul 2: exact, matmul 3: exact\)"):
        mcfg = MesaConfig.from_mesa_policy(path, model, base=MesaConfig(bits=None))
    report = _compress(model, mcfg)
    _check_plan(report, {"model.layers.0.self_attn": None, "model.layers.1.self_attn": 8,
                         "model.layers.1.self_attn.q_proj": None, "lm_head": None,
                         "model.layers.1.input_layernorm": None})  # RMSNorm: no Mesa tag, base
    assert report.converted == []  # only the routed calls of one attention module


def test_gpt2_conv1d_counts_as_fc():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
    layers = mesa_layers(transformers.GPT2LMHeadModel(cfg))
    assert layers["fc"] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                            "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj", "lm_head"]
    assert layers["softmax"] == ["transformer.h.0.attn"]
    assert layers["gelu"] == ["transformer.h.0.mlp.act"]


# ------------------------------------------------------------ Mesa's quirks
def test_keys_mesa_ignored_warn_and_by_tag_blocks_apply(tmp_path):
    model = _tiny_vit(depth=2)
    path = _file(tmp_path, """\
        on fc:
          by_index: all
          enable: True
          level: 256
          stable: -1
          fp_forward: True
        on matmul:
          by_index: all
          enable: True
          by_index: 1 3
          by_tag: matmul-1
          non_negative_only: True
        """)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = MesaConfig.from_mesa_policy(path, model)
    messages = [str(w.message) for w in caught]
    for key in ("stable", "fp_forward", "non_negative_only"):
        assert any(f"key {key!r} ignored" in m for m in messages), messages
    assert all(w.filename == __file__ for w in caught)  # warnings point at the caller
    assert cfg.resolve("blocks.1.attn").bits == 8 and cfg.resolve("head").bits == 8


def test_by_tag_disabling_one_operand_keeps_the_matmul_exact(tmp_path):
    model = _tiny_vit(depth=2)
    path = _file(tmp_path, """\
        on matmul:
          by_index: all
          enable: True
          by_index: 0 1
          by_tag: matmul-1
          enable: False
        """)
    cfg = _config(path, model)
    assert cfg.resolve("blocks.0.attn") is None and cfg.resolve("blocks.1.attn").bits == 8


def test_mesa_no_ops_warn(tmp_path):
    model = _tiny_vit(depth=2)
    path = _file(tmp_path, """\
        by_index: all
        on gelu: 10 20
          enable: True
          by_index: 0
          by_index: 1
          enable: True
        on norm:
          by_index: all
          enable: True
        """)
    with pytest.warns(UserWarning) as caught:
        cfg = MesaConfig.from_mesa_policy(path, model)
    text = "\n".join(str(w.message) for w in caught)
    for words in ("outside any 'on <tag>:' section", "epoch triggers", "before the section's first",
                  "replaces the by_index of line 4", "tag 'norm'"):
        assert words in text, (words, text)
    assert cfg.resolve("blocks.0.mlp.act") is None and cfg.resolve("blocks.1.mlp.act").bits == 8


def test_all_on_a_tag_the_model_lacks_warns(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.warns(UserWarning, match="has no bn layers"):
        cfg = MesaConfig.from_mesa_policy(_file(tmp_path, "on bn:\n  by_index: all\n  enable: True\n"), model)
    assert cfg.resolve("0") is None


def test_names_are_escaped_and_the_model_itself_can_be_a_layer(tmp_path):
    model = nn.Sequential(OrderedDict([("x[0]", nn.Linear(4, 4)), ("x0", nn.Linear(4, 4)),
                                       ("y*", nn.Linear(4, 4))]))
    cfg = _config(_file(tmp_path, "on fc:\n  by_index: 0 2\n  enable: True\n"), model)
    assert cfg.resolve("x[0]").bits == 8 and cfg.resolve("x0") is None and cfg.resolve("y*").bits == 8
    root = nn.Linear(4, 4)
    cfg = _config(_file(tmp_path, "on fc:\n  by_index: 0\n  enable: True\n  level: 16\n"), root)
    assert cfg.policy == (("*", (("bits", 4), ("momentum", 0.9), ("range_estimate", "dynamic"))),)
    report = _compress(root, cfg)
    assert report.plan[""] == "Linear: converted (4 bits)"


def test_read_mesa_policy_needs_no_model(tmp_path):
    policy = read_mesa_policy(_file(tmp_path, README))
    (block_all, block_12) = policy.sections["gelu"].blocks
    assert block_all.by_index == "all" and [s.key for s in block_all.settings] == ["enable", "level", "ema_decay"]
    assert block_12.by_index == (1, 2) and block_12.settings[0].value is False
    assert policy.warnings == []


# ------------------------------------------------------------------- errors
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="policy file not found"):
        MesaConfig.from_mesa_policy(tmp_path / "nope.txt", nn.Linear(2, 2))
    with pytest.raises(FileNotFoundError):
        MesaConfig.from_mesa_policy(tmp_path, nn.Linear(2, 2))  # a directory


@pytest.mark.parametrize("text,words", [
    ("on gelu:\n  by_index all\n", [":2:", "malformed line", "'by_index all'"]),
    ("on gelu\n", [":1:", "malformed line"]),
    ("on gelu:\n  by_index: all: 1\n", [":2:", "one ':'"]),
    ("on attention:\n", [":1:", "unknown layer tag 'attention'", "fc, conv, gelu"]),
    ("on GELU:\n", ["unknown layer tag 'GELU'", "lower case"]),
    ("on :\n", ["names no layer tag"]),
    ("on gelu: soon\n", ["epoch numbers"]),
    ("on gelu:\n  by_index: all\n  enable: yes\n", [":3:", "True or False"]),
    ("on gelu:\n  by_index: all\n  level: 8bit\n", [":3:", "number of quantization levels"]),
    ("on gelu:\n  by_index: all\n  ema_decay: high\n", [":3:", "ema_decay"]),
    ("on gelu:\n  by_index: all\n  level: 256 16\n", ["one value"]),
    ("on gelu:\n  by_index: all 1\n", ["'all' stands alone"]),
    ("on gelu:\n  by_index: 0-3\n", ["'0-3' is not a layer index"]),
    ("on gelu:\n  by_index:\n", ["by_index needs"]),
    ("on gelu:\n  by_index: all\n  quant_groups: 3\n", [":3:", "quant_groups", "group_size", "head_wise"]),
    ("on fc:\n  by_index: all\n  clip_val: 1.0\n", [":3:", "'clip_val'", "no counterpart"]),
    ("on fc:\n  by_index: all\n  in_features: 3\n", ["'in_features'"]),
    ("on fc\n  gelu: x\n", ["malformed"]),
    ("on gelu:\n  enable state: True\n", ["malformed key"]),
])
def test_malformed_files(tmp_path, text, words):
    with pytest.raises(MesaPolicyError) as info:
        MesaConfig.from_mesa_policy(_file(tmp_path, text), _tiny_vit(depth=1))
    assert isinstance(info.value, ValueError)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


@pytest.mark.parametrize("text,words", [
    ("on gelu:\n  by_index: 0 3\n  enable: True\n",
     [":2:", "by_index 3 is out of range", "this model has 2 gelu layers (indices 0 to 1)"]),
    ("on gelu:\n  by_index: -1\n  enable: True\n", ["by_index -1 is out of range"]),
    ("on bn:\n  by_index: 0\n  enable: True\n", ["this model has no bn layers"]),
    ("on matmul:\n  by_index: 4\n  enable: True\n", ["this model has 4 matmul layers", "two per attention"]),
    ("on fc:\n  by_index: all\n  enable: True\n  level: 65536\n",
     [":4:", "level 65536 (for fc layer 0)", "256, 16 or 4", "enable: False"]),
    ("on fc:\n  by_index: all\n  enable: True\n  ema_decay: 1.0\n", [":4:", "[0, 1)"]),
    ("on fc:\n  by_index: all\n  enable: True\n  level: 3\n", ["level 3"]),
])
def test_errors_against_the_model(tmp_path, text, words):
    with pytest.raises(MesaPolicyError) as info:
        MesaConfig.from_mesa_policy(_file(tmp_path, text), _tiny_vit(depth=2))
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_unsupported_level_on_a_layer_the_file_keeps_exact_is_fine(tmp_path):
    path = _file(tmp_path, "on fc:\n  by_index: all\n  level: 65536\n  by_index: 0\n  enable: True\n  level: 16\n")
    cfg = _config(path, _tiny_vit(depth=1))
    assert cfg.resolve("blocks.0.attn.qkv").bits == 4 and cfg.resolve("head") is None


def test_one_module_given_two_settings_is_an_error(tmp_path):
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              depth=1, num_classes=10)
    path = _file(tmp_path, """\
        on softmax:
          by_index: all
          enable: True
          level: 16
        on matmul:
          by_index: all
          enable: True
        """)
    with pytest.raises(MesaPolicyError, match=r"blocks\.0\.attn \(Attention\).*softmax layer 0: 4 bits; "
                                              r"matmul layer 0: 8 bits"):
        MesaConfig.from_mesa_policy(path, model)
    operands = _file(tmp_path, "on matmul:\n  by_index: all\n  enable: True\n  by_index: 0\n"
                               "  by_tag: matmul-2\n  level: 16\n", name="operands.txt")
    with pytest.raises(MesaPolicyError, match="two operands"):
        MesaConfig.from_mesa_policy(operands, model)


def test_bad_arguments(tmp_path):
    path = _file(tmp_path, README)
    with pytest.raises(TypeError, match="nn.Module"):
        MesaConfig.from_mesa_policy(path, "model")
    with pytest.raises(TypeError, match="base must be a MesaConfig"):
        MesaConfig.from_mesa_policy(path, nn.GELU(), base={"bits": 4})
