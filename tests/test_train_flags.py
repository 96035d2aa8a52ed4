"""The train command as users of diffusers' scripts and kohya reach for it: every flag explained with its
default, other tools' spellings answered with pristine's, and the flags of issue 18 working end to end."""

import argparse
import re

import pytest
import yaml

from pristine.cli import build_parser, main, train_config_from_args
from pristine.errors import UsageError


def _command(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[name]


def _flags(parser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def test_every_train_flag_has_help_that_states_its_default():
    missing = [a.option_strings[0] for a in _flags(_command("train")) if not a.help or "default" not in a.help]
    assert not missing, f"flags without help or without their default: {missing}"
    missing = [a.option_strings[0] for a in _flags(_command("sample")) if not a.help]
    assert not missing, f"sample flags without help: {missing}"


def test_the_defaults_train_help_states_are_the_ones_it_uses():
    """Help written by hand drifts: each stated default is checked against the settings the run uses."""
    from dataclasses import fields

    from pristine.methods import get_method
    from pristine.methods.lora import LoraConfig
    from pristine.train import DEFAULT_SAMPLE_EVERY, TrainConfig

    helps = {a.dest: a.help for a in _flags(_command("train"))}
    defaults = {f.name: getattr(TrainConfig(), f.name) for f in fields(TrainConfig)}
    checked = 0
    for dest, text in helps.items():
        m = re.search(r"\(default: (?:'([^']*)'|([\w.+-]+))", text)
        expected = defaults.get(dest)
        if not m or expected in (None, "", False, []):  # worded defaults: "the templates", "off", "the method's"
            continue
        value = m[1] if m[1] is not None else m[2]
        if isinstance(expected, (int, float)) and not isinstance(expected, bool):
            if not re.fullmatch(r"[\d.e+-]+", value):
                continue  # resolution 0 is stated as "the model's native size"
            assert float(value) == float(expected), (dest, value, expected)
        else:
            assert value == str(expected), (dest, value, expected)
        checked += 1
    assert checked >= 15, checked
    # the behaviours that were hidden: the checkpoint interval, the resolution rule, the token's own rate
    assert f"(default: {defaults['checkpoint_every']})" in helps["checkpoint_every"]
    assert "short side" in helps["resolution"]
    from pristine.methods.custom_diffusion import CustomDiffusionConfig
    from pristine.methods.dreambooth import DreamBoothConfig

    def rate(x):
        return f"{x:.0e}".replace("e-0", "e-")

    assert f"lora and dreambooth also train the new token's embedding at {rate(LoraConfig.token_lr)}" in helps["lr"]
    assert DreamBoothConfig.token_lr == LoraConfig.token_lr and f"custom_diffusion at {rate(CustomDiffusionConfig.token_lr)}" in helps["lr"]
    assert f"(default: {DEFAULT_SAMPLE_EVERY}" in helps["sample_every"]
    assert f"(default: {LoraConfig.rank}" in helps["rank"]
    for names, rate in re.findall(r"((?:[a-z_]+, )*[a-z_]+) (\d(?:\.\d+)?e-\d)", helps["lr"].split(").")[0]):
        for name in names.split(", "):
            assert get_method(name).default_lr == float(rate), name


@pytest.mark.parametrize("typed,meant", [
    ("--learning_rate", "--lr"), ("--max_train_steps", "--steps"), ("--instance_data_dir", "--images"),
    ("--output_dir", "--out"), ("--train_batch_size", "--batch-size"), ("--network_dim", "--rank"),
    ("--gradient_checkpointing", "--gradient-checkpointing"), ("--stepz", "--steps"), ("--validation_prompt=x", "--validation-prompt"),
])
def test_an_unknown_flag_names_the_flag_meant(capsys, typed, meant):
    code = main(["train", typed, "1", "--out", "runs/x"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"unknown flag {typed.split('=')[0]}" in lines[0] and f"{meant}" in lines[0].split("unknown flag")[1]
    assert "pristine train --help" in lines[0]


def test_a_flag_nothing_resembles_gets_no_guess(capsys):
    assert main(["train", "--zzzzqq", "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert "unknown flag --zzzzqq;" in err and "did you mean" not in err


def test_yaml_takes_the_new_keys_and_flags_override_them(tmp_path, star_images):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "out": str(tmp_path / "r"), "instance_prompt": "a photo of {token} {cls}", "epochs": 3, "weight_decay": 0.0,
        "max_grad_norm": 0.5, "checkpoint_every": 0, "keep_checkpoints": 1, "validation_prompt": "a <v1> star",
        "validation_every": 5, "report_to": "none", "method_args": {"train_text_encoder": True},
        "concepts": [{"images": str(star_images), "token": "<v1>", "class_word": "star"}]}))
    c = train_config_from_args(build_parser().parse_args(["train", "--config", str(config)]))
    assert (c.instance_prompt, c.epochs, c.weight_decay, c.max_grad_norm, c.checkpoint_every, c.keep_checkpoints,
            c.sample_prompts, c.sample_every, c.report_to, c.method_args) == \
        ("a photo of {token} {cls}", 3, 0.0, 0.5, 0, 1, ["a <v1> star"], 5, "none", {"train_text_encoder": True})
    assert c.instance_prompts() == ["a photo of <v1> star"]
    c = train_config_from_args(build_parser().parse_args(["train", "--config", str(config), "--steps", "7",
                                                          "--validation-prompt", "b <v1>", "--validation-every", "0"]))
    assert (c.steps, c.epochs, c.sample_prompts, c.sample_every) == (7, 0, ["b <v1>"], 0)
    # a run's config.yaml holds both epochs and the steps they made: read back, they must agree
    both = yaml.safe_load(config.read_text()) | {"steps": 6}
    config.write_text(yaml.safe_dump(both))
    c = train_config_from_args(build_parser().parse_args(["train", "--config", str(config)]))
    c.resolve_steps(n_images=5)  # 3 epochs of 5 images at 4 per step: 6 steps
    assert c.steps == 6
    c.epochs = 2
    with pytest.raises(UsageError, match="disagree"):
        c.resolve_steps(n_images=5)


def test_report_to_tensorboard_needs_tensorboard(monkeypatch, star_images, tmp_path):
    import importlib.util

    from pristine.train import TrainConfig

    values = {"out": str(tmp_path / "r"), "concepts": [{"images": str(star_images), "token": "<v1>", "class_word": "star"}]}
    assert TrainConfig.from_dict(values).report_to == "tensorboard"  # installed here: the default logs to it
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if "tensorboard" in name else find(name, *a))
    assert TrainConfig.from_dict(values).report_to == "none"
    with pytest.raises(UsageError, match="pip install tensorboard"):
        TrainConfig.from_dict({**values, "report_to": "tensorboard"})


def test_instance_prompt_captions_every_image_without_its_own(star_images, tmp_path):
    import shutil

    from pristine.data import ConceptImages, ConceptSpec

    folder = tmp_path / "imgs"
    shutil.copytree(star_images, folder)
    (folder / "0.txt").write_text("a <v1> star on grass")
    loaded = ConceptImages.load(ConceptSpec(str(folder), "<v1>", "star"), instance_prompt="a photo of <v1> star")
    assert loaded.captions == ["a <v1> star on grass"] + ["a photo of <v1> star"] * 4
    templates = ConceptImages.load(ConceptSpec(str(folder), "<v1>", "star")).captions
    assert len(set(templates[1:])) > 1  # without it, the templates vary


def test_new_train_flags_work_end_to_end_on_mini(tiny, star_images, tmp_path, capsys):
    """Epochs set the steps, checkpoints keep the newest one, validation grids at the interval and the end,
    no TensorBoard logs with --report-to none, a text-encoder LoRA in the LoRA file."""
    from safetensors import safe_open

    run = tmp_path / "run"
    code = main(["train", "--model", "mini", "--images", str(star_images), "--token", "<v1>", "--class-word", "star",
                 "--instance-prompt", "{token} {cls}, a photo", "--epochs", "1", "--batch-size", "2",
                 "--checkpoint-every", "1", "--keep-checkpoints", "1", "--validation-prompt", "a <v1> star",
                 "--validation-every", "2", "--report-to", "none", "--weight-decay", "0", "--max-grad-norm", "0.5",
                 "--train-text-encoder", "--lr", "1e-3", "--out", str(run)])
    assert code == 0, capsys.readouterr().err
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["steps"], saved["epochs"], saved["weight_decay"], saved["max_grad_norm"], saved["report_to"]) == \
        (3, 1, 0.0, 0.5, "none")  # 5 images, 2 per step: 3 steps make one pass
    assert len((run / "log.jsonl").read_text().splitlines()) == 3
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000003.safetensors"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000002.png", "step_0000003.png"]
    assert not (run / "logs").exists()
    with safe_open(str(run / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert any(k.startswith("text_encoder.text_model.encoder.layers.") for k in f.keys())

    quiet = tmp_path / "quiet"  # no checkpoints at all; a validation prompt alone draws at the end
    code = main(["train", "--model", str(tiny), "--images", str(star_images), "--token", "<v1>", "--class-word", "star",
                 "--steps", "2", "--checkpoint-every", "0", "--sample-prompt", "a <v1> star", "--out", str(quiet)])
    assert code == 0, capsys.readouterr().err
    assert not list(quiet.glob("checkpoints/*")) and (quiet / "DONE").is_file()
    assert [p.name for p in (quiet / "samples").iterdir()] == ["step_0000002.png"]
    assert yaml.safe_load((quiet / "config.yaml").read_text())["sample_every"] == 100
