import pytest

from torch_mesa import MesaConfig
from torch_mesa.config import QuantSpec


def test_defaults_resolve_to_8bit_nearest_dynamic():
    spec = MesaConfig().resolve("blocks.0.mlp.fc1")
    assert spec == QuantSpec(
        bits=8, group_size=1, head_wise=True, stochastic=False, running=False,
        momentum=0.9, keep_once=True, kernel="auto",
    )


@pytest.mark.parametrize("bits,stochastic", [(8, False), (4, True), (2, True)])
def test_rounding_defaults_to_stochastic_below_8_bits(bits, stochastic):
    assert MesaConfig(bits=bits).resolve("x").stochastic is stochastic
    assert MesaConfig(bits=bits, rounding="nearest").resolve("x").stochastic is False


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        ({"bits": 3}, ValueError, ["bits=3", "8, 4 or 2"]),
        ({"bits": "8"}, TypeError, ["bits", "'8'"]),
        ({"bits": True}, TypeError, ["bits"]),
        ({"group_size": 0}, ValueError, ["group_size=0", ">= 1"]),
        ({"group_size": 2.5}, TypeError, ["group_size", "2.5"]),
        ({"rounding": "up"}, ValueError, ["rounding='up'", "nearest", "stochastic"]),
        ({"range_estimate": "ema"}, ValueError, ["range_estimate='ema'", "dynamic", "running"]),
        ({"momentum": 1.0}, ValueError, ["momentum=1.0", "[0, 1)"]),
        ({"kernel": "triton"}, ValueError, ["kernel='triton'", "reference"]),
        ({"policy": {"head": {"bitz": 4}}}, ValueError, ["bitz", "allowed"]),
        ({"policy": {"head": {"bits": 5}}}, ValueError, ["policy['head']", "bits=5"]),
        ({"policy": {"": None}}, TypeError, ["pattern"]),
        ({"policy": 3}, TypeError, ["policy must be a mapping"]),
    ],
)
def test_bad_values_name_field_value_and_fix(kwargs, exc, words):
    with pytest.raises(exc) as info:
        MesaConfig(**kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_config_is_frozen():
    with pytest.raises(Exception):
        MesaConfig().bits = 4  # type: ignore[misc]


def test_policy_later_match_overrides_and_none_keeps_exact():
    cfg = MesaConfig(
        bits=8,
        policy={"*.mlp.*": {"bits": 4}, "blocks.0.*": None, "head": None, "blocks.0.mlp.fc2": {"bits": 2}},
    )
    assert cfg.resolve("blocks.3.mlp.fc1").bits == 4
    assert cfg.resolve("blocks.3.attn.qkv").bits == 8
    assert cfg.resolve("blocks.0.attn.qkv") is None
    assert cfg.resolve("blocks.0.mlp.fc1") is None
    assert cfg.resolve("blocks.0.mlp.fc2").bits == 2  # a later entry re-enables it
    assert cfg.resolve("head") is None
    assert cfg.matching_patterns("head") == ("head",)


def test_bits_none_keeps_everything_exact():
    assert MesaConfig(bits=None).resolve("anything") is None


def test_round_trip_through_dict():
    cfg = MesaConfig(bits=4, group_size=None, range_estimate="running", momentum=0.8,
                     policy={"head": None, "*.attn.*": {"bits": 8}})
    d = cfg.to_dict()
    assert d["policy"] == {"head": None, "*.attn.*": {"bits": 8}}
    assert MesaConfig.from_dict(d) == cfg
    assert hash(MesaConfig.from_dict(d)) == hash(cfg)
    with pytest.raises(ValueError, match="unknown MesaConfig field"):
        MesaConfig.from_dict({"bitz": 4})
