"""Bad parameters are refused before any work, naming the parameter and its allowed range."""

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from flows.cli import EXIT_BAD_PARAMETERS, main
from flows.night.params import PipelineParameters, describe_errors

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("n_per_class", 893, "1–892"),
        ("n_per_class", 0, "1–892"),
        ("epochs", 0, "1–500"),
        ("epochs", -3, "1–500"),
        ("batch_size", 0, "1–8192"),
        ("train_limit", 50, "100–60000"),
        ("model", "resnet", "seed"),
        ("precision", "fp8", "mixed_bfloat16"),
        ("backend", "mxnet", "jax"),
    ],
)
def test_out_of_range_values_name_the_field_and_range(field, value, allowed):
    with pytest.raises(ValidationError) as info:
        PipelineParameters(**{field: value})
    message = describe_errors(info.value)
    assert f"{field}={value!r}" in message and allowed in message


def test_unknown_parameters_are_refused():
    with pytest.raises(ValidationError, match="extra"):
        PipelineParameters(epoch=3)


def test_defaults_are_the_documented_ones():
    p = PipelineParameters()
    assert (p.epochs, p.batch_size, p.n_per_class, p.seed, p.train_limit, p.model.value) == (None, 128, 800, 0, None, "seed")
    assert (p.backend, p.train_config(0).epochs) == (None, 15)  # empty: the worker's backend, the model's epochs
    assert (p.retention.prune, p.retention.keep_reports) == (True, 30)  # a night prunes the store: docs/store.md


def test_a_bad_retention_value_is_refused_naming_the_field_and_range():
    with pytest.raises(ValidationError) as info:
        PipelineParameters(retention={"keep_reports": -1, "keep_models": 3})
    message = describe_errors(info.value)
    assert "retention.keep_reports=-1" in message and "0–100000" in message and "retention.keep_models" in message


def test_the_ui_form_has_titles_descriptions_and_bounds():
    schema = PipelineParameters.model_json_schema()
    props = schema["properties"]
    assert props["epochs"]["title"] == "Epochs" and props["epochs"]["anyOf"][0]["minimum"] == 1
    assert props["n_per_class"]["maximum"] == 892 and "without replacement" in props["n_per_class"]["description"]
    assert schema["$defs"]["ModelName"]["enum"] == ["seed", "strong"]


def test_cli_refuses_before_importing_the_pipeline(capsys):
    assert main(["run", "--n-per-class", "900", "--epochs", "0"]) == EXIT_BAD_PARAMETERS
    err = capsys.readouterr().err
    assert "n_per_class=900" in err and "epochs=0" in err and "1–892" in err
    probe = (  # in a fresh interpreter: what the refusal imported
        "import sys\nfrom flows.cli import main\ncode = main(['run', '--n-per-class', '900'])\n"
        "print(code, 'flows.night.pipeline' in sys.modules, 'prefect' in sys.modules, 'tensorflow' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == [str(EXIT_BAD_PARAMETERS), "False", "False", "False"], done.stderr[-2000:]


def test_empty_epochs_mean_the_models_own_default_and_the_form_shows_it():
    from tasks.training.model import DEFAULT_EPOCHS, ModelName
    from tasks.training.train import TrainConfig

    assert PipelineParameters().train_config(0).epochs == DEFAULT_EPOCHS[ModelName.seed] == 15
    assert PipelineParameters(model="strong").train_config(0).epochs == DEFAULT_EPOCHS[ModelName.strong]
    assert PipelineParameters(model="strong", epochs=3).train_config(0).epochs == 3
    assert TrainConfig(model="strong") == TrainConfig(model="strong", epochs=DEFAULT_EPOCHS[ModelName.strong])  # one key
    field = PipelineParameters.model_json_schema()["properties"]["epochs"]
    assert field["default"] is None and {"type": "null"} in field["anyOf"]
    assert "Empty: the model's own default, seed 15, strong" in field["description"]


@pytest.mark.parametrize(
    "values, field, said",
    [
        ({"held_back": -1}, "held_back", "simulate-arrivals"),
        ({"held_back": 30_000}, "held_back", "simulate-arrivals"),
        ({"ingest": {"max_leaked_share": 1.5}}, "ingest.max_leaked_share", "Exact copies of MNIST test images"),
        ({"ingest": {"confident_probability": 0.3}}, "ingest.confident_probability", "top probability"),
        ({"ingest": {"holdout_share": 1.0}}, "ingest.holdout_share", "never trained on"),
        ({"gate": {"min_new_data_images": 0}}, "gate.min_new_data_images", "holds this many images"),
    ],
)
def test_the_new_data_fields_refuse_bad_values_naming_the_field_and_what_it_means(values, field, said):
    with pytest.raises(ValidationError) as info:
        PipelineParameters(**values)
    message = describe_errors(info.value)
    assert message.startswith(f"Invalid parameters:\n  {field}=") and said in message, message


def test_the_incoming_location_is_no_parameter_so_an_api_caller_cannot_point_a_worker_at_files():
    for name in ("incoming", "mnist_incoming"):
        with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
            PipelineParameters(**{name: "/etc"})
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        PipelineParameters(ingest={"incoming": "s3://elsewhere"})


def test_the_command_line_turns_the_nights_prune_off_and_sets_the_reports_kept():
    from flows.cli import build_parser, parameters_from

    parser = build_parser()
    assert parameters_from(parser.parse_args(["run"])).retention.prune is True  # on unless turned off
    off = parameters_from(parser.parse_args(["run", "--no-prune", "--keep-reports", "5"])).retention
    assert (off.prune, off.keep_reports) == (False, 5)
