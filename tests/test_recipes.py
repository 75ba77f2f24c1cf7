"""Recipes: every shipped file validates, the Trn1 ladder hits its sizes, overrides and each validation error."""

from __future__ import annotations

import inspect
import json
import typing
from pathlib import Path

import pytest

from bmojo_neuron import BMojoConfig
from bmojo_neuron.recipes import Recipe, count_parameters, list_recipes, load_recipe, resolve_recipe_path

LADDER = {"trn1/bmojo-130m": 130e6, "trn1/bmojo-370m": 370e6, "trn1/bmojo-790m": 790e6, "trn1/bmojo-1.4b": 1.4e9}


def test_every_shipped_recipe_validates() -> None:
    names = list_recipes()
    assert {"cpu-tiny", "cpu-text", "mqar-suite", *LADDER} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        assert isinstance(recipe.model_config(), BMojoConfig)
        for variant in ([recipe.compare] if recipe.compare else []) + recipe.suite:
            assert isinstance(recipe.with_overrides(variant.overrides).model_config(), BMojoConfig)
        assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_the_recipe_schema_is_the_config_class_fields() -> None:
    """Recipes check the model section with `BMojoFields` (no transformers import); `BMojoConfig` must take the
    same arguments with the same hints, and build the same values and derived sizes from them."""
    from bmojo_neuron.recipes import _config_fields

    params = [p for p in inspect.signature(BMojoConfig.__init__).parameters.values()
              if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]
    hints = typing.get_type_hints(BMojoConfig.__init__)
    assert _config_fields() == {p.name: hints.get(p.name, typing.Any) for p in params}
    assert list(_config_fields()) == [p.name for p in params] and len(params) > 40
    for name in ("cpu-tiny", "cpu-text", "trn1/bmojo-130m", "mqar-suite"):
        recipe = load_recipe(name)
        config, fields = recipe.model_config(), recipe.model_fields()
        assert type(fields) is not BMojoConfig
        assert {key: getattr(config, key) for key in vars(fields)} == vars(fields), name
        derived = ("ssm_inner_size", "ssm_num_heads", "memory_horizon", "memory_lag")
        assert [getattr(fields, d) for d in derived] == [getattr(config, d) for d in derived], name
        assert fields.ssm_layers() == config.ssm_layers(), name


@pytest.mark.parametrize("name", sorted(LADDER))
def test_ladder_parameter_counts_within_5_percent(name: str) -> None:
    recipe = load_recipe(name)
    count = count_parameters(recipe)
    print(f"{name}: {count / 1e6:.1f}M parameters (target {LADDER[name] / 1e6:.0f}M)")
    assert abs(count / LADDER[name] - 1) <= 0.05
    assert recipe.model["vocab_size"] == 50304 == -(-50280 // 128) * 128
    assert recipe.data.kind == "text" and recipe.run.device == "neuron"
    assert recipe.data.block_size % 128 == 0 and 2048 <= recipe.data.block_size <= 8192


def test_default_recipe_trains_bmojo_against_its_ssm_and_fading_memory() -> None:
    """`bmojo-neuron train` with no recipe trains B'MOJO, then B'MOJO-F and the SSM alone, each into its own folder,
    on the same data and steps, in the regime docs/recipes.md describes: more kv pairs than the SSM state's
    dimension, both windows shorter than the block of pairs, and a memory with room for every pair and query
    token but not for the whole sequence (innovation must choose)."""
    from bmojo_neuron.recipe_runs import plan_runs

    default = load_recipe()
    runs = plan_runs(default, "out")
    assert [(r.run.name, r.model_config().layer_pattern) for r, _ in runs] == [
        ("bmojo", "BB"), ("bmojo-f", "FF"), ("mamba", "MM")]
    assert [str(d) for _, d in runs] == [str(Path("out") / n) for n in ("bmojo", "bmojo-f", "mamba")]
    for variant, _ in runs:
        assert variant.data == default.data and variant.train == default.train and variant.optim == default.optim
        assert variant.model_config().ssm_state_size == default.model_config().ssm_state_size
    config, data = default.model_config(), default.data
    assert data.kind == "mqar" and config.layer_pattern == "BB"
    assert data.num_kv_pairs > config.ssm_state_size * config.ssm_n_groups
    assert config.window_size + config.fading_window < 2 * data.num_kv_pairs
    assert 4 * data.num_kv_pairs <= config.memory_size < data.seq_len
    assert config.memory_picks * (data.seq_len // config.memory_chunk) > config.memory_size


@pytest.mark.parametrize("overrides", [
    {"memory_decay": 0.0}, {"memory_decay": 0.99}, {"memory_picks": 2}, {"memory_size": 16},
    {"innovation_loss_weight": 0.0, "freeze_innovation_predictor": True},
])
def test_ablations_of_the_default_are_command_line_overrides(overrides: dict) -> None:
    """docs/results.md's ablations: `suite=none model.<key>=<value>` trains one B'MOJO run with that change."""
    from bmojo_neuron.recipe_runs import plan_runs

    recipe = load_recipe(None, ["suite=none", *(f"model.{k}={str(v).lower()}" for k, v in overrides.items())])
    [(run, _)] = plan_runs(recipe, "out")
    config = run.model_config()
    assert config.layer_pattern == "BB" and {k: getattr(config, k) for k in overrides} == overrides


def test_matched_parameter_counts_of_comparisons() -> None:
    for name, expected in [("cpu-tiny", {"bmojo", "bmojo-f", "mamba"}),
                           ("mqar-suite", {"bmojo", "bmojo-f", "mamba", "swa", "attention"})]:
        recipe = load_recipe(name)
        counts = {v.name: count_parameters(recipe.with_overrides(v.overrides)) for v in recipe.suite}
        print(f"{name} parameters:", counts)
        assert set(counts) == expected
        assert all(abs(n / counts["bmojo"] - 1) <= 0.1 for n in counts.values()), counts


def test_the_suite_trains_every_models_attention_at_its_own_rate_and_nothing_else() -> None:
    """mqar-suite: the attention projections (and only they) of every model that has them learn at
    0.33 x lr (0.99e-3, about the default recipe's 1e-3); the SSM-only model gets the plain two groups at lr."""
    from bmojo_neuron import BMojoForCausalLM
    from bmojo_neuron.training.optim import parameter_groups

    recipe = load_recipe("mqar-suite")
    attention = ("q_proj", "k_proj", "v_proj", "o_proj")
    for variant in recipe.suite:
        run = recipe.with_overrides(variant.overrides)
        o = run.optim
        model = BMojoForCausalLM(run.model_config())
        groups = {g["name"]: g for g in parameter_groups(model, o.weight_decay, o.lr, o.lr_multipliers)}
        fast = [n for g in groups.values() if "lr" in g for n in g["names"]]
        expected = [n for n, _ in model.named_parameters() if n.split(".")[-2] in attention]
        assert sorted(fast) == sorted(expected), variant.name
        assert all(g["lr"] == pytest.approx(0.33 * 3e-3, rel=1e-12) for g in groups.values() if "lr" in g)
        assert o.lr == 3e-3
        if variant.name == "mamba":
            assert list(groups) == ["decay", "no_decay"] and not expected


def test_default_name_resolution_and_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_recipe().run.name == "cpu-tiny"
    assert load_recipe(None).source == str(resolve_recipe_path("cpu-tiny"))
    custom = tmp_path / "mine.yaml"
    custom.write_text("train: {steps: 3}\n", encoding="utf-8")
    recipe = load_recipe(str(custom))
    assert recipe.run.name == "mine" and recipe.run.output_dir == str(Path("runs") / "mine")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "local.yaml").write_text("run: {name: here}\n", encoding="utf-8")
    assert load_recipe("local").run.name == "here"  # found under CWD/recipes
    assert load_recipe("cpu-text").data.kind == "text"  # falls back to the repository's recipes/
    with pytest.raises(FileNotFoundError, match="known recipes: .*cpu-tiny"):
        load_recipe("no-such-recipe")


def test_overrides_parse_yaml_values() -> None:
    recipe = load_recipe("cpu-tiny", ["train.steps=10", "model.layer_pattern=BM", "optim.betas=[0.9,0.99]",
                                      "optim.lr=3e-4", "run.name=x"])
    assert recipe.train.steps == 10 and recipe.optim.betas == [0.9, 0.99] and recipe.optim.lr == 3e-4
    assert recipe.model_config().layer_pattern == "BM"
    assert recipe.run.output_dir == str(Path("runs") / "x")  # derived default follows the new name
    again = recipe.with_overrides({"train.batch_size": 4})
    assert again.train.batch_size == 4 and again.train.steps == 10 and recipe.train.batch_size != 4


def test_model_config_fills_vocab_from_data() -> None:
    assert Recipe.from_dict({"data": {"vocab_size": 96}}).model_config().vocab_size == 96
    assert Recipe.from_dict({"data": {"kind": "text"}}).model_config().vocab_size == 256


@pytest.mark.parametrize(
    ("document", "match"),
    [
        ({"trian": {}}, r"recipe key trian: unknown section; valid sections: run, model"),
        ({"train": {"stepz": 1}}, r"recipe key train.stepz: unknown key; valid keys of train: steps, batch_size"),
        ({"train": {"steps": "ten"}}, r"recipe key train.steps: must be an integer, got str 'ten'"),
        ({"train": {"steps": 1.5}}, r"recipe key train.steps: must be an integer"),
        ({"train": {"activation_checkpointing": "yes"}}, r"train.activation_checkpointing: must be true or false"),
        ({"train": {"steps": 0}}, r"recipe key train.steps: is 0; must be a positive integer"),
        ({"train": {"precision": "fp8"}}, r"train.precision: is 'fp8'; choose one of fp32, bf16"),
        ({"run": {"device": "tpu"}}, r"run.device: is 'tpu'; choose one of auto, cpu, cuda, neuron"),
        ({"model": {"hidden_sise": 8}}, r"recipe key model.hidden_sise: unknown BMojoConfig field"),
        ({"model": {"layer_pattern": "BX", "num_hidden_layers": 2}}, r"recipe key model.layer_pattern: has letters"),
        ({"model": {"vocab_size": 16}}, r"model.vocab_size: is 16, smaller than data.vocab_size"),
        ({"data": {"kind": "audio"}}, r"data.kind: is 'audio'; choose one of mqar, text"),
        ({"data": {"kind": "text", "seq_len": 8}}, r"data.seq_len: is a key of mqar data, but data.kind is text"),
        ({"data": {"kind": "text", "sequence_len": 8}}, r"data.sequence_len: unknown key; valid keys of data: kind, "
                                                        r"path"),
        ({"data": {"seq_len": 8, "num_kv_pairs": 4}}, r"recipe key data: seq_len 8 is too short"),
        ({"optim": {"betas": [0.9]}}, r"optim.betas: is \[0.9\]"),
        ({"optim": {"betas": 0.9}}, r"optim.betas: must be a list"),
        ({"parallel": {"tp": 0}}, r"parallel.tp: is 0; must be a positive integer"),
        ({"parallel": {"sp": 1}}, r"parallel.sp: must be true or false"),
        # sp over one tensor-parallel rank does nothing (NxD only warns): the run would not be the recipe's
        ({"parallel": {"sp": True}}, r"^recipe key parallel.sp: is true with parallel.tp 1: sequence parallelism "
                                     r"splits the sequence over the tensor-parallel ranks, so with one it does "
                                     r"nothing; set parallel.sp=false, or parallel.tp above 1$"),
        ({"eval": {"length_multipliers": [1, 0]}}, r"eval.length_multipliers: is 0"),
        ({"eval": {"length_multipliers": [1, 2, 1]}},
         r"^recipe key eval.length_multipliers: is \[1, 2, 1\]; each length must appear once \(repeated: 1\)$"),
        ({"run": {"output_dir": ""}}, r"^recipe key run.output_dir: must not be empty \(null: runs/<run.name>\)$"),
        ({"compare": {"overrides": {}}}, r"recipe key compare.name: missing"),
        (
            {"compare": {"name": "m", "overrides": {"model.layer_patern": "M"}}},
            r"compare.overrides \(m\): .*layer_patern",
        ),
        ({"suite": [{"name": "a", "overrides": {"train.steps": "x"}}]}, r"suite\[0\].overrides \(a\): .*train.steps"),
        ({"train": [1]}, r"recipe key train: must be a mapping"),
        ({"optim": {"lr": float("inf")}}, r"recipe key optim.lr: must be a finite number, got inf"),
        ({"optim": {"lr": float("nan")}}, r"recipe key optim.lr: must be a finite number, got nan"),
        ({"optim": {"lr": 0}}, r"recipe key optim.lr: is 0.0; must be > 0"),
        ({"optim": {"lr_multipliers": 3}}, r"recipe key optim.lr_multipliers: must be a mapping, got 3"),
        ({"optim": {"lr_multipliers": {"q_proj": 0}}}, r"optim.lr_multipliers\['q_proj'\]: is 0; must be a number > 0"),
        ({"optim": {"lr_multipliers": {"q_proj": "x"}}}, r"optim.lr_multipliers\['q_proj'\]: is 'x'; must be a number"),
        ({"optim": {"lr_multipliers": {"(": 1.0}}}, r"optim.lr_multipliers\['\('\]: is not a regular expression"),
        ({"optim": {"lr_multipliers": {"": 1.0}}}, r"optim.lr_multipliers\[''\]: the pattern must be a non-empty"),
        ({"model": {"hidden_size": "abc"}}, r"recipe key model.hidden_size: must be an integer, got str 'abc'"),
        ({"model": {"rope_theta": "big"}}, r"recipe key model.rope_theta: must be a number, got str 'big'"),
        ({"model": {"memory_decay": float("inf")}}, r"recipe key model.memory_decay: must be a finite number"),
        ({"model": {"ssm_A_init_range": [1, 2, 3]}}, r"model.ssm_A_init_range: is \[1, 2, 3\]; must be \[low, high\]"),
        ({"model": {"ssm_A_init_range": "wide"}}, r"model.ssm_A_init_range: must be a list of 2 values"),
        ({"model": {"num_attention_heads": 7}}, r"model.num_attention_heads: \(7\) must divide hidden_size \(768\)"),
    ],
)
def test_validation_errors_name_the_key(document: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Recipe.from_dict(document)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("train.steps", r"override 'train.steps': expected key.sub=value"),
        ("train.stepz=3", r"recipe key train.stepz: unknown key"),
        ("trian.steps=3", r"override 'trian.steps': unknown section 'trian'"),
        ("steps=3", r"override 'steps': expected section.key"),
        ("train.steps=ten", r"recipe key train.steps: must be an integer"),
        ("optim.lr=.inf", r"recipe key optim.lr: must be a finite number, got inf"),
        ("model.hidden_size=abc", r"recipe key model.hidden_size: must be an integer, got str 'abc'"),
        ("compare=yes", r"override 'compare': compare=none is the only value accepted \(it drops the recipe's "
                        r"compare\); change one of its keys with compare.name=... or compare.overrides=...$"),
        ("model={}", r"^override 'model': model=none is the only value accepted \(it drops the recipe's model\); "
                     r"set one of its keys with model.KEY=VALUE, e.g. model.window_size=64$"),
        ("suite=[]", r"^override 'suite': suite=none is the only value accepted \(it drops the recipe's suite\); "
                     r"its entries are set in the recipe file$"),  # suite.name=... is no override: a list has no keys
        ("data.kind=text", r"^recipe key data.vocab_size: is a key of mqar data, but data.kind is text: data.kind "
                           r"alone does not switch the section; give a whole text data section without the mqar "
                           r"keys \(in a recipe file; eval: --data RECIPE\)$"),
        ("compare.name=", r"^recipe key compare.name: must be a string, got no value \(null\)$"),
        ("train.steps=", r"^recipe key train.steps: must be an integer, got no value \(null\)$"),
        ("optim.betas=[0.9", r"^override 'optim.betas=\[0.9': not valid YAML: while parsing a flow sequence, "
                             r"expected ',' or '\]', but got '<stream end>' \(at character 5 of the value\)$"),
        ('run.name="abc', r"^override 'run.name=\"abc': not valid YAML: while scanning a quoted scalar, "
                          r"found unexpected end of stream \(at character 5 of the value\)$"),
    ],
)
def test_bad_overrides(override: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_recipe("cpu-tiny", [override])


def test_libyaml_reads_every_bundled_recipe_as_pyyaml_does() -> None:
    """`parse_yaml` reads recipes with libyaml's parser where PyYAML has it: every bundled recipe is the same
    document as PyYAML's own parser makes of it, ``3e-4`` a float in both (a refusal is PyYAML's own message: the
    not-valid-YAML tests)."""
    import yaml

    from bmojo_neuron import recipes

    files = sorted(Path(recipes.__file__).resolve().parents[1].joinpath("recipes").rglob("*.yaml"))
    assert len(files) >= 5
    for file in files:
        text = file.read_text(encoding="utf-8")
        assert recipes.parse_yaml(text) == yaml.load(text, Loader=recipes._Loader), file
    assert recipes.parse_yaml("lr: 3e-4\nbetas: [0.9, 1e-2]") == {"lr": 3e-4, "betas": [0.9, 1e-2]}
    assert recipes._LibyamlLoader.__mro__[1] is getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def test_a_recipe_file_that_is_not_yaml_is_one_line_naming_where(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: {name: x}\ntrain: {steps: 5\n")
    with pytest.raises(ValueError) as err:
        load_recipe(str(bad))
    assert str(err.value) == (f"recipe {bad}: not valid YAML: while parsing a flow mapping, expected ',' or '}}', "
                              "but got '<stream end>' (line 3, column 1)")


@pytest.mark.parametrize("text", ["", "# a recipe\n\n"])
def test_an_empty_recipe_file_is_refused_rather_than_read_as_every_default(tmp_path, text) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text(text)
    with pytest.raises(ValueError) as err:
        load_recipe(str(empty))
    assert str(err.value) == (f"recipe {empty}: is empty; write the sections it changes (e.g. train: "
                              "{steps: 100}), or `{}` for every default")
    empty.write_text("{}")  # every default, said so
    assert load_recipe(str(empty)).train.steps == Recipe.from_dict({}).train.steps


def test_text_path_is_not_checked_at_parse_time() -> None:
    recipe = Recipe.from_dict({"data": {"kind": "text", "path": "/definitely/missing"}})
    assert recipe.data.path == "/definitely/missing"


def test_count_parameters_matches_a_real_model() -> None:
    from bmojo_neuron import BMojoForCausalLM

    recipe = load_recipe("cpu-tiny")
    assert count_parameters(recipe) == BMojoForCausalLM(recipe.model_config()).num_parameters()


def test_check_catches_edits_made_after_loading() -> None:
    """`Recipe.check` applies the loading rules again (the trainer's only validation): keep_last >= 1, types,
    choices."""
    recipe = load_recipe("cpu-tiny")
    recipe.check()
    for section, key, value, match in [("checkpoint", "keep_last", 0, "checkpoint.keep_last: is 0"),
                                       ("train", "steps", "10", "train.steps: must be an integer"),
                                       ("run", "device", "tpu", "run.device: is 'tpu'"),
                                       ("optim", "grad_clip", -1.0, "optim.grad_clip")]:
        edited = load_recipe("cpu-tiny")
        setattr(getattr(edited, section), key, value)
        with pytest.raises(ValueError, match=match):
            edited.check()


def test_resume_conflicts_name_the_keys_that_may_not_change() -> None:
    from bmojo_neuron.recipes import resume_conflicts

    saved = load_recipe("cpu-tiny").record()
    changed = load_recipe("cpu-tiny", ["train.steps=7", "eval.every=3", "optim.lr=0.5", "model.hidden_size=32"])
    assert list(resume_conflicts(saved, changed.record())) == ["model.hidden_size", "optim.lr"]
    assert resume_conflicts(saved, changed.record())["optim.lr"] == (saved["optim"]["lr"], 0.5)  # (stored, now)


def test_a_run_stored_before_train_spacings_resumes_as_spacing_one_with_stretched_pairs() -> None:
    from bmojo_neuron.recipes import resume_conflicts

    saved = load_recipe("cpu-tiny").record()
    del saved["data"]["train_spacings"], saved["data"]["stretch_pairs"]  # as a run stored before the keys existed
    assert not resume_conflicts(saved, load_recipe("cpu-tiny").record())
    mixed = load_recipe("cpu-tiny", ["data.train_spacings=[1,2]"]).record()
    assert list(resume_conflicts(saved, mixed)) == ["data.train_spacings"]
    assert list(resume_conflicts(saved, load_recipe("cpu-tiny", ["data.stretch_pairs=false"]).record())) == [
        "data.stretch_pairs"]


@pytest.mark.parametrize("off", ["none", "null", "~", "false", "off"])
def test_compare_and_suite_can_be_switched_off_on_the_command_line(off: str, tmp_path: Path) -> None:
    paired = tmp_path / "paired.yaml"
    paired.write_text("compare: {name: ssm, overrides: {model.layer_pattern: MMMMMMMMMMMM}}\n", encoding="utf-8")
    assert load_recipe(str(paired)).compare is not None
    assert load_recipe(str(paired), [f"compare={off}"]).compare is None
    assert load_recipe("mqar-suite", [f"suite={off}"]).suite == []
    assert load_recipe("cpu-tiny", [f"suite={off}"]).suite == []  # the B'MOJO run alone (the ablations)
    again = load_recipe(str(paired), ["compare=none", "compare.name=again", "compare.overrides={}"])
    assert again.compare is not None and again.compare.name == "again"  # the drop first, then its keys


def test_init_weights_saved_before_a_field_existed_build_the_layers_they_were_trained_with() -> None:
    """The committed checkpoint's config.json predates `ssm_residual` (its B layer has no residual gain): a recipe
    starting from it takes the value its weights were trained with, not today's default, which would add a
    tensor the weights do not have."""
    folder = Path(__file__).parent / "golden" / "checkpoints" / "finished"
    assert "ssm_residual" not in json.loads((folder / "final" / "config.json").read_text())
    recipe = Recipe.from_dict({"init": {"weights": str(folder)}, "data": {"vocab_size": 16, "num_kv_pairs": 2}})
    assert recipe.model_config().ssm_residual is False
    assert recipe.model_fields().ssm_residual is False


def test_model_none_takes_the_init_weights_config_whole(tmp_path: Path) -> None:
    """A shipped recipe restates its sizes in its model section; ``model=none`` drops that section, so a primed
    folder's config (here d 64, ABAB, window 16) is the run's model, and later ``model.KEY`` overrides apply."""
    folder = tmp_path / "primed"
    folder.mkdir()
    saved = BMojoConfig(vocab_size=256, hidden_size=64, num_hidden_layers=4, layer_pattern="ABAB",
                        num_attention_heads=4, window_size=16, memory_chunk=16, ssm_chunk_size=16)
    saved.save_pretrained(folder)
    restated = load_recipe("cpu-text", [f"init.weights={folder}"])
    assert restated.model_config().hidden_size == 128  # the recipe's own section wins over the folder's
    taken = load_recipe("cpu-text", [f"init.weights={folder}", "model=none"])
    assert taken.model == {}
    config = taken.model_config()
    assert (config.hidden_size, config.layer_pattern, config.window_size) == (64, "ABAB", 16)
    changed = load_recipe("cpu-text", [f"init.weights={folder}", "model=none", "model.window_size=32"])
    assert changed.model == {"window_size": 32} and changed.model_config().hidden_size == 64


@pytest.mark.parametrize("overrides", [
    ["model=none", "model.window_size=32"],
    ["model.window_size=32", "model=none"],
])
def test_a_section_drop_applies_before_its_keys_whichever_comes_first(overrides: list[str], tmp_path: Path) -> None:
    """``X=none`` empties the section before any ``X.KEY=VALUE`` is set, so the command line's order does not
    decide whether the key survives (applied in order, ``model.window_size=32 model=none`` would lose it)."""
    assert load_recipe("cpu-text", overrides).model == {"window_size": 32}
    paired = tmp_path / "paired.yaml"
    paired.write_text("compare: {name: ssm, overrides: {model.layer_pattern: MMMMMMMMMMMM}}\n", encoding="utf-8")
    compare = [o.replace("model.window_size=32", "compare.name=again").replace("model=", "compare=")
               for o in overrides]
    again = load_recipe(str(paired), [*compare, "compare.overrides={}"])
    assert (again.compare.name, again.compare.overrides) == ("again", {})


def _load_recall_grid():
    import importlib.util

    spec = importlib.util.spec_from_file_location("recall_grid", Path(__file__).parents[1] / "infra" / "recall_grid.py")
    grid = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grid)
    return grid


def test_the_recall_grid_matches_parameters_in_every_regime() -> None:
    """infra/recall_grid.py: each kind's SwiGLU width comes from the recipe's suite, and in every regime of the
    grid in docs/results.md (the windows, chunk and memory scale with the sequence; they hold no parameters,
    the vocabulary does) the baselines stay within 10% of B'MOJO's parameters."""
    grid = _load_recall_grid()
    assert grid.mlp_widths("cpu-tiny") == {"B": 0, "F": 0, "M": 150}
    assert grid.mlp_widths("mqar-suite") == {"B": 128, "F": 160, "M": 224, "S": 288, "A": 288}
    overrides = grid.regime_overrides(16, 128)
    assert {"model.window_size=8", "model.memory_chunk=8", "model.memory_picks=8", "model.memory_size=64",
            "data.num_kv_pairs=16", "data.seq_len=128"} <= set(overrides)
    assert "model.window_size=4" in grid.regime_overrides(4, 64)  # never below the default's 4
    for kv, seq in [(4, 64), (8, 64), (8, 128), (16, 128), (16, 256), (32, 512)]:
        counts = {}
        for kind, width in grid.mlp_widths("cpu-tiny").items():
            recipe = load_recipe("cpu-tiny", ["suite=none", f"model.layer_pattern={kind * 2}",
                                              f"model.intermediate_size={width}", "model.ssm_state_size=16",
                                              *grid.regime_overrides(kv, seq)])
            assert recipe.data.seq_len == seq and recipe.model_config().memory_size == seq // 2
            counts[kind] = count_parameters(recipe)
        assert all(abs(n / counts["B"] - 1) <= 0.1 for n in counts.values()), (kv, seq, counts)


def test_the_recall_grid_keeps_the_recipe_sizes_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    """infra/recall_grid.py --keep-recipe-sizes: a run trains the recipe's own windows, chunks, picks, memory and
    vocabulary (only the sequence and the pairs change), so the mqar-suite's B'MOJO at 8 pairs is the recipe's
    model field for field, and the same recipe as the suite's sizes given back as overrides (how docs/results.md
    ran the cell before); without the flag they scale with L. A cell the recipe's vocabulary cannot hold is one
    error line before any run starts."""
    import dataclasses

    grid = _load_recall_grid()
    args = grid.build_parser().parse_args(["--out", str(tmp_path), "--keep-recipe-sizes", "--kv", "8", "--seq", "64"])
    regime = grid.regime_overrides(8, 64, args.vocab, args.keep_recipe_sizes)
    run = grid.run_recipe("mqar-suite", "BB_kv8_L64_s1", 128, "BB", 1, 4000, 250, regime, [])
    suite = load_recipe("mqar-suite", ["suite=none", "data.num_kv_pairs=8"])
    sizes = ("window_size", "fading_window", "memory_chunk", "memory_picks", "memory_size", "ssm_chunk_size")
    assert [run.model[key] for key in sizes] == [8, 8, 8, 4, 32, 32] and run.model == suite.model
    assert run.data == dataclasses.replace(suite.data, seed=1) and run.data.vocab_size == 64
    assert (run.train.steps, run.eval.every, run.run.seed) == (4000, 250, 1)
    given_back = ["model.window_size=8", "model.fading_window=8", "model.memory_chunk=8", "model.memory_picks=4",
                  "model.memory_size=32", "model.ssm_chunk_size=32"]
    assert run == grid.run_recipe("mqar-suite", "BB_kv8_L64_s1", 128, "BB", 1, 4000, 250,
                                  grid.regime_overrides(8, 64, 64), given_back)
    assert "data.vocab_size=96" in grid.regime_overrides(8, 64, 96, keep_recipe_sizes=True)  # an explicit --vocab wins
    scaled = grid.run_recipe("mqar-suite", "BB_kv8_L64_s1", 128, "BB", 1, 4000, 250, grid.regime_overrides(8, 64), [])
    assert [scaled.model[key] for key in sizes] == [4, 4, 4, 4, 32, 64] and scaled.data.vocab_size == 128
    out = tmp_path / "out"
    monkeypatch.setattr("sys.argv", ["recall_grid.py", "--out", str(out), "--recipe", "mqar-suite", "--patterns", "BB",
                                     "--keep-recipe-sizes", "--kv", "32", "--seq", "128", "--seeds", "0"])
    with pytest.raises(SystemExit) as exit_info:
        grid.main()
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("recall_grid.py: error: BB_kv32_L128_s0:") and "vocab_size 64" in error, error
    assert not (out / "BB_kv32_L128_s0.log").exists()


def test_the_recall_grid_report_merges_runs_made_elsewhere_and_judges_the_rule(tmp_path: Path) -> None:
    """infra/recall_grid.py --report: runs recorded in an --include file join this folder's runs (a run of this
    folder replaces the same run recorded elsewhere), and each regime with BB, MM and FF is judged by means
    over seeds: BB >= MM - 0.05 and BB >= FF - 0.05."""
    import json

    grid = _load_recall_grid()

    def row(pattern: str, kv: int, seq: int, seed: int, recall: float) -> str:
        return json.dumps({"pattern": pattern, "variant": "", "kv": kv, "seq": seq, "seed": seed, "steps": 10,
                           "recall": recall})

    elsewhere = tmp_path / "elsewhere.jsonl"
    elsewhere.write_text("\n".join([row("BB", 4, 64, 0, 0.5), row("MM", 4, 64, 0, 0.6), row("FF", 4, 64, 0, 0.2),
                                      row("BB", 8, 128, 0, 0.1), row("MM", 8, 128, 0, 0.9)]) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.jsonl").write_text(row("BB", 4, 64, 0, 0.58) + "\n" + row("BB", 4, 64, 1, 0.5) + "\n")
    rows = grid.collect(out, [elsewhere])
    assert len(rows) == 6  # BB kv 4 seed 0 is this folder's run, not the one recorded elsewhere
    assert sorted(r["recall"] for r in rows if (r["pattern"], r["kv"]) == ("BB", 4)) == [0.5, 0.58]
    rule = grid.rule_table(rows).splitlines()
    assert len(rule) == 3  # header, separator, kv 4 / seq 64 only: kv 8 has no FF run
    # BB's mean 0.54 against MM's 0.6: -0.06, beyond the 0.05 margin
    assert rule[2] == "| 4 | 64 | 10 | 0.540 | 0.600 | 0.200 | -0.060 | +0.340 | FAILS |"
    assert "| holds |" in grid.rule_table(rows, margin=0.07)
    # a longer budget is a cell of its own, never averaged with the shorter one
    longer = [{**r, "steps": 20, "recall": 0.9} for r in rows if (r["kv"], r["seed"]) == (4, 0)]
    rule = grid.rule_table(rows + longer).splitlines()
    assert rule[2:] == ["| 4 | 64 | 10 | 0.540 | 0.600 | 0.200 | -0.060 | +0.340 | FAILS |",
                        "| 4 | 64 | 20 | 0.900 | 0.900 | 0.900 | +0.000 | +0.000 | holds |"]
    grid.plot(rows, tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_the_recall_grid_records_recall_at_longer_lengths(tmp_path: Path) -> None:
    """infra/recall_grid.py: a finished run's row carries ``length_recall`` (multiplier -> recall, from its
    length_eval.json, a skipped length left out) only when it evaluated beyond 1x, so rows without it stay as
    they were; the table adds a column of the means over seeds only when some row carries it, and the rows
    recorded in docs/data read back with the 2x / 4x numbers docs/results.md quotes."""
    import json

    grid = _load_recall_grid()

    def finished_run(name: str, recall: float, lengths: list[tuple[int, float | None]] | None) -> Path:
        run_dir = tmp_path / name
        (run_dir / "final").mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text(json.dumps({"type": "eval", "step": 10, "eval_accuracy": recall}) + "\n")
        if lengths is not None:
            records = [{"multiplier": m, "accuracy": a} for m, a in lengths]
            (run_dir / "length_eval.json").write_text(json.dumps(records))
        return run_dir

    finished_run("BB_kv4_L64_s0", 0.9, [(1, 0.9), (2, 0.5), (4, 0.25), (8, None)])
    finished_run("BB_kv4_L64_s1", 0.7, [(1, 0.7), (2, 0.3), (4, 0.15)])
    finished_run("MM_kv4_L64_s0", 0.4, [(1, 0.4)])  # the grid's own 1x-only eval
    finished_run("MM_kv4_L64_s1", 0.2, None)
    rows = [grid.train_one(tmp_path, "cpu-tiny", 0, pattern, "", [], 4, 64, seed, 10, 0, [])
            for pattern in ("BB", "MM") for seed in (0, 1)]
    assert [r.get("length_recall") for r in rows] == [{"2": 0.5, "4": 0.25}, {"2": 0.3, "4": 0.15}, None, None]
    assert all(set(r) == {"pattern", "variant", "kv", "seq", "seed", "steps", "recall"} for r in rows[2:])
    assert grid.table(rows[2:]).splitlines()[0] == "| kv pairs | seq | steps | model | recall (mean ± std) | seeds |"
    lines = grid.table(rows).splitlines()
    assert lines[2:] == ["| 4 | 64 | 10 | BB | 0.800 ± 0.141 | 2 | 2x 0.400 / 4x 0.200 |",
                         "| 4 | 64 | 10 | MM | 0.300 ± 0.141 | 2 | - |"]
    assert grid.length_cell([rows[0], rows[2]]) == "2x 0.500 (1 of 2 seeds) / 4x 0.250 (1 of 2 seeds)"
    data = Path(__file__).parents[1] / "docs" / "data"
    recorded = grid.collect(tmp_path / "none", [data / "recall-grid.jsonl", data / "recall-filler.jsonl"])
    longer = {(r["pattern"], r["variant"], r["kv"], r["seed"], r["steps"]): r["length_recall"]
              for r in recorded if "length_recall" in r}
    assert longer[("BB", "cpu-tiny", 8, 0, 600)] == {"2": 0.830, "4": 0.727}  # "The default run"
    assert longer[("MM", "", 4, 2, 2000)] == {"2": 0.208, "4": 0.105}  # the 4-pair suite cell
    assert all(set(v) == {"2", "4"} and all(0 <= x <= 1 for x in v.values()) for v in longer.values())
    assert "longer lengths (mean)" in grid.table(recorded)


def test_the_recall_grid_names_an_override_caught_by_a_list_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """infra/recall_grid.py: --kv, --seq, --seeds, --patterns and --include take every word up to the next option,
    so an override written after one lands in its list; the one error line says so, and `--` ends the list."""
    grid = _load_recall_grid()
    out = str(tmp_path / "out")
    for option, words in [("--seeds", ["0", "1"]), ("--kv", ["4"]), ("--patterns", ["BB"]), ("--include", [])]:
        monkeypatch.setattr("sys.argv", ["recall_grid.py", "--out", out, "--report", option, *words,
                                         "model.ssm_state_size=16"])
        with pytest.raises(SystemExit) as exit_info:
            grid.main()
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("recall_grid.py: error:") and option in error, error
        assert "'model.ssm_state_size=16'" in error or "model.ssm_state_size=16 is not" in error
        assert error.endswith("(a recipe override? put overrides before the options, or after --)"), error
    monkeypatch.setattr("sys.argv", ["recall_grid.py", "--out", out, "--report", "--seeds", "0", "--",
                                     "model.ssm_state_size=16"])
    grid.main()  # no runs to report, and no error
    assert (tmp_path / "out" / "grid.md").is_file()


def test_an_install_without_the_recipes_folder_says_where_the_recipes_are(tmp_path, monkeypatch, capsys):
    """A wheel or `pip install .` puts the package in site-packages without the checkout's recipes/: the default
    `bmojo-neuron train` then says how to get them, instead of listing no known recipes."""
    from bmojo_neuron import cli, recipes

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(recipes, "repository_root", lambda: tmp_path / "site-packages")
    assert cli.main(["train", "--dry-run"]) == 2
    assert capsys.readouterr().err == (
        f"error: recipe 'cpu-tiny' not found: not a file, and no cpu-tiny.yaml under {tmp_path / 'recipes'}, "
        f"{tmp_path / 'site-packages' / 'recipes'}, and no recipes/ folder there: the shipped recipes live in the "
        "repository's recipes/ folder, which an install from a wheel or `pip install .` leaves behind; install the "
        "checkout with `pip install -e .`, run from the checkout, or give a recipe's YAML path\n")


def test_a_shipped_recipe_path_resolves_from_any_folder(tmp_path, monkeypatch, capsys):
    """docs/priming.md writes `bmojo-neuron train recipes/priming/cpu-mqar-source.yaml`: it works outside the checkout."""
    from bmojo_neuron import cli
    from bmojo_neuron.recipes import repository_root

    monkeypatch.chdir(tmp_path)
    shipped = repository_root() / "recipes" / "priming" / "cpu-mqar-source.yaml"
    assert resolve_recipe_path("recipes/priming/cpu-mqar-source.yaml") == shipped
    assert resolve_recipe_path("recipes/priming/cpu-mqar-source") == shipped
    assert cli.main(["train", "recipes/priming/cpu-mqar-source.yaml", "--dry-run", "--output-dir",
                     str(tmp_path / "out")]) == 0
    assert "== " in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match=r"recipe 'recipes/nosuch.yaml' not found: not a file, and no nosuch"):
        resolve_recipe_path("recipes/nosuch.yaml")
    with pytest.raises(FileNotFoundError, match=r"^recipe '/nowhere/x.yaml' not found: no such file; known recipes: "):
        resolve_recipe_path("/nowhere/x.yaml")
    monkeypatch.chdir(repository_root())  # the checkout's recipes/ is both places looked in: named once
    with pytest.raises(FileNotFoundError) as missing:
        resolve_recipe_path("nosuch")
    assert str(missing.value).count(str(repository_root() / "recipes")) == 1
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes" / "priming").mkdir(parents=True)  # a file of that path here is used as it is
    (tmp_path / "recipes" / "priming" / "cpu-mqar-source.yaml").write_text("run: {name: mine}\n")
    assert resolve_recipe_path("recipes/priming/cpu-mqar-source.yaml").resolve() == (
        tmp_path / "recipes" / "priming" / "cpu-mqar-source.yaml")
