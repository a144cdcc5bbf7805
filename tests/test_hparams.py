import pytest

from iaf_tf.hparams import (HParams, HParamsError, PRESETS_DIR, get_default_hparams, list_presets,
                            load_preset, resolve_hparams)

ORIGINAL_DEFAULTS = dict(batch_size=16, eval_batch_size=100, num_gpus=8, learning_rate=0.01, z_size=32,
                         h_size=160, kl_min=0.25, depth=2, num_blocks=2, k=1, dataset="cifar10", image_size=32)
README_HPCONFIG = "depth=1,num_blocks=20,kl_min=0.1,learning_rate=0.002,batch_size=32"


def test_defaults_match_original():
    values = get_default_hparams().values()
    assert {k: values[k] for k in ORIGINAL_DEFAULTS} == ORIGINAL_DEFAULTS
    assert {k: values[k] for k in set(values) - set(ORIGINAL_DEFAULTS)} == dict(
        ema_decay=0.999, posterior="down_iaf2_nl", depth_ar=2, depths="", prior="diag",
        mixed_precision=False, jit_compile=False, max_skips=10, grad_clip=0.0)


def test_parse_readme_command_is_typed_and_leaves_original_alone():
    base = get_default_hparams()
    hps = base.parse(README_HPCONFIG)
    assert (hps.depth, hps.num_blocks, hps.kl_min, hps.learning_rate, hps.batch_size) == (1, 20, 0.1, 0.002, 32)
    assert type(hps.depth) is int and type(hps.kl_min) is float
    assert hps is not base and base == get_default_hparams()
    assert hps.h_size == 160


def test_parse_whitespace_empty_entries_and_types():
    hps = get_default_hparams().parse(" depth = 3 ,, learning_rate=1 ,dataset=mnist,")
    assert hps.depth == 3 and hps.dataset == "mnist"
    assert hps.learning_rate == 1.0 and type(hps.learning_rate) is float
    assert get_default_hparams().parse("") == get_default_hparams()


@pytest.mark.parametrize("text,expected", [("true", True), ("TRUE", True), ("False", False), ("false", False)])
def test_bool_parsing(text, expected):
    assert get_default_hparams().parse(f"mixed_precision={text}").mixed_precision is expected


@pytest.mark.parametrize("text,fragment", [
    ("dpeth=3", "unknown hparam 'dpeth' in 'dpeth=3'; valid keys: batch_size, dataset, depth, depth_ar"),
    ("depth=1.5", "'depth=1.5'"),
    ("mixed_precision=yes", "'mixed_precision=yes'"),
    ("mixed_precision=1", "'mixed_precision=1'"),
    ("depth", "malformed hparam entry 'depth': expected key=value"),
    ("batch_size=-1", "batch_size=-1"),
    ("batch_size=0", "batch_size=0"),
    ("depth_ar=-1", "depth_ar=-1"),
    ("learning_rate=0", "learning_rate=0.0"),
    ("ema_decay=1", "ema_decay=1.0"),
    ("kl_min=-0.1", "kl_min=-0.1"),
    ("posterior=up_iaf3_nl", "posterior='up_iaf3_nl'"),
    ("prior=made", "prior='made'"),
    ("dataset=svhn", "dataset='svhn'"),
    ("depths=10,10", "malformed hparam entry '10'"),
    ("depths=10;10", "depths='10;10'"),
    ("depths=10-0", "depths='10-0'"),
    ("depths=-10", "depths='-10'"),
])
def test_parse_rejects(text, fragment):
    with pytest.raises(HParamsError) as err:
        get_default_hparams().parse(text)
    assert fragment in str(err.value)
    assert isinstance(err.value, ValueError)


def test_unknown_key_lists_every_key_sorted():
    with pytest.raises(HParamsError) as err:
        get_default_hparams().parse("dpeth=3")
    listed = str(err.value).split("valid keys: ")[1].split(", ")
    assert listed == sorted(get_default_hparams().values())


def test_later_entry_wins():
    assert get_default_hparams().parse("depth=3,depth=4").depth == 4


def test_round_trip_and_replace():
    hps = get_default_hparams().parse(README_HPCONFIG + ",mixed_precision=true,depths=3-4,dataset=mnist")
    assert get_default_hparams().parse(repr(hps)) == hps
    assert hps.to_string() == str(hps)
    assert hps.replace(depth=5).depth == 5 and hps.depth == 1
    with pytest.raises(HParamsError):
        hps.replace(depth=0)
    with pytest.raises(HParamsError):
        hps.replace(depth=True)
    with pytest.raises(HParamsError, match="unknown hparam 'nope'"):
        hps.replace(nope=1)
    values = hps.values()
    values["depth"] = 99
    assert hps.depth == 1


def test_level_depths():
    assert get_default_hparams().level_depths == [2, 2]
    assert get_default_hparams().parse("depth=1,num_blocks=20").level_depths == [20]
    assert get_default_hparams().parse("depths=10-10").level_depths == [10, 10]
    assert get_default_hparams().parse("depths=3-1-4").level_depths == [3, 1, 4]


def test_presets():
    assert {"readme_recipe", "tf1_small", "cpu_quick", "table3"} <= set(list_presets())
    for name in list_presets():
        assert isinstance(load_preset(name), HParams)
        assert (PRESETS_DIR / f"{name}.cfg").read_text().lstrip().startswith("#")
    assert load_preset("readme_recipe") == get_default_hparams().parse(README_HPCONFIG)
    tf1 = load_preset("tf1_small")
    assert (tf1.h_size, tf1.z_size, tf1.num_gpus, tf1.kl_min) == (32, 8, 1, 0.1)
    table3 = load_preset("table3")
    assert table3.level_depths == [10, 10] and table3.posterior == "down_iaf2_nl"


def test_unknown_preset_lists_available():
    with pytest.raises(HParamsError) as err:
        load_preset("nope")
    msg = str(err.value)
    assert "unknown preset 'nope'; available presets: " + ", ".join(list_presets()) in msg
    assert str(PRESETS_DIR) in msg


def test_resolve_hparams():
    assert resolve_hparams(None, "") == get_default_hparams()
    assert resolve_hparams("", "depth=3").depth == 3
    hps = resolve_hparams("tf1_small", "batch_size=8")
    assert (hps.batch_size, hps.h_size) == (8, 32)
