"""Config validation: every problem reported at once, naming the field; presets load; overrides apply."""

import pytest

from flows.config import PRESETS, ConfigProblems, ForgeConfig, load_config
from flows.cli import main


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "smollm2"])
def test_presets_load(preset):
    cfg = load_config(preset=preset)
    assert cfg.phases == ["cognate", "evomerge", "bitnet", "training"]
    assert len(cfg.cognate.variants) == 3


def test_smollm2_preset_fine_tunes_siblings_of_the_imported_model_and_merges_them():
    cfg = load_config(preset="smollm2")
    assert cfg.phases == ["cognate", "evomerge", "compression"]  # bitnet is left out (README: what it would cost)
    assert cfg.cognate.source == "pretrained" and cfg.cognate.common_base == cfg.data.tokenizer.path
    assert [s.name for s in cfg.cognate.siblings] == ["math", "dialog", "story"]
    assert len({tuple(sorted(s.train.data_mix.items())) for s in cfg.cognate.siblings}) == 3  # different mixes
    assert cfg.evomerge.base_model == "base"
    assert cfg.compression.target_bytes == 75_000_000


def test_overrides_apply_and_parse_types():
    cfg = load_config("tiny", overrides=["cognate.trunk.steps=70", "eval.max_examples=12", "device.precision=fp32"])
    assert cfg.cognate.trunk.steps == 70 and cfg.eval.max_examples == 12 and cfg.device.precision == "fp32"


def test_eval_split_refuses_test_and_only_the_final_evaluation_scores_every_test_example():
    with pytest.raises(ConfigProblems, match="eval.split 'test' is refused"):
        load_config("tiny", overrides=["eval.split=test"])
    cfg = load_config("tiny")
    assert cfg.eval.split == "validation"
    assert cfg.eval.for_split("validation") is cfg.eval
    assert cfg.eval.for_split("test").max_examples == (cfg.eval.final_max_examples or 100_000)


def test_config_file_merges_over_preset(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("cognate:\n  trunk:\n    steps: 110\n")
    cfg = load_config("tiny", config_file=f)
    assert cfg.cognate.trunk.steps == 110
    assert cfg.cognate.arch.hidden_size == load_config("tiny").cognate.arch.hidden_size


def test_every_problem_reported_at_once():
    with pytest.raises(ConfigProblems) as info:
        load_config(
            "tiny",
            overrides=[
                "cognate.trunk.stepz=3",          # unknown key
                "eval.max_examples=lots",         # wrong type
                "data.validation_percent=0",      # out of range
                "cognate.arch.num_heads=3",       # contradiction with hidden_size 128
            ],
        )
    text = str(info.value)
    assert "cognate.trunk.stepz: unknown key" in text
    assert "eval.max_examples" in text and "'lots'" in text
    assert "data.validation_percent" in text
    assert "not divisible by num_heads" in text
    assert len(info.value.problems) == 4


def test_contradictions_across_sections():
    with pytest.raises(ConfigProblems, match="needs data.tokenizer.kind 'pretrained'"):
        load_config("tiny", overrides=["cognate.source=pretrained", "cognate.base_models=[/x]", "cognate.variants=[]"])
    from tasks.phases import PhaseSpec, registered

    declared = PhaseSpec(name="declared", order=99, title="declared only", verb="x", input_kind="model",
                         output_kind="model")  # every real phase is implemented now: a declared-only one
    with registered(declared), pytest.raises(ConfigProblems, match="not implemented in this version"):
        load_config("tiny", overrides=["phases=[cognate, evomerge, declared]"])
    with pytest.raises(ConfigProblems, match="warmup_steps"):
        load_config("tiny", overrides=["cognate.trunk.steps=10", "cognate.trunk.warmup_steps=10"])
    with pytest.raises(ConfigProblems, match="unique"):
        load_config("tiny", overrides=["cognate.variants=[{name: a, train: {steps: 60}}, {name: a, train: {steps: 60}}]"])


def test_frozen():
    cfg = ForgeConfig()
    with pytest.raises(Exception):
        cfg.seed = 3  # type: ignore[misc]


def test_every_field_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)
    walk(ForgeConfig)


def test_cli_exits_2_listing_fields(capsys):
    code = main(["run", "--preset", "tiny", "--set", "cognate.trunk.steps=-1", "--set", "bogus=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "cognate.trunk.steps" in err and "bogus: unknown key" in err


def test_cli_config_prints_resolved(capsys):
    assert main(["config", "--preset", "tiny", "--set", "seed=5"]) == 0
    assert "seed: 5" in capsys.readouterr().out


def test_flow_parameter_is_the_config_form():
    from prefect.utilities.callables import parameter_schema

    from flows.agent_forge import agent_forge

    schema = parameter_schema(agent_forge.fn).model_dump()
    assert list(schema["properties"]) == ["config"]
    cognate = schema["definitions"]["CognateConfig"]["properties"]
    assert "Quality gate" in cognate["min_unigram_gain"]["description"]
    assert schema["definitions"]["ForgeConfig"]["additionalProperties"] is False


def test_evomerge_config_checks_against_what_cognate_makes():
    with pytest.raises(ConfigProblems, match="must not optimise on the test split"):
        load_config("tiny", overrides=["evomerge.fitness.split=test"])
    with pytest.raises(ConfigProblems, match="evomerge.base_model: cognate produces"):
        load_config("tiny", overrides=["evomerge.base_model=base"])
    with pytest.raises(ConfigProblems, match="at least two models"):
        load_config("tiny", overrides=["evomerge.models=[math]"])
    with pytest.raises(ConfigProblems, match=r"evomerge.models: \['poetry'\]"):
        load_config("tiny", overrides=["evomerge.models=[math, poetry]"])
    with pytest.raises(ConfigProblems, match="cognate must run right before it"):
        load_config("tiny", overrides=["phases=[evomerge, bitnet]", "input=/x"])
    with pytest.raises(ConfigProblems, match="evomerge produces one model"):
        load_config("tiny", overrides=["bitnet.input_model=trunk"])
    with pytest.raises(ConfigProblems, match="name the one to ternarise"):
        load_config("tiny", overrides=["phases=[cognate, bitnet]"])
    cfg = load_config("tiny", overrides=["phases=[cognate, bitnet]", "bitnet.input_model=story"])
    assert cfg.bitnet.input_model == "story"


def test_the_phase_table_gives_the_order_the_config_sections_and_the_cli_states(capsys):
    from tasks.phases import implemented, ordered

    assert [s.name for s in ordered()] == ["cognate", "evomerge", "quietstar", "bitnet", "training", "baking",
                                           "experts", "compression"]
    assert implemented() == ["cognate", "evomerge", "quietstar", "bitnet", "training", "baking", "experts",
                             "compression"]
    sections = [s.section for s in ordered() if s.section]
    assert [f for f in ForgeConfig.model_fields if f in sections] == sections  # one field per section, in order
    for s in ordered():
        if s.section:
            assert ForgeConfig.model_fields[s.section].annotation is s.config
    assert main(["phase", "experts", "--input", "/nonexistent"]) == 2
    assert "not a Hugging Face model folder" in capsys.readouterr().err
    from tasks.phases import PhaseSpec, registered

    declared = PhaseSpec(name="declared", order=99, title="declared only", verb="x", input_kind="model",
                         output_kind="model")
    with registered(declared), pytest.raises(SystemExit):
        main(["phase", "--help"])
    out = capsys.readouterr().out
    assert "3. quietstar" in out and "7. experts" in out and "4. bitnet" in out
    assert "99. declared" in out and "not implemented yet" in out
    with pytest.raises(ConfigProblems, match="must be in pipeline order"):
        load_config("tiny", overrides=["phases=[bitnet, evomerge]", "input=/x"])


def test_the_docs_read_the_phase_table():
    from pathlib import Path

    from tasks.phases import docs_index, ordered

    root = Path(__file__).resolve().parents[2]
    assert (root / "docs" / "phases" / "README.md").read_text() == docs_index(), \
        "docs/phases/README.md drifted from tasks/phases.py: run write_docs_index()"
    for s in ordered():
        assert (root / "docs" / "phases" / f"{s.name}.md").is_file() == s.implemented, s.name


def test_this_wave_s_new_settings_are_checked_before_any_compute():
    """A negative trunk learning-rate scale and a non-positive ECSQ step are refused when the config loads."""
    from forge_models.runtime import ConfigError

    with pytest.raises(ConfigProblems, match="quietstar.trunk_lr_scale"):
        load_config("tiny", overrides=["quietstar.trunk_lr_scale=-0.1"])
    # candidate specs are checked by their encoder as the compression section loads (a ConfigError, as before)
    with pytest.raises(ConfigError, match="invalid parameters for encoding 'ecsq'"):
        load_config("tiny", overrides=["compression.candidates=[{name: ecsq, step: 0}]"])
