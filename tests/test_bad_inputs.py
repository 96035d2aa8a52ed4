"""Bad input as a hostile but realistic user gives it: each case ends with exit status 2 and exactly one
line on stderr naming the file or field, no traceback, nothing new half-written, and a run folder that
was there before byte-identical afterwards."""

import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pristine.mini as mini
from pristine.cli import main


@pytest.fixture(scope="module")
def world(tiny, star_images, tmp_path_factory):
    """A finished run, damaged copies of the model and of the run, and bad image folders."""
    root = tmp_path_factory.mktemp("bad")
    run = root / "run"
    code = main(["train", "--model", str(tiny), "--images", str(star_images), "--token", "<v1>", "--class-word", "star",
                 "--out", str(run), "--steps", "2", "--checkpoint-every", "1", "--lr", "1e-2"])
    assert code == 0

    def model_copy(name, damage):
        folder = root / name
        shutil.copytree(tiny, folder)
        damage(folder / "unet" / "diffusion_pytorch_model.safetensors")
        return folder

    def truncate(p):
        p.write_bytes(p.read_bytes()[:-1000])

    def corrupt_header(p):
        data = bytearray(p.read_bytes())
        data[8:40] = b"\xff" * 32
        p.write_bytes(bytes(data))

    def to_pickle(p):
        p.unlink()
        import torch

        torch.save({"w": torch.zeros(1)}, p.with_name("diffusion_pytorch_model.bin"))

    folders = {"truncated_model": model_copy("truncated_model", truncate),
               "corrupt_model": model_copy("corrupt_model", corrupt_header),
               "pickle_model": model_copy("pickle_model", to_pickle)}
    for name, damaged, damage in (("bad_lora_run", "pytorch_lora_weights.safetensors", truncate),
                                  ("bad_embeds_run", "learned_embeds.safetensors", corrupt_header)):
        shutil.copytree(run, root / name)
        damage(root / name / damaged)
        folders[name] = root / name

    def image_folder(name, files: dict):
        folder = root / name
        folder.mkdir()
        for k in range(3):
            shutil.copy(star_images / f"{k}.png", folder / f"{k}.png")
        for fname, content in files.items():
            if isinstance(content, Image.Image):
                content.save(folder / fname)
            else:
                (folder / fname).write_bytes(content)
        folders[name] = folder

    image_folder("bomb", {"bomb.png": _png_declaring(30000, 30000)})
    image_folder("latin1_caption", {"0.txt": "a photo of <v1> star, café".encode("latin-1")})
    image_folder("random_caption", {"1.txt": bytes([0xff, 0xfe, 0x80, 0x81, 0xc3, 0x28]) * 10})
    image_folder("latin1_metadata", {"metadata.jsonl": '{"file_name": "0.png", "text": "<v1> star, crème"}\n'.encode("latin-1")})
    image_folder("metadata_missing_file", {"metadata.jsonl": b'{"file_name": "0.png", "text": "<v1> star"}\n'
                                                             b'{"file_name": "gone.png", "text": "<v1> star"}\n'})
    image_folder("metadata_not_json", {"metadata.jsonl": b'{"file_name": "0.png", "text": \n'})
    image_folder("tiny_image", {"dot.png": Image.new("RGB", (1, 1), "red")})
    image_folder("broken", {"broken.png": b"not a png at all"})
    image_folder("no_token_caption", {"2.txt": b"a photo of a star"})
    (root / "empty").mkdir()
    (root / "empty.png").mkdir()  # a folder named like the grid
    (root / "a_file").write_text("keep me")
    (root / "latin1.yaml").write_bytes("out: r\nclass_prompt: 'une étoile'\n".encode("latin-1"))
    (root / "lr0.yaml").write_text(f"model: {tiny}\nout: {root / 'new'}\nlr: 0\nconcepts:\n"
                                   f"  - {{images: {star_images}, token: '<v1>', class_word: star}}\n")
    (root / "blank_prompts.txt").write_text("\n   \n")
    (root / "token_prompts.txt").write_text("a red circle\na <v1> star on grass\n")
    (root / "latin1_prompts.txt").write_bytes("une étoile rouge\n".encode("latin-1"))
    (root / "preserve_nan.yaml").write_text(f"model: {tiny}\nout: {root / 'new'}\npreserve: class\npreserve_weight: .nan\n"
                                            f"concepts:\n  - {{images: {star_images}, token: '<v1>', class_word: star}}\n")
    (root / "clif_two.yaml").write_text(f"model: {tiny}\nmethod: clif\nconcepts:\n"
                                        f"  - {{images: {star_images}, token: '<v1>', class_word: star}}\n"
                                        f"  - {{images: {star_images}, token: '<v2>', class_word: heart}}\n")
    (root / "broken.yaml").write_text("steps: [1,\n")
    (root / "unknown.yaml").write_text("stepz: 3\n")
    (root / "sample_unknown.yaml").write_text("gudies: []\n")
    (root / "sample_weight.yaml").write_text("guides:\n  - {prompt: a star, w: strong}\n")
    (root / "state.pt").write_bytes(b"\x80\x04K\x01.")
    (root / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    (root / "just_weights").mkdir()
    shutil.copy(run / "pytorch_lora_weights.safetensors", root / "just_weights")
    (root / "no_outputs").mkdir()
    (root / "no_outputs" / "notes.txt").write_text("not a run\n")
    folders.update(root=root, run=run, tiny=tiny, star=star_images, empty=root / "empty",
                   just_weights=root / "just_weights", no_outputs=root / "no_outputs")
    return folders


def _png_declaring(width: int, height: int) -> bytes:
    """A small PNG file whose header declares width x height pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def _train(w, images="star", *extra):
    return ["train", "--model", str(w["tiny"]), "--images", str(w[images]), "--token", "<v1>", "--class-word", "star",
            "--steps", "1", *extra]


def _clif(w, *extra):  # two concepts from a YAML file, the tiny model (which has no clip/ folder)
    return ["train", "--config", str(w["root"] / "clif_two.yaml"), "--steps", "1", *extra]


def _resume(w, *extra):  # the existing run's own settings, then a change
    return ["train", "--model", str(w["tiny"]), "--images", str(w["star"]), "--token", "<v1>", "--class-word", "star",
            "--out", str(w["run"]), "--steps", "2", "--checkpoint-every", "1", "--lr", "1e-2", "--resume", "latest", *extra]


NEW = "{new}"  # replaced by a fresh path that must not exist afterwards

CASES = {  # name: (argv from the fixture, words the one line must hold)
    # images and captions
    "images_missing": (lambda w: _train(w, "root", "--images", str(w["root"] / "nope"), "--out", NEW), ["nope"]),
    "images_empty": (lambda w: _train(w, "empty", "--out", NEW), ["empty", "no images"]),
    "images_is_a_file": (lambda w: _train(w, "root", "--images", str(w["root"] / "a_file"), "--out", NEW), ["a_file"]),
    "image_unreadable": (lambda w: _train(w, "broken", "--out", NEW), ["broken.png"]),
    "image_decompression_bomb": (lambda w: _train(w, "bomb", "--out", NEW), ["bomb.png", "pixels"]),
    "image_1x1": (lambda w: _train(w, "tiny_image", "--out", NEW), ["dot.png", "1x1"]),
    "caption_latin1": (lambda w: _train(w, "latin1_caption", "--out", NEW), ["0.txt", "UTF-8"]),
    "caption_random_bytes": (lambda w: _train(w, "random_caption", "--out", NEW), ["1.txt", "UTF-8"]),
    "caption_without_token": (lambda w: _train(w, "no_token_caption", "--out", NEW), ["2.png", "<v1>"]),
    "metadata_latin1": (lambda w: _train(w, "latin1_metadata", "--out", NEW), ["metadata.jsonl", "UTF-8"]),
    "metadata_missing_file": (lambda w: _train(w, "metadata_missing_file", "--out", NEW), ["metadata.jsonl:2", "gone.png"]),
    "metadata_not_json": (lambda w: _train(w, "metadata_not_json", "--out", NEW), ["metadata.jsonl:1"]),
    # settings
    "yaml_latin1": (lambda w: ["train", "--config", str(w["root"] / "latin1.yaml")], ["latin1.yaml", "UTF-8"]),
    "yaml_broken": (lambda w: ["train", "--config", str(w["root"] / "broken.yaml")], ["broken.yaml", "YAML"]),
    "yaml_unknown_key": (lambda w: ["train", "--config", str(w["root"] / "unknown.yaml")], ["stepz"]),
    "yaml_lr_zero": (lambda w: ["train", "--config", str(w["root"] / "lr0.yaml")], ["lr", "positive"]),
    "config_missing": (lambda w: ["train", "--config", str(w["root"] / "none.yaml")], ["none.yaml"]),
    "rank_negative": (lambda w: _train(w, "star", "--method-arg", "rank=-3", "--out", NEW), ["rank", "-3"]),
    "rank_flag_negative": (lambda w: _train(w, "star", "--rank", "-3", "--out", NEW), ["--rank", "-3"]),
    "lr_nan": (lambda w: _train(w, "star", "--lr", "nan", "--out", NEW), ["lr", "nan"]),
    "lr_negative": (lambda w: _train(w, "star", "--lr", "-0.001", "--out", NEW), ["lr", "-0.001"]),
    "prior_weight_inf": (lambda w: _train(w, "star", "--prior-weight", "inf", "--out", NEW), ["prior_weight"]),
    "steps_zero": (lambda w: _train(w, "star", "--steps", "0", "--out", NEW), ["--steps"]),
    "unknown_method": (lambda w: _train(w, "star", "--method", "magic", "--out", NEW), ["magic"]),
    "unknown_method_arg": (lambda w: _train(w, "star", "--method-arg", "rnak=4", "--out", NEW), ["rnak"]),
    "mixed_precision_fp8": (lambda w: _train(w, "star", "--mixed-precision", "fp8", "--out", NEW), ["mixed_precision"]),
    "export_onnx": (lambda w: _train(w, "star", "--export", "onnx", "--out", NEW), ["onnx"]),
    # output preservation and PureCC's base branch
    "preserve_missing_file": (lambda w: _train(w, "star", "--preserve", str(w["root"] / "nope.txt"), "--out", NEW),
                              ["preserve", "nope.txt", "class, unrelated"]),
    "preserve_folder": (lambda w: _train(w, "star", "--preserve", str(w["root"]), "--out", NEW), ["preserve", "folder"]),
    "preserve_empty_file": (lambda w: _train(w, "star", "--preserve", str(w["root"] / "blank_prompts.txt"), "--out", NEW),
                            ["preserve", "blank_prompts.txt", "no prompts"]),
    "preserve_file_names_token": (lambda w: _train(w, "star", "--preserve", str(w["root"] / "token_prompts.txt"),
                                                   "--out", NEW), ["preserve", "token_prompts.txt:2", "<v1>"]),
    "preserve_file_latin1": (lambda w: _train(w, "star", "--preserve", str(w["root"] / "latin1_prompts.txt"), "--out", NEW),
                             ["latin1_prompts.txt", "UTF-8"]),
    "preserve_weight_negative": (lambda w: _train(w, "star", "--preserve", "class", "--preserve-weight", "-0.5",
                                                  "--out", NEW), ["preserve_weight", "-0.5"]),
    "preserve_weight_zero": (lambda w: _train(w, "star", "--preserve", "class", "--preserve-weight", "0", "--out", NEW),
                             ["preserve_weight", "positive"]),
    "preserve_weight_nan_yaml": (lambda w: ["train", "--config", str(w["root"] / "preserve_nan.yaml")],
                                 ["preserve_weight"]),
    "preserve_textual_inversion": (lambda w: _train(w, "star", "--method", "textual_inversion", "--preserve", "class",
                                                    "--out", NEW), ["preserve", "textual_inversion", "drop --preserve"]),
    "preserve_dreambooth": (lambda w: _train(w, "star", "--method", "dreambooth", "--preserve", "unrelated", "--out", NEW),
                            ["preserve", "dreambooth", "--method lora"]),
    "purecc_base_branch_unknown": (lambda w: _train(w, "star", "--method", "purecc", "--method-arg", "base_branch=frozen",
                                                    "--out", NEW), ["base_branch", "frozen"]),
    "purecc_base_preserve_on_learner": (lambda w: _train(w, "star", "--method", "purecc", "--method-arg",
                                                         "base_branch=learner", "--method-arg",
                                                         "base_preserve_weight=0.5", "--out", NEW),
                                        ["base_preserve_weight", "base_branch=original"]),
    "purecc_base_preserve_negative": (lambda w: _train(w, "star", "--method", "purecc", "--method-arg", "base_branch=original",
                                                       "--method-arg", "base_preserve_weight=-1", "--out", NEW),
                                      ["base_preserve_weight", "-1"]),
    # CLIF
    "clif_one_concept": (lambda w: _train(w, "star", "--method", "clif", "--out", NEW), ["concepts", "two or more"]),
    "clif_no_clip_folder": (lambda w: _clif(w, "--out", NEW), ["clip", "clip/", "--clip"]),
    "clif_clip_not_clip": (lambda w: _clif(w, "--out", NEW, "--clip", str(w["tiny"] / "text_encoder")),
                           ["clip", "not CLIP"]),
    "clif_stage_unknown": (lambda w: _clif(w, "--out", NEW, "--method-arg", "stage=4"), ["stage", "'4'"]),
    "clif_stage2_alone": (lambda w: _clif(w, "--out", NEW, "--stage", "2"), ["previous_run", "--previous-run"]),
    "clif_previous_not_clif": (lambda w: _clif(w, "--out", NEW, "--stage", "2", "--previous-run", str(w["run"])),
                               ["previous_run", "not a CLIF stage-1 run"]),
    "clif_pairs_batch_one": (lambda w: _clif(w, "--out", NEW, "--method-arg", "pairs_batch=1"), ["pairs_batch", "2 pairs"]),
    "dump_pairs_not_clif": (lambda w: _train(w, "star", "--dump-pairs", NEW), ["--dump-pairs", "--method clif"]),
    "token_in_vocabulary": (lambda w: ["train", "--model", str(w["tiny"]), "--images", str(w["star"]), "--token", "star",
                                       "--class-word", "star", "--steps", "1", "--out", NEW], ["vocabulary"]),
    # SPF
    "spf_train_unknown": (lambda w: _train(w, "star", "--method", "spf", "--method-arg", "train=half", "--out", NEW),
                          ["method_args.train", "half"]),
    "spf_stage2_without_stage1": (lambda w: _train(w, "star", "--method", "spf", "--stage", "2", "--out", NEW),
                                  ["stage1_run"]),
    "spf_init_run_missing": (lambda w: _train(w, "star", "--method", "spf", "--init-run", str(w["root"] / "nope"),
                                              "--out", NEW), ["init_run", "nope"]),
    "spf_init_run_with_tokens": (lambda w: _train(w, "star", "--method", "spf", "--init-run", str(w["run"]), "--out", NEW),
                                 ["init_run", "tokens"]),
    "spf_clip_not_a_model": (lambda w: _train(w, "star", "--method", "spf", "--clip", str(w["empty"]), "--out", NEW),
                             ["method_args.clip", "empty"]),
    "spf_weight_negative": (lambda w: _train(w, "star", "--method", "spf", "--method-arg", "text_weight=-1", "--out", NEW),
                            ["text_weight", "-1"]),
    "spf_all_weights_zero": (lambda w: _train(w, "star", "--method", "spf", *[a for t in ("denoise", "text", "query", "enhance")
                                                                            for a in ("--method-arg", f"{t}_weight=0")],
                                              "--out", NEW), ["weight", "above zero"]),
    # model folders
    "model_not_diffusers": (lambda w: _train(w, "star", "--model", str(w["root"]), "--out", NEW), ["model_index.json"]),
    "model_truncated_safetensors": (lambda w: _train(w, "star", "--model", str(w["truncated_model"]), "--out", NEW),
                                    ["truncated_model", "diffusion_pytorch_model.safetensors"]),
    "model_corrupt_safetensors": (lambda w: _train(w, "star", "--model", str(w["corrupt_model"]), "--out", NEW),
                                  ["corrupt_model", "diffusion_pytorch_model.safetensors"]),
    "model_pickle_only": (lambda w: _train(w, "star", "--model", str(w["pickle_model"]), "--out", NEW),
                          ["diffusion_pytorch_model.bin", "--allow-pickle"]),
    # the run folder
    "out_is_a_file": (lambda w: _train(w, "star", "--out", str(w["root"] / "a_file")), ["a_file", "file"]),
    "out_read_only": (lambda w: _train(w, "star", "--out", "/proc/pristine_run"), ["--out", "/proc"]),
    "out_holds_a_run": (lambda w: _train(w, "star", "--out", str(w["run"])), ["--out", "--resume latest", "--overwrite"]),
    "out_holds_weights": (lambda w: _train(w, "star", "--out", str(w["root"] / "just_weights")),
                          ["just_weights", "not empty", "--overwrite"]),
    "resume_changed_seed": (lambda w: _resume(w, "--seed", "99"), ["config.yaml", "seed", "99"]),
    "resume_other_method": (lambda w: _resume(w, "--method", "textual_inversion"), ["method", "textual_inversion"]),
    "resume_other_rank": (lambda w: _resume(w, "--rank", "8"), ["method_args", "rank"]),
    "resume_adds_preserve": (lambda w: _resume(w, "--preserve", "class"), ["config.yaml", "preserve"]),
    "resume_pickle": (lambda w: _train(w, "star", "--out", NEW, "--resume", str(w["root"] / "state.pt")), ["state.pt", "pickle"]),
    "resume_corrupt_named": (lambda w: _train(w, "star", "--out", NEW, "--resume", str(w["root"] / "garbage.safetensors")),
                             ["garbage.safetensors"]),
    "resume_missing": (lambda w: _train(w, "star", "--out", NEW, "--resume", str(w["root"] / "step_9.safetensors")),
                       ["step_9.safetensors"]),
    "resume_not_a_run": (lambda w: _train(w, "star", "--out", str(w["root"] / "just_weights"), "--resume", "latest"),
                         ["just_weights", "config.yaml"]),
    # sampling
    "sample_corrupt_lora": (lambda w: ["sample", "--model", str(w["tiny"]), "--adapter", str(w["bad_lora_run"]), "--prompt",
                                       "a <v1> star", "--out", NEW + ".png"], ["pytorch_lora_weights.safetensors"]),
    "sample_corrupt_embeddings": (lambda w: ["sample", "--model", str(w["tiny"]), "--adapter", str(w["bad_embeds_run"]),
                                             "--prompt", "a <v1> star", "--out", NEW + ".png"], ["learned_embeds.safetensors"]),
    "sample_corrupt_model": (lambda w: ["sample", "--model", str(w["truncated_model"]), "--prompt", "a star", "--out",
                                        NEW + ".png"], ["diffusion_pytorch_model.safetensors"]),
    "sample_out_is_a_folder": (lambda w: ["sample", "--model", str(w["tiny"]), "--prompt", "a star", "--out",
                                          str(w["root"] / "empty.png")], ["empty.png", "folder"]),
    "sample_out_read_only": (lambda w: ["sample", "--model", str(w["tiny"]), "--prompt", "a star", "--out",
                                        "/proc/pristine/grid.png"], ["--out", "/proc"]),
    "sample_out_not_png": (lambda w: ["sample", "--model", str(w["tiny"]), "--prompt", "a star", "--out", NEW + ".jpg"],
                           [".png"]),
    "sample_missing_adapter": (lambda w: ["sample", "--model", str(w["tiny"]), "--adapter", str(w["root"] / "nope"),
                                          "--prompt", "a star", "--out", NEW + ".png"], ["nope"]),
    # guidance terms
    "guide_unknown_key": (lambda w: ["sample", "--model", str(w["tiny"]), "--guide", f"adaptr={w['run']},prompt=a star,w=2",
                                     "--out", NEW + ".png"], ["--guide 1", "adaptr", "adapter, prompt, w"]),
    "guide_weight_not_a_number": (lambda w: ["sample", "--model", str(w["tiny"]), "--guide", "prompt=a star,w=2", "--guide",
                                             "prompt=a circle,w=lots", "--out", NEW + ".png"], ["--guide 2", "w", "lots"]),
    "guide_weight_nan": (lambda w: ["sample", "--model", str(w["tiny"]), "--guide", "prompt=a star,w=nan", "--out",
                                    NEW + ".png"], ["--guide 1", "w", "finite"]),
    "guide_missing_run": (lambda w: ["sample", "--model", str(w["tiny"]), "--guide", f"adapter={w['root'] / 'gone'},w=2",
                                     "--out", NEW + ".png"], ["--guide 1", "gone", "pristine train"]),
    "guide_not_a_run": (lambda w: ["sample", "--model", str(w["tiny"]), "--guide", f"adapter={w['no_outputs']},w=2",
                                   "--out", NEW + ".png"], ["no_outputs", "config.yaml", "pytorch_lora_weights"]),
    "guide_not_key_value": (lambda w: ["sample", "--model", str(w["tiny"]), "--guide", "a star", "--out", NEW + ".png"],
                            ["--guide", "KEY=VALUE"]),
    "guide_with_adapter": (lambda w: ["sample", "--model", str(w["tiny"]), "--adapter", str(w["run"]), "--guide",
                                      "prompt=a star,w=2", "--out", NEW + ".png"], ["--adapter", "--guide"]),
    "guide_corrupt_lora": (lambda w: ["sample", "--model", str(w["tiny"]), "--guide", f"adapter={w['bad_lora_run']},"
                                      "prompt=a <v1> star,w=2", "--out", NEW + ".png"], ["pytorch_lora_weights.safetensors"]),
    "sample_yaml_unknown_key": (lambda w: ["sample", "--config", str(w["root"] / "sample_unknown.yaml"), "--out",
                                           NEW + ".png"], ["sample_unknown.yaml", "gudies"]),
    "sample_yaml_guide_weight": (lambda w: ["sample", "--config", str(w["root"] / "sample_weight.yaml"), "--out",
                                            NEW + ".png"], ["guides[0]", "w", "strong"]),
    # ICO and DCI
    "ico_without_token_method": (lambda w: _train(w, "star", "--method", "concept_centric", "--ico", "--out", NEW),
                                 ["ico", "concept_centric", "drop --ico"]),
    "ico_no_vectors": (lambda w: _train(w, "star", "--ico", "--n-ctx", "0", "--n-end", "0", "--out", NEW),
                       ["n_ctx", "--n-ctx"]),
    "ico_ctx_lr_scale_zero": (lambda w: _train(w, "star", "--ico", "--ctx-lr-scale", "0", "--out", NEW), ["ctx_lr_scale"]),
    "sampler_unknown": (lambda w: ["sample", "--model", str(w["tiny"]), "--adapter", str(w["run"]), "--prompt", "a <v1> star",
                                   "--sampler", "magic", "--out", NEW + ".png"], ["--sampler", "magic", "dci"]),
    "dci_agg_time_above_one": (lambda w: ["sample", "--model", str(w["tiny"]), "--adapter", str(w["run"]), "--prompt",
                                          "a <v1> star", "--sampler", "dci", "--agg-time", "1.5", "--out", NEW + ".png"],
                               ["--agg-time", "1.5"]),
    "dci_lambda_out_of_range": (lambda w: ["sample", "--model", str(w["tiny"]), "--adapter", str(w["run"]), "--prompt",
                                           "a <v1> star", "--sampler", "dci", "--dci-lambda", "3", "--out", NEW + ".png"],
                                ["--dci-lambda", "-2", "2"]),
    "dci_prompt_without_token": (lambda w: ["sample", "--model", str(w["tiny"]), "--adapter", str(w["run"]), "--prompt",
                                            "a red star", "--no-token-ok", "--sampler", "dci", "--steps", "2", "--n", "1",
                                            "--out", NEW + ".png"], ["--sampler dci", "<v1>"]),
    # flags of issue 18: other tools' spellings, counting steps, validation, logging, prompts, sizes
    "unknown_diffusers_flag": (lambda w: _train(w, "star", "--learning_rate", "1e-4", "--out", NEW),
                               ["--learning_rate", "use --lr", "pristine train --help"]),
    "unknown_underscore_flag": (lambda w: _train(w, "star", "--batch_size", "2", "--out", NEW), ["--batch-size"]),
    "steps_and_epochs": (lambda w: _train(w, "star", "--epochs", "2", "--out", NEW), ["--steps", "--epochs"]),
    "validation_every_without_prompt": (lambda w: _train(w, "star", "--validation-every", "5", "--out", NEW),
                                        ["--validation-every", "--validation-prompt"]),
    "report_to_unknown": (lambda w: _train(w, "star", "--report-to", "wandb", "--out", NEW), ["--report-to", "wandb"]),
    "instance_prompt_without_token": (lambda w: _train(w, "star", "--instance-prompt", "a photo of a star", "--out", NEW),
                                      ["--instance-prompt", "<v1>"]),
    "train_text_encoder_not_lora": (lambda w: _train(w, "star", "--method", "textual_inversion", "--train-text-encoder",
                                                     "--out", NEW), ["--train-text-encoder", "textual_inversion"]),
    "checkpoint_every_negative": (lambda w: _train(w, "star", "--checkpoint-every", "-1", "--out", NEW),
                                  ["--checkpoint-every"]),
    "sample_height_off_the_grid": (lambda w: ["sample", "--model", str(w["tiny"]), "--adapter", str(w["run"]), "--prompt",
                                              "a <v1> star", "--height", "15", "--out", NEW + ".png"], ["--height", "15"]),
    "sample_lora_scale_without_lora": (lambda w: ["sample", "--model", str(w["tiny"]), "--guide", "prompt=a star,w=2",
                                                  "--lora-scale", "0.5", "--out", NEW + ".png"], ["--lora-scale"]),
    "bench_context_unknown_row": (lambda w: ["bench", "context", "--rows", "lora,magic", "--out", NEW], ["--rows", "magic"]),
    "bench_context_agg_time": (lambda w: ["bench", "context", "--agg-time", "2", "--out", NEW], ["--agg-time", "2"]),
    "bench_mini_part": (lambda w: ["bench", "mini", "--part", "3/2", "--out", NEW], ["--part", "3/2"]),
    "bench_context_part": (lambda w: ["bench", "context", "--part", "0/2", "--out", NEW], ["--part", "0/2"]),
        "ema_decay_one": (lambda w: _train(w, "star", "--ema-decay", "1", "--out", NEW), ["ema_decay"]),
    "text_free_with_prior": (lambda w: _train(w, "star", "--method", "concept_centric", "--prior-preservation", "--out", NEW),
                             ["prior_preservation", "concept_centric"]),
    # evaluation
    "eval_dino_given_clip": (lambda w: ["eval", "--images", str(w["star"]), "--dino", str(Path(mini.MODEL_DIR) / "clip")],
                             ["--dino", "clip"]),
    "eval_decompression_bomb": (lambda w: ["eval", "--images", str(w["bomb"]), "--references", str(w["bomb"]), "--clip",
                                           str(Path(mini.MODEL_DIR) / "clip")], ["bomb.png"]),
}


def _snapshot(w) -> dict:
    """Every file of the user's that a bad command might touch: the finished run, the other folders."""
    out = {}
    for name in ("run", "just_weights", "empty", "empty.png", "bad_lora_run"):
        for p in sorted((w["root"] / name).rglob("*")):
            out[str(p)] = p.read_bytes() if p.is_file() else "folder"
    out["a_file"] = (w["root"] / "a_file").read_bytes()
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(world, tmp_path, capsys, case):
    build, words = CASES[case]
    new = tmp_path / "new_run"
    argv = [a.replace(NEW, str(new)) for a in build(world)]
    before = _snapshot(world)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert _snapshot(world) == before  # the existing run and every other file, byte for byte
    assert not new.exists() and not list(tmp_path.glob("new_run*"))  # nothing half-written


def test_animated_gif_and_float_tiff_are_read_not_skipped_or_black(tmp_path):
    from pristine.data import ConceptImages, ConceptSpec

    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.fromarray(np.full((32, 32), 0.5, np.float32), mode="F").save(tmp_path / "float.png", format="TIFF")
    c = ConceptImages.load(ConceptSpec(str(tmp_path), "<v1>", "star"))
    images = {p.name: np.asarray(im) for p, im in zip(c.paths, c.images)}
    assert set(images) == {"anim.gif", "float.png"}
    assert images["anim.gif"][..., 0].mean() > 200 and images["anim.gif"][..., 2].mean() < 50  # the first (red) frame
    assert abs(images["float.png"].mean() - 128) < 2  # 0.5 of the range, not black


def test_ctrl_c_says_how_to_continue(world, tmp_path, capsys, monkeypatch):
    import pristine.train

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(pristine.train, "train", interrupted)
    assert main(_train(world, "star", "--out", str(tmp_path / "r"))) == 130
    assert "--resume latest" in capsys.readouterr().err


def test_allow_pickle_loads_a_pickled_model(world, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    folder = tmp_path / "pickled"
    shutil.copytree(world["tiny"], folder)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    unet.save_pretrained(folder / "unet", safe_serialization=False)
    argv = _train(world, "star", "--model", str(folder), "--out", str(tmp_path / "r"))
    assert main(argv) == 2 and "--allow-pickle" in capsys.readouterr().err
    assert main([*argv, "--allow-pickle"]) == 0, capsys.readouterr().err
