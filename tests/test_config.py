"""iaf_tf.config: the defaults, the hpconfig syntax and its checks, replace(), presets and resolve()."""

import pytest

from iaf_tf import cli, config, datasets
from iaf_tf.config import PRESETS_DIR, SETTINGS, Config, ConfigError, list_presets, load_preset, resolve
from tests.fixtures import POSTERIORS, ROOT, cli_flags, error_lines

ORIGINAL_DEFAULTS = dict(batch_size=16, eval_batch_size=100, num_gpus=8, learning_rate=0.01, z_size=32,
                         h_size=160, kl_min=0.25, depth=2, num_blocks=2, k=1, dataset="cifar10", image_size=32)
README_HPCONFIG = "depth=1,num_blocks=20,kl_min=0.1,learning_rate=0.002,batch_size=32"


def test_defaults_match_original():
    values = Config().hparams()
    assert {k: values[k] for k in ORIGINAL_DEFAULTS} == ORIGINAL_DEFAULTS
    assert {k: values[k] for k in set(values) - set(ORIGINAL_DEFAULTS)} == dict(
        ema_decay=0.999, posterior="down_iaf2_nl", depth_ar=2, depths="", prior="diag",
        mixed_precision=False, jit_compile=False, xla_programs="auto", max_skips=10, grad_clip=0.0,
        skip_threshold=0.0)


def test_parse_readme_command_is_typed_and_leaves_original_alone():
    base = Config()
    cfg = base.parse(README_HPCONFIG)
    assert (cfg.model.depth, cfg.model.num_blocks, cfg.objective.kl_min, cfg.optimization.learning_rate,
            cfg.optimization.batch_size) == (1, 20, 0.1, 0.002, 32)
    assert type(cfg.model.depth) is int and type(cfg.objective.kl_min) is float
    assert cfg is not base and base == Config()
    assert cfg.model.h_size == 160


def test_parse_whitespace_empty_entries_and_types():
    cfg = Config().parse(" depth = 3 ,, learning_rate=1 ,dataset=mnist,")
    assert cfg.model.depth == 3 and cfg.data.dataset == "mnist"
    assert cfg.optimization.learning_rate == 1.0 and type(cfg.optimization.learning_rate) is float
    assert Config().parse("") == Config()


@pytest.mark.parametrize("text,expected", [("true", True), ("TRUE", True), ("False", False), ("false", False)])
def test_bool_parsing(text, expected):
    assert Config().parse(f"mixed_precision={text}").runtime.mixed_precision is expected


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
    with pytest.raises(ConfigError) as err:
        Config().parse(text)
    assert fragment in str(err.value)
    assert isinstance(err.value, ValueError)


def test_unknown_key_lists_every_key_sorted():
    with pytest.raises(ConfigError) as err:
        Config().parse("dpeth=3")
    listed = str(err.value).split("valid keys: ")[1].split(", ")
    assert listed == sorted(Config().hparams())


def test_later_entry_wins():
    assert Config().parse("depth=3,depth=4").model.depth == 4


def test_every_posterior_parses():
    assert [Config().parse(f"posterior={p}").model.posterior for p in POSTERIORS] == list(POSTERIORS)


def test_round_trip_and_replace():
    cfg = Config().parse(README_HPCONFIG + ",mixed_precision=true,depths=3-4,dataset=mnist")
    assert Config().parse(repr(cfg)) == cfg
    assert cfg.to_hpconfig() == str(cfg)
    assert cfg.replace(depth=5).model.depth == 5 and cfg.model.depth == 1
    with pytest.raises(ConfigError):
        cfg.replace(depth=0)
    with pytest.raises(ConfigError):
        cfg.replace(depth=True)
    with pytest.raises(ConfigError, match="unknown hparam 'nope'"):
        cfg.replace(nope=1)
    values = cfg.hparams()
    values["depth"] = 99
    assert cfg.model.depth == 1


def test_replace_reaches_every_section_by_key():
    cfg = Config().replace(h_size=8, max_steps=5, logdir="/x", data_dir="/d", seed=3, summary_every=2,
                           checkpoint_every=4, once=True)
    assert (cfg.model.h_size, cfg.training.max_steps, cfg.runtime.logdir, cfg.data.data_dir, cfg.runtime.seed,
            cfg.training.summary_every, cfg.training.checkpoint_every, cfg.evaluation.once) == \
        (8, 5, "/x", "/d", 3, 2, 4, True)
    # Flags are not hparams: the hpconfig string leaves them out, so it is the same as the defaults'.
    assert cfg.replace(h_size=160).to_hpconfig() == Config().to_hpconfig()


def test_level_depths():
    assert Config().model.level_depths == [2, 2]
    assert Config().parse("depth=1,num_blocks=20").model.level_depths == [20]
    assert Config().parse("depths=10-10").model.level_depths == [10, 10]
    assert Config().parse("depths=3-1-4").model.level_depths == [3, 1, 4]
    # depths, when set, is authoritative over depth and num_blocks.
    assert Config().parse("depth=5,num_blocks=7,depths=3-1").model.level_depths == [3, 1]
    assert Config().parse("depth=3,num_blocks=2").model.level_depths == [2, 2, 2]


def test_presets():
    assert {"readme_recipe", "tf1_small", "cpu_quick", "table3"} <= set(list_presets())
    for name in list_presets():
        assert isinstance(load_preset(name), Config)
        assert (PRESETS_DIR / f"{name}.cfg").read_text().lstrip().startswith("#")
    assert load_preset("readme_recipe") == Config().parse(README_HPCONFIG)
    tf1 = load_preset("tf1_small")
    assert (tf1.model.h_size, tf1.model.z_size, tf1.runtime.num_gpus, tf1.objective.kl_min) == (32, 8, 1, 0.1)
    # Table 3 of the paper: twenty layers in two levels.
    table3 = load_preset("table3").model
    assert (table3.h_size, table3.z_size, table3.level_depths, table3.depth_ar, table3.posterior, table3.prior,
            load_preset("table3").objective.kl_min) == (160, 32, [10, 10], 2, "down_iaf2_nl", "diag", 0.25)


def test_theano_presets():
    example = load_preset("theano_example")
    assert (example.model.h_size, example.model.z_size, example.model.level_depths, example.model.depth_ar,
            example.model.posterior, example.objective.kl_min) == (64, 32, [2, 2, 2], 1, "down_iaf2_nl", 0.25)
    mnist = load_preset("theano_mnist")
    assert (mnist.data.dataset, mnist.model.h_size, mnist.model.z_size, mnist.model.level_depths,
            mnist.model.posterior) == ("mnist", 64, 32, [2, 2], "down_diag")
    for name in ("table3", "theano_example", "theano_mnist"):
        cfg = load_preset(name)
        assert (cfg.optimization.learning_rate, cfg.optimization.batch_size, cfg.runtime.num_gpus) == \
            (0.002, 16, 1), name


def test_presets_live_in_the_package_and_hparams_links_to_them():
    assert PRESETS_DIR == ROOT / "iaf_tf" / "presets"
    assert (ROOT / "hparams").resolve() == PRESETS_DIR.resolve()


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError) as err:
        load_preset("nope")
    msg = str(err.value)
    assert "unknown preset 'nope'; available presets: " + ", ".join(list_presets()) in msg
    assert str(PRESETS_DIR) in msg


def test_resolve():
    assert resolve(None, "") == Config()
    assert resolve("", "depth=3").model.depth == 3
    cfg = resolve("tf1_small", "batch_size=8")
    assert (cfg.optimization.batch_size, cfg.model.h_size) == (8, 32)
    # Other settings come last, by key.
    assert resolve("tf1_small", "h_size=16", h_size=24, max_steps=7).get("h_size") == 24
    assert config.resolve(max_steps=7).training.max_steps == 7


# ---------------------------------------------------------------- what the dataset decides

def test_the_dataset_alone_picks_the_image_size():
    assert Config().data.image_size == 32
    assert resolve(hpconfig="dataset=mnist").data.image_size == 32
    assert resolve(hpconfig="dataset=imagenet64").data.image_size == 64
    assert resolve(dataset="imagenet64").data.image_size == 64
    assert load_preset("imagenet64").data.image_size == 64 and load_preset("imagenet32").data.image_size == 32
    # image_size remains an override (the loaders check it against the files) when given with the dataset;
    # another dataset later takes its own size.
    override = resolve(hpconfig="dataset=imagenet64,image_size=32")
    assert override.data.image_size == 32
    assert override.replace(dataset="imagenet64").data.image_size == 64
    assert override.replace(dataset="cifar10").data.image_size == 32
    assert Config().parse(override.to_hpconfig()) == override


def test_help_takes_each_dataset_s_folder_variable_sizes_and_download_from_its_spec():
    for spec in datasets.REGISTRY.values():
        assert f"${spec.folder_variable} for {spec.name}" in SETTINGS["data_dir"].help
        assert f"{spec.name} {spec.image_size}" in SETTINGS["image_size"].help
    assert "cifar10 with tensorflow-datasets" in SETTINGS["download"].help
    assert "mnist" not in SETTINGS["download"].help and "imagenet" not in SETTINGS["download"].help


@pytest.mark.parametrize("settings, args, fragment", [
    (dict(num_gpus=2, cpu_replicas=3), ["--num_gpus", 2, "--cpu_replicas", 3],
     "--cpu_replicas=3 must equal --num_gpus=2"),
    (dict(dataset="imagenet32", depth=6), ["--hpconfig", "dataset=imagenet32,depth=6"],
     "6 levels need image_size divisible by 64, and image_size=32 allows at most 5 levels"),
])
def test_a_cross_setting_mistake_is_refused_alike_by_the_command_line_and_the_api(settings, args, fragment, tmp_path,
                                                                                  capsys):
    with pytest.raises(ConfigError) as err:
        resolve(**settings)
    assert fragment in str(err.value)
    assert cli.main(["iaf.py"], cli_flags("--mode", "train", "--logdir", tmp_path / "run", *args)) == 2
    assert error_lines(capsys.readouterr().err) == [f"error: {err.value}"]
    assert not (tmp_path / "run").exists()
