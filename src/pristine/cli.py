"""The `pristine` command line.

Bad input ends with one line on stderr naming what is wrong and what to do, and exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from .errors import UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


# what users of diffusers' training scripts and of kohya sd-scripts type, and pristine's flag for it;
# any other underscore spelling of a flag is recognized by the underscore -> dash rule
FOREIGN_FLAGS = {
    "diffusers scripts'": {
        "--learning_rate": "--lr", "--max_train_steps": "--steps", "--num_train_epochs": "--epochs",
        "--instance_data_dir": "--images", "--output_dir": "--out", "--train_batch_size": "--batch-size",
        "--pretrained_model_name_or_path": "--model", "--gradient_accumulation_steps": "--gradient-accumulation",
        "--lr_warmup_steps": "--warmup-steps", "--checkpointing_steps": "--checkpoint-every",
        "--checkpoints_total_limit": "--keep-checkpoints", "--validation_epochs": "--validation-every",
        "--validation_steps": "--validation-every", "--with_prior_preservation": "--prior-preservation",
        "--prior_loss_weight": "--prior-weight", "--adam_weight_decay": "--weight-decay",
        "--resume_from_checkpoint": "--resume", "--num_inference_steps": "--steps", "--guidance_scale": "--guidance",
        "--num_images_per_prompt": "--n",
    },
    "kohya sd-scripts'": {
        "--train_data_dir": "--images", "--network_dim": "--rank", "--network_alpha": "--alpha",
        "--max_train_epochs": "--epochs", "--save_every_n_steps": "--checkpoint-every", "--unet_lr": "--lr",
        "--log_with": "--report-to",
    },
}


def unknown_argument_message(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    """One line for arguments a command does not take: the flag the user meant where it can be told
    (another tool's spelling, underscores for dashes, a near miss), and where the flags are listed."""
    import difflib

    options = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    first = extra[0]
    more = sum(1 for e in extra[1:] if e.startswith("-"))
    tail = f" (and {more} more unknown)" if more else ""
    if not first.startswith("-"):
        return f"{parser.prog}: unexpected argument {first!r}{tail}; see `{parser.prog} --help`"
    flag = first.split("=", 1)[0]
    hint = ""
    tool, target = next(((tool, table[flag]) for tool, table in FOREIGN_FLAGS.items() if flag in table), (None, None))
    if target in options:
        hint = f", the {tool} spelling: use {target}"
    elif flag.replace("_", "-") in options:
        hint = f": use {flag.replace('_', '-')} (flags take dashes, not underscores)"
    else:
        close = difflib.get_close_matches(flag.replace("_", "-"), options, n=1, cutoff=0.6)
        if close:
            hint = f": did you mean {close[0]}"
    return f"{parser.prog}: unknown flag {flag}{hint}{tail}; every flag is in `{parser.prog} --help`"


def _mark_leaves(parser: argparse.ArgumentParser) -> None:
    """Each command's parser records itself in the namespace it fills: an unknown flag is then explained
    against that command's own flags."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        parser.set_defaults(_command_parser=parser)
    for action in subs:
        for child in action.choices.values():
            _mark_leaves(child)


def _positive(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number, got {text!r}")
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be positive, got {value}")
        return value

    return parse


def _at_least_zero(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number, got {text!r}")
        if value < 0:
            raise argparse.ArgumentTypeError(f"{name} must be zero or more, got {value}")
        return value

    return parse


# ---- pristine world render ---------------------------------------------------------------------


WORLD_PARTS = ("pretraining", "full", "concepts", "attribute:zigzag", "attribute:gradient", "domain:retro")


def cmd_world_render(args) -> None:
    from .world.export import write_renders

    if args.part not in WORLD_PARTS:
        raise UsageError(f"--part {args.part!r} is not a part of the world; choose one of {', '.join(WORLD_PARTS)}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder; give a folder path")
    path = write_renders(out, n=args.n, seed=args.seed, size=args.size, part=args.part)
    print(f"wrote {args.n} renders with captions and ground truth to {path}")


# ---- pristine mini ... ---------------------------------------------------------------------------

STAGE_DEFAULTS = {  # steps, batch size, learning rate: the settings the shipped model was trained with
    "vae": (4800, 16, 1e-3),
    "clip": (900, 128, 5e-4),
    "oracle": (2500, 128, 2e-3),
    "oracle-marks": (3000, 128, 5e-4),
    "unet": (3000, 128, 3e-4),
    "unet-joint": (1800, 128, 2e-4),
    "clip-image": (2500, 64, 5e-4),
    "clip-negatives": (1000, 64, 5e-4),
    "clip-binding": (1500, 64, 3e-4),
    "vae-world": (1500, 33, 2e-4),
    "vae16": (2000, 33, 1e-3),
}


STAGE_NEEDS = {  # what a stage reads from the model folder
    "unet": ("vae", "text_encoder", "tokenizer"),
    "unet-joint": ("vae", "text_encoder", "tokenizer", "unet"),
    "clip-negatives": ("clip", "tokenizer"),
    "clip-binding": ("clip", "tokenizer"),
    "vae-world": ("vae",),
    "oracle-marks": ("oracle",),
}


def cmd_mini_pretrain(args) -> None:
    import torch

    from .mini import pretrain as P

    workdir, out = Path(args.workdir), Path(args.out)
    steps, batch, lr = STAGE_DEFAULTS[args.stage]
    settings = P.StageSettings(steps=args.steps or steps, batch_size=args.batch_size or batch, lr=lr, checkpoint_every=100,
                               warmup=200 if args.stage.startswith("unet") else 100)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # pre-training, not a parity check
    workdir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    corpus_size = args.corpus_size or 60000
    for part in STAGE_NEEDS.get(args.stage, ()):
        if not (out / part).exists():
            raise UsageError(f"{out / part} is missing: run the stages before `{args.stage}` first, in the order vae, clip, unet, unet-joint, clip-image, clip-negatives, vae-world, oracle")
    if args.stage in ("oracle", "oracle-marks"):
        print(json.dumps(P.pretrain_oracle(workdir, out, settings, n_train=corpus_size, stage=args.stage.replace("-", "_"),
                                            device=getattr(args, "device", "cpu")), indent=2))
        return
    if args.export_now:
        if args.stage not in ("unet", "unet-joint"):
            raise UsageError("--export-now applies to --stage unet and unet-joint (the other stages export when they finish)")
        P.export_denoiser(workdir, out, args.stage.replace("-", "_"))
        print(f"exported the latest {args.stage} checkpoint's EMA weights to {out}")
        return
    # vae16 and vae-world: --corpus-size is the whole-world renders they train on (default 18,000, a third per part)
    world_per_part = max(1, (args.corpus_size or 18000) // 3)
    if args.stage == "vae16":
        P.pretrain_vae16(workdir, out, settings, n_per_part=world_per_part, device=args.device)
        print(f"stage vae16 done: {out} (a new latent space: run unet-joint on it next)")
        return
    if args.stage == "vae-world":
        print(json.dumps(P.pretrain_vae_world(workdir, out, settings, n_per_part=world_per_part, device=args.device), indent=2))
        print(f"stage vae-world done: {out}")
        return
    tokenizer_dir = _tokenizer_source(args, out) if args.stage == "clip" else None
    corpus = P.build_corpus(workdir, corpus_size)
    if args.stage == "vae":
        P.pretrain_vae(workdir, out, corpus, settings, device=args.device)
    elif args.stage == "clip":
        P.pretrain_clip(workdir, out, corpus, settings, tokenizer_dir, device=args.device)
    elif args.stage == "clip-image":
        print(json.dumps(P.pretrain_clip_image(workdir, out, corpus, settings, device=args.device), indent=2))
    elif args.stage == "clip-negatives":
        print(json.dumps(P.pretrain_clip_negatives(workdir, out, corpus, settings, attribute_weight=1.0,
                                                   device=args.device), indent=2))
    elif args.stage == "clip-binding":
        print(json.dumps(P.pretrain_clip_negatives(workdir, out, corpus, settings, attribute_weight=1.0, mined=4,
                                                   stage="clip_binding", device=args.device), indent=2))
    else:
        P.pretrain_denoiser(workdir, out, corpus, settings, args.stage.replace("-", "_"), device=args.device)
    print(f"stage {args.stage} done: {out}")


def _tokenizer_source(args, out: Path) -> Path:
    """The tokenizer files: from the open_clip BPE file when given, else the ones already in a model folder."""
    from .mini.tokenizer import write_tokenizer_files

    if args.bpe:
        if not Path(args.bpe).is_file():
            raise UsageError(f"--bpe {args.bpe}: no such file; give the path of bpe_simple_vocab_16e6.txt.gz")
        return write_tokenizer_files(args.bpe, Path(args.workdir) / "tokenizer")
    for folder in (out / "tokenizer", Path(__file__).parent / "mini" / "model" / "tokenizer"):
        if (folder / "vocab.json").exists():
            return folder
    raise UsageError("no tokenizer files found: pass --bpe PATH/bpe_simple_vocab_16e6.txt.gz (from the open_clip_torch wheel)")


def _model_folder(args) -> str:
    from . import mini

    folder = args.model or mini.path()
    if not (Path(folder) / "model_index.json").is_file():
        raise UsageError(f"--model {folder} is not a diffusers model folder (no model_index.json)")
    if not (Path(folder) / "oracle" / "config.json").is_file():
        raise UsageError(f"--model {folder} has no oracle/ folder; only pristine-mini models can be scored")
    return folder


def cmd_mini_score(args) -> None:
    from . import mini
    from .mini import score as S

    folder = _model_folder(args)
    oracle = mini.load_oracle(folder)
    if args.selftest:
        result = {f"oracle.{k}": v for k, v in S.selftest(oracle, n=args.n, seed=args.seed).items()}
    elif args.clip:
        from .mini import clip_reading
        from .mini.tokenizer import load_tokenizer

        clip, _ = mini.load_clip(folder)
        result = {f"clip.{k}": v for k, v in clip_reading.check(clip, load_tokenizer(Path(folder) / "tokenizer"),
                                                                n=args.n, seed=args.seed).items()}
        result["clip.meets_bar"] = clip_reading.meets_bar({k[5:]: v for k, v in result.items()})
    else:
        result = S.score(mini.load_pipeline(folder), oracle, n=args.n, seed=args.seed, steps=args.steps, guidance=args.guidance)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        width = max(len(k) for k in result)
        for k, v in result.items():
            shown = f"{v:.1%}" if isinstance(v, float) and not k.endswith("guidance") else str(v)
            print(f"{k:<{width}}  {shown}")


def cmd_mini_card(args) -> None:
    from .mini.card import plot_losses, sample_grid

    out = Path(args.out)
    print(plot_losses([Path(w) for w in args.workdir or ["runs/mini"]], out / "mini_losses.png"))
    print(sample_grid(out / "mini_samples.png", folder=args.model))


# ---- pristine train / sample --------------------------------------------------------------------

# flag -> config key, for the flags that map one to one
TRAIN_FLAGS = ("model", "method", "out", "instance_prompt", "steps", "epochs", "batch_size", "gradient_accumulation",
               "lr", "lr_scheduler", "warmup_steps", "weight_decay", "max_grad_norm", "seed", "mixed_precision",
               "resolution", "crop", "prior_weight", "num_class_images", "class_prompt", "preserve", "preserve_weight",
               "checkpoint_every", "keep_checkpoints", "sample_every", "report_to", "resume", "ema_decay", "n_ctx",
               "n_end", "ctx_lr_scale")
METHOD_FLAGS = ("rank", "alpha", "vectors", "stage", "stage1_run", "init_run", "clip", "previous_run")


def train_config_from_args(args):
    from .train import TrainConfig, load_config_file

    values = load_config_file(args.config) if args.config else {}
    where = args.config or "flags"
    if args.steps is not None and args.epochs is not None:
        raise UsageError("--steps and --epochs both given; give one (--epochs sets the steps from the image count)")
    if args.steps is not None or args.epochs is not None:  # the flag's way of counting replaces the file's
        values.pop("epochs" if args.steps is not None else "steps", None)
    for key in TRAIN_FLAGS:
        value = getattr(args, key)
        if value is not None:
            values[key] = value
    for key in ("prior_preservation", "gradient_checkpointing", "use_8bit_adam", "overwrite", "allow_pickle", "ico"):
        if getattr(args, key):
            values[key] = True
    if args.no_flip:
        values["flip"] = False
    if args.sample_prompt:
        values.pop("validation_prompt", None)
        values.pop("validation_prompts", None)
        values["sample_prompts"] = args.sample_prompt
    if args.export:
        values["export"] = args.export
    method_args = dict(values.get("method_args") or {})
    for key in METHOD_FLAGS:
        if getattr(args, key) is not None:
            method_args[key] = getattr(args, key)
    if args.train_text_encoder:
        method_args["train_text_encoder"] = True
    for item in args.method_arg or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--method-arg {item!r}: expected KEY=VALUE")
        method_args[key] = yaml_scalar(value)
    if method_args:
        values["method_args"] = method_args
    if args.images or args.token or args.class_word:
        from .methods import get_method

        if not get_method(str(values.get("method", "lora"))).uses_text and args.images and not (args.token or args.class_word):
            values["concepts"] = [{"images": args.images}]  # a text-free method: the uncaptioned folder alone
        elif not (args.images and args.token and args.class_word):
            raise UsageError("--images, --token and --class-word go together; give all three (or a concepts list in --config)")
        else:
            values["concepts"] = [{"images": args.images, "token": args.token, "class_word": args.class_word}]
    return TrainConfig.from_dict(values, where)


def yaml_scalar(text: str):
    import yaml

    return yaml.safe_load(text)


def cmd_train(args) -> None:
    from .train import train

    if args.dump_pairs:  # CLIF's training pairs, written for inspection; nothing is trained (no --out needed)
        from .methods.clif import dump_training_pairs

        args.out = args.out or args.dump_pairs
        print(f"pairs written to {dump_training_pairs(train_config_from_args(args), Path(args.dump_pairs))}")
        return

    out = train(train_config_from_args(args))
    print(f"run written to {out}")


def sample_settings_from_args(args):
    """--config YAML, then flags; `--adapter/--prompt/--guidance` is the one-term case of `--guide`."""
    from .sampling import Guide, SampleSettings
    from .train import load_config_file

    values = load_config_file(args.config) if args.config else {}
    where = args.config or "flags"
    for key in ("model", "n", "seed", "steps", "scheduler", "sampler", "agg_time", "dci_lambda", "dci_scale", "negative_prompt",
                "lora_scale", "height", "width"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.dci_own_guidance:
        values["shared_guidance"] = False
    if args.allow_pickle:
        values["allow_pickle"] = True
    if args.prompt:
        values["prompts"] = args.prompt
    if args.guide:
        if args.adapter or args.guidance is not None:
            raise UsageError("--adapter and --guidance are the one-term shorthand; with --guide give adapter= and w= "
                             "inside each --guide")
        values["guides"] = [Guide.parse(text, f"--guide {i + 1}") for i, text in enumerate(args.guide)]
    elif not values.get("guides"):  # ordinary CFG with the run: its own ∅, as its diffusers pipeline samples it
        values["guides"] = [Guide.from_dict({"adapter": args.adapter or "", "w": 5.0 if args.guidance is None else args.guidance},
                                            "--adapter")]
        values["unconditional"] = args.adapter or ""
    if args.unconditional is not None:
        values["unconditional"] = "" if args.unconditional in ("original", "") else args.unconditional
    return SampleSettings.from_dict(values, where)


def _family(model: str):
    from .backbones import backbone_class, resolve_model

    return backbone_class(resolve_model(model))


def cmd_sample(args) -> None:
    from .files import check_writable_folder
    from .sample import run_tokens
    from .sampling import Models, sample, write_grid, write_images

    # every argument is checked before the model loads and anything is generated
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: give a .png path for the grid")
    if out.is_dir():
        raise UsageError(f"--out {out}: a folder; give a .png file path for the grid")
    check_writable_folder(out.parent, "--out")
    settings = sample_settings_from_args(args)  # every run's folder and files checked here
    for g in settings.guides:
        tokens = run_tokens(Path(g.adapter)) if g.adapter else []
        for row in settings.rows():
            prompt = g.prompt.replace("{prompt}", row)
            if tokens and not any(t in prompt for t in tokens) and not args.no_token_ok:
                raise UsageError(f"prompt {prompt!r} does not name the run's token ({', '.join(tokens)}); "
                                 "add it, or pass --no-token-ok to sample without it")
    if not _family(settings.model).GUIDED_SAMPLING:  # SD3 / FLUX: ordinary CFG through their own pipeline
        from .sample import pipeline_rows

        rows, labels = pipeline_rows(settings), settings.prompts
    else:
        rows = sample(settings, Models(settings.model, settings.allow_pickle, settings.lora_scale))
        labels = settings.rows() if any("{prompt}" in g.prompt for g in settings.guides) else \
            [" + ".join(f"{g.weight:g} x {Path(g.adapter).name or 'original'}: {g.prompt!r}" for g in settings.guides)]
    write_grid(rows, labels, out)
    images = write_images(rows, out, settings.seed)
    print(f"grid written to {out}, and each picture beside it ({images[0].name}, ...)")


def _method_entries(text: str) -> list[str]:
    """--methods split at its commas, not at those inside a setting's list or mapping
    (`lora@targets=[to_q,to_k],dreambooth` is two entries)."""
    entries, depth, start = [], 0, 0
    for i, char in enumerate(text + ","):
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth <= 0:
            entries.append(text[start:i].strip())
            start = i + 1
    return [e for e in entries if e]


def _bench_methods(text: str, with_prior: bool = True) -> list[str]:
    """--methods: budgets, each maybe with changed settings (BUDGET@KEY=VALUE@...), checked before any
    work; the step-cost benchmark has no prior images."""
    from .eval.minibench import budget_settings

    methods = _method_entries(text)
    for m in methods:
        _, settings = budget_settings(m)
        if settings.get("prior_preservation") and not with_prior:
            raise UsageError(f"--methods: {m!r} uses prior preservation, which the step-cost benchmark has no images "
                             "for; leave it out")
    return methods


def cmd_bench_mini(args) -> None:
    from .eval.minibench import BenchSettings, bench_fingerprint, concept_set, run_bench
    from .eval.parts import parse_part, pieces_drawn

    methods = _bench_methods(args.methods)
    try:
        concepts = concept_set("quick" if args.quick and args.concepts == "dev" else args.concepts)
    except KeyError as e:
        raise UsageError(f"--concepts: {e.args[0]}")
    settings = BenchSettings(methods, concepts, seeds=args.seeds or (2 if args.quick else 4),
                             sample_steps=args.sample_steps or (20 if args.quick else 30),
                             train_steps=args.train_steps or (80 if args.quick else None), part=parse_part(args.part))
    out = Path(args.out)
    names = [c.name for c in concepts]
    drawn_with = bench_fingerprint(settings) if args.workers and args.workers > 1 else None  # hashes the model: once
    if not _in_parts(args, out, lambda: run_bench(out, settings),
                     lambda: pieces_drawn(out, methods, names, "(method, concept)", drawn_with)):
        print(f"report: {run_bench(out, settings)}")


def _in_parts(args, out: Path, run, done) -> bool:
    """--part: run this slice and say so (True: nothing more to do); --workers N: run the N slices in
    N processes first, then the caller scores the whole from the folder."""
    from .eval.minibench import claim_folder
    from .eval.parts import run_parts

    if args.part is not None:
        run()
        print(f"part {args.part} drawn in {out}")
        return True
    if args.workers > 1:
        claim_folder(out)
        run_parts(args.argv, args.workers, out, done)
    return False


def cmd_bench_domain(args) -> None:
    from .eval.domainbench import BUDGETS, DomainSettings, run_domain_bench, table

    methods = _method_entries(args.methods)
    for m in methods:
        if m not in BUDGETS:
            raise UsageError(f"--methods: {m!r} is no row of the domain task; choose from {', '.join(BUDGETS)}")
    quick = args.quick
    settings = DomainSettings(methods, images=args.images or (16 if quick else 200), prompts=args.prompts or (3 if quick else 12),
                              seeds=args.seeds or (1 if quick else 4), sample_steps=args.sample_steps or (10 if quick else 30),
                              s_c=args.s_c, s_ctrl=args.s_ctrl, train_steps=args.train_steps or (20 if quick else None))
    path = run_domain_bench(Path(args.out), settings)
    print(table(json.loads(path.read_text())))
    print(f"written to {path}")


def cmd_bench_guidance(args) -> None:
    from .eval.guidancecost import run, table

    results = run(Path(args.out), n=args.batch, steps=args.steps, repeats=args.repeats)
    print(f"medians over {args.repeats} rounds of {args.steps} timesteps, batch {args.batch}")
    print(table(results))
    print(f"written to {Path(args.out) / 'guidance_cost.json'}")


def cmd_bench_context(args) -> None:
    from .eval.minibench import concept_set
    from .eval.minibench_context import CONTEXT_ROWS, ContextBenchSettings, context_fingerprint, run_context_bench
    from .sampling import check_dci_settings
    from .eval.parts import parse_part, pieces_drawn

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for row in rows:
        if row not in CONTEXT_ROWS:
            raise UsageError(f"--rows: {row!r} is no row of the context task; choose from {', '.join(CONTEXT_ROWS)}")
    if not rows:
        raise UsageError(f"--rows: none given; choose from {', '.join(CONTEXT_ROWS)}")
    dci = {name: value for name, value in (("agg_time", args.agg_time), ("dci_lambda", args.dci_lambda),
                                           ("dci_scale", args.dci_scale)) if value is not None}  # else the settings' defaults
    try:
        concepts = concept_set("quick" if args.quick and args.concepts == "dev" else args.concepts)
    except KeyError as e:
        raise UsageError(f"--concepts: {e.args[0]}")
    settings = ContextBenchSettings(rows, concepts, seeds=args.seeds or (2 if args.quick else 4),
                                    sample_steps=args.sample_steps or (20 if args.quick else 30), **dci,
                                    train_steps=args.train_steps or (80 if args.quick else None), part=parse_part(args.part))
    check_dci_settings(settings.agg_time, settings.dci_lambda, settings.dci_scale, "bench context")
    out = Path(args.out)
    names = [c.name for c in concepts]
    if not _in_parts(args, out, lambda: run_context_bench(out, settings),
                     lambda: pieces_drawn(out, rows, names, "(row, concept)", context_fingerprint(settings))):
        print(f"table: {run_context_bench(out, settings)}")


def cmd_bench_attribute(args) -> None:
    from .eval.minibench_attribute import ATTRIBUTE_BUDGETS, AttributeBenchSettings, run_attribute_bench
    from .world.concepts import ATTRIBUTE_WORDS

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for row in rows:
        if row not in ATTRIBUTE_BUDGETS:
            raise UsageError(f"--rows: {row!r} is no row of the attribute task; choose from {', '.join(ATTRIBUTE_BUDGETS)}")
    words = [w.strip() for w in args.words.split(",") if w.strip()]
    if not words or any(w not in ATTRIBUTE_WORDS for w in words) or len(set(words)) != len(words):
        raise UsageError(f"--words: {args.words!r}; give distinct words from {', '.join(ATTRIBUTE_WORDS)} "
                         "(the incremental row learns them in that order)")
    settings = AttributeBenchSettings(rows, words, seeds=args.seeds or (2 if args.quick else 4),
                                      sample_steps=args.sample_steps or (20 if args.quick else 30),
                                      images=args.images or (40 if args.quick else 300),
                                      train_steps=args.train_steps or (80 if args.quick else None))
    print(f"report: {run_attribute_bench(Path(args.out), settings)}")


def cmd_bench_multi(args) -> None:
    from .eval.minibench_multi import MultiSettings, budget, group_name, group_set, multi_fingerprint, run_multi
    from .eval.parts import parse_part, pieces_drawn

    try:
        groups = group_set("quick" if args.quick and args.groups == "dev" else args.groups)
    except KeyError as e:
        raise UsageError(f"--groups: {e.args[0]}")
    methods = _method_entries(args.methods)
    for m in methods:
        budget(m, groups[0])
    settings = MultiSettings(methods, groups, seeds=args.seeds or (2 if args.quick else 4),
                             sample_steps=args.sample_steps or (20 if args.quick else 30),
                             train_steps=args.train_steps or (40 if args.quick else None), part=parse_part(args.part))
    out = Path(args.out)
    names = [group_name(g) for g in groups]
    if not _in_parts(args, out, lambda: run_multi(out, settings),
                     lambda: pieces_drawn(out, methods, names, "(method, group)", multi_fingerprint(settings))):
        print(f"results: {run_multi(out, settings)}")


def cmd_bench_steps(args) -> None:
    from .eval.minibench import TOKEN, budget_settings
    from .eval.stepcost import run
    from .world.concepts import get_concept
    from .world.export import write_concept_folder

    methods = {}
    for entry in _bench_methods(args.methods, with_prior=False):
        # what shapes a step: the method and its settings, and output preservation
        name, settings = budget_settings(entry)
        methods[entry] = {"method": name, "method_args": settings.get("method_args", {}),
                          **{k: settings[k] for k in ("preserve", "preserve_weight") if k in settings}}
    try:
        concept = get_concept(args.concept)
    except KeyError as e:
        raise UsageError(f"--concept: {e.args[0]}")
    out = Path(args.out)
    images = write_concept_folder(concept, TOKEN, out / "data" / concept.name)
    results = run(methods, str(images), TOKEN, concept.class_word, out, steps=args.steps, batch_size=args.batch_size,
                  repeats=args.repeats, gradient_checkpointing=args.gradient_checkpointing)
    print(f"medians over {args.repeats} rounds; ratios to {next(iter(results))} within each round, [min, max]")
    w = max(18, *(len(n) + 2 for n in results))
    print(f"{'method':<{w}}{'s/step':>9}{'x first':>20}{'peak MB above loaded':>22}{'x first':>20}{'process peak MB':>17}")
    for name, r in results.items():
        t, m = r["time_vs_first_range"], r["memory_vs_first_range"]
        print(f"{name:<{w}}{r['s_per_step']:>9.4f}{r['time_vs_first']:>8.2f} [{t[0]:.2f}, {t[1]:.2f}]"
              f"{r['peak_bytes_above_loaded'] / 2**20:>22.1f}{r['memory_vs_first']:>8.2f} [{m[0]:.2f}, {m[1]:.2f}]"
              f"{r['peak_bytes_process'] / 2**20:>17.1f}")
    print(f"written to {out / 'stepcost.json'}")


def cmd_bench_peer(args) -> None:
    from .eval.peer import PeerSettings, run

    settings = PeerSettings(steps=args.steps, threads=args.threads, warmup=args.warmup, concept=args.concept,
                            pristine_args=list(args.pristine_arg or []))
    if args.warmup + 2 > args.steps:
        raise UsageError(f"--warmup {args.warmup}: leaves fewer than two timed steps of --steps {args.steps}; lower it")
    r = run(args.script, args.python, Path(args.out), rounds=args.rounds, settings=settings, model=args.model or "")
    s, m = r["speed_ratio_range"], r["memory_ratio_range"]
    print(f"{args.rounds} alternating rounds, {args.steps} steps, {args.threads} threads; pristine over the script:")
    print(f"  steps/s  {r['pristine_steps_per_s']:.2f} against {r['peer_steps_per_s']:.2f}: "
          f"{r['speed_ratio']:.2f}x [{s[0]:.2f}, {s[1]:.2f}]")
    print(f"  peak RSS {r['memory_ratio']:.2f}x [{m[0]:.2f}, {m[1]:.2f}]")
    print(f"written to {Path(args.out) / 'peer.json'}")


def cmd_eval(args) -> None:
    from .eval.real_metrics import RealMetrics, read_image_folder

    RealMetrics.check(args.clip, args.dino)  # the metric model folders, before any picture is read or generated
    references = read_image_folder(Path(args.references), need_prompts=False)[0] if args.references else []
    if args.preset == "dreambench":
        images, prompts, references = _dreambench_images(args, references)
    elif args.preset:
        raise UsageError(f"--preset {args.preset!r} is unknown; the preset is dreambench")
    else:
        if not args.images:
            raise UsageError("give --images DIR (pictures with prompts) or --preset dreambench")
        images, prompts = read_image_folder(Path(args.images))
    if args.token:
        prompts = [p.replace(f"{args.token} ", "").replace(args.token, "") for p in prompts]
    metrics = RealMetrics(args.clip, args.dino)
    result = metrics.score(images, prompts, references)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:<10} {v:.4f}" if isinstance(v, float) else f"{k:<10} {v}")


def _dreambench_images(args, references):
    """Generate the DreamBench protocol for one subject: 25 prompts x 4 images, saved with their prompts."""
    from PIL import Image

    from .eval.dreambench import IMAGES_PER_PROMPT, prompts_for, shared_dir
    from .eval.real_metrics import read_image_folder
    from .sample import generate, load_pipeline

    if not args.subject or not args.token:
        raise UsageError("--preset dreambench needs --subject NAME and --token (the run's token)")
    cls, prompts = prompts_for(args.subject, args.token)
    if not references:
        references = read_image_folder(shared_dir() / "256" / args.subject, need_prompts=False)[0]
    pipe = load_pipeline(args.model, args.adapter)
    all_prompts = [p for p in prompts for _ in range(IMAGES_PER_PROMPT)]
    seeds = list(range(IMAGES_PER_PROMPT)) * len(prompts)
    arrays = generate(pipe, all_prompts, seeds, steps=args.steps, guidance=args.guidance, desc="dreambench")
    images = [Image.fromarray(a) for a in arrays]
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, (im, p) in enumerate(zip(images, all_prompts)):
            im.save(out / f"{i:04d}.png")
            lines.append(json.dumps({"file_name": f"{i:04d}.png", "text": p}))
        (out / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return images, all_prompts, references


# ---- pristine demo -------------------------------------------------------------------------------


def cmd_demo(args) -> None:
    from .demo import run_demo

    path = run_demo(Path(args.out), seed=args.seed, train_steps=args.train_steps, sample_steps=args.sample_steps)
    print(f"demo written: {path}")


# ---- wiring ----------------------------------------------------------------------------------------


def _parts_flags(parser) -> None:
    parser.add_argument("--workers", type=_positive("--workers"), default=1,
                        help="processes that train and draw the concepts (bench multi: the groups) in parallel, one "
                             "CPU thread each on a CPU (default 1); the same pictures as one process")
    parser.add_argument("--part", metavar="I/N", help="train and draw only the I-th of N slices of the concepts (or groups), "
                                                      "no report (what each --workers process runs; parts may share one --out)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pristine", description="Teach a text-to-image model new concepts without polluting it.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    world = sub.add_parser("world", help="the Shapes world").add_subparsers(dest="world_command", required=True, parser_class=_Parser)
    render = world.add_parser("render", help="write renders with captions and ground truth (metadata.jsonl)")
    render.add_argument("--n", type=_positive("--n"), default=16)
    render.add_argument("--out", required=True)
    render.add_argument("--seed", type=int, default=0)
    render.add_argument("--size", type=_positive("--size"), default=32, help="image side in pixels (default 32)")
    render.add_argument("--part", default="pretraining", help=f"which part of the world: {', '.join(WORLD_PARTS)}")
    render.set_defaults(func=cmd_world_render)

    mini = sub.add_parser("mini", help="pristine-mini, the embedded model").add_subparsers(dest="mini_command", required=True, parser_class=_Parser)
    pre = mini.add_parser("pretrain", help="pre-train one stage of pristine-mini (resumes when run again)")
    pre.add_argument("--stage", required=True, choices=tuple(STAGE_DEFAULTS),
                     help="vae, clip, unet, unet-joint (UNet and text encoder together, from unet's output), clip-image (a new CLIP image tower taught every attribute from the world's labels), clip-negatives (the CLIP trained with one-word-swapped captions and zero-shot prompts: from the clip-image tower and a new text tower when clip-image has run, else fine-tuning out/clip), clip-binding (out/clip continued with clip-negatives' losses and, for two-object pictures, the wrong captions it scores highest as extra negatives: two objects' binding), vae-world (the VAE's decoder continued on the whole world's pixels, markings and the retro style), vae16 (v3's autoencoder from scratch on the whole world: a 4x16x16 latent, which keeps the concepts' markings; the denoiser stages then train on it), oracle, oracle-marks (the oracle continued with a quarter of its renders carrying only dots and rims)")
    pre.add_argument("--device", default="cpu", help="cpu (default) or cuda: where a GPU is available, use it for the long stages")
    pre.add_argument("--export-now", action="store_true", help="write the model folder from the stage's latest checkpoint and stop")
    pre.add_argument("--workdir", default="runs/mini", help="checkpoints, logs and the rendered corpus")
    pre.add_argument("--out", default="runs/mini/model", help="the model folder the stages fill")
    pre.add_argument("--steps", type=_positive("--steps"), default=None, help="training steps (default: the shipped recipe's)")
    pre.add_argument("--batch-size", type=_positive("--batch-size"), default=None, help="batch size (default: the shipped recipe's)")
    pre.add_argument("--corpus-size", type=_positive("--corpus-size"), default=None,
                     help="pre-training scenes rendered for the stage (default 60,000; vae-world and vae16: whole-world renders, default 18,000)")
    pre.add_argument("--threads", type=_positive("--threads"), default=None)
    pre.add_argument("--bpe", default=None, help="open_clip's bpe_simple_vocab_16e6.txt.gz, to build the tokenizer")
    pre.set_defaults(func=cmd_mini_pretrain)

    score = mini.add_parser("score", help="generate from fresh prompts and print the oracle's per-attribute accuracy")
    score.add_argument("--n", type=_positive("--n"), default=200, help="prompts per kind (single- and two-object)")
    score.add_argument("--seed", type=int, default=0)
    score.add_argument("--json", action="store_true")
    score.add_argument("--selftest", action="store_true", help="the oracle's own accuracy on fresh renders instead")
    score.add_argument("--clip", action="store_true",
                       help="the mini CLIP instead: zero-shot accuracy per attribute on --n fresh renders, and how often "
                            "the true caption outscores every one-word swap")
    score.add_argument("--steps", type=_positive("--steps"), default=50)
    score.add_argument("--guidance", type=float, default=5.0)
    score.add_argument("--model", default=None, help="a pristine-mini model folder (default: the embedded one)")
    score.set_defaults(func=cmd_mini_score)

    card = mini.add_parser("card", help="loss curves and a sample grid for the model card")
    card.add_argument("--workdir", action="append", default=None,
                      help="a work folder of stage logs; repeat it for stages continued elsewhere (default: runs/mini)")
    card.add_argument("--out", default="docs")
    card.add_argument("--model", default=None)
    card.set_defaults(func=cmd_mini_card)

    tr = sub.add_parser("train", help="teach a model a concept: LoRA, DreamBooth, Textual Inversion, Custom Diffusion",
                        description="Teach a model a concept. Every flag has a key of the same name in snake_case "
                                    "for --config YAML (method settings under method_args).")
    tr.add_argument("--config", help="a YAML file of settings (keys as the flags, in snake_case: batch_size: 4); "
                                     "flags given as well override it (default: none)")
    tr.add_argument("--model", help="'mini' (the embedded pristine-mini) or a local diffusers model folder of SD1.x/2.x, "
                                    "SDXL, SD3/3.5 or FLUX.1 (default: mini)")
    tr.add_argument("--images", help="folder of the concept's images; each image's caption is NAME.txt beside it or its "
                                     "line in metadata.jsonl, else --instance-prompt, else templates such as "
                                     "'a photo of <v1> star' (default: none; required unless --config lists concepts)")
    tr.add_argument("--token", help="the new token that names the concept, e.g. <v1>; not a word the tokenizer knows "
                                    "(default: none; required with --images)")
    tr.add_argument("--class-word", help="the concept's class, e.g. star: the token's embedding starts from it "
                                         "(default: none; required with --images)")
    tr.add_argument("--instance-prompt", help="one prompt for every image without a caption of its own, as the "
                                              "diffusers scripts' --instance_prompt, e.g. 'a photo of <v1> star' "
                                              "({token} and {cls} are filled in) (default: the templates)")
    tr.add_argument("--method", help="lora, dreambooth, textual_inversion, custom_diffusion, purecc, spf, clif, "
                                     "concept_centric (an uncaptioned --images folder alone) (default: lora)")
    tr.add_argument("--out", help="the run folder; new or empty, or add --resume latest or --overwrite "
                                  "(default: none; required)")
    tr.add_argument("--steps", type=_positive("--steps"), help="optimizer steps (default: 400; or give --epochs)")
    tr.add_argument("--epochs", type=_positive("--epochs"),
                    help="passes over the instance images instead of --steps: steps = epochs x ceil(images / "
                         "(batch size x gradient accumulation x processes)) (default: off, --steps counts)")
    tr.add_argument("--batch-size", type=_positive("--batch-size"), help="images per step and process (default: 4)")
    tr.add_argument("--gradient-accumulation", type=_positive("--gradient-accumulation"),
                    help="batches summed into one optimizer step (default: 1)")
    tr.add_argument("--lr", type=float, help="learning rate of the method's weights (default: the method's: lora, "
                    "purecc, spf, clif 1e-4; dreambooth 2e-5; textual_inversion 5e-3; custom_diffusion, "
                    "concept_centric 1e-5). lora and dreambooth also train the new token's embedding at 5e-3, "
                    "custom_diffusion at 1e-3 (--method-arg token_lr=..., or train_token=false)")
    tr.add_argument("--lr-scheduler", help="constant, constant_with_warmup, linear or cosine (default: constant)")
    tr.add_argument("--warmup-steps", type=int, help="linear warm-up steps of the schedulers that have one (default: 0)")
    tr.add_argument("--weight-decay", type=float, help="AdamW weight decay of the trained weights; never applied to "
                                                       "the new tokens' rows (default: 0.01)")
    tr.add_argument("--max-grad-norm", type=float, help="clip the gradient's norm to this before each optimizer step; "
                                                        "0: no clipping (default: 1.0)")
    tr.add_argument("--seed", type=int, help="seed of the batches, noise and timesteps (default: 0)")
    tr.add_argument("--mixed-precision", help="no, fp16 or bf16 (default: no)")
    tr.add_argument("--resolution", type=_positive("--resolution"),
                    help="training image side in pixels: each image's short side is resized to it, then a square is "
                         "cut (--crop) (default: the model's native size: 32 for mini, 512 for SD1.5, 1024 for SDXL)")
    tr.add_argument("--crop", help="center or random: where the square is cut; center encodes every image once "
                                   "(default: center)")
    tr.add_argument("--no-flip", action="store_true", help="no random horizontal mirroring (default: off, images are "
                                                            "mirrored at random)")
    tr.add_argument("--prior-preservation", action="store_true",
                    help="DreamBooth's prior preservation: --num-class-images pictures of --class-prompt drawn by the "
                         "original model (cached in OUT/../.class_images) are trained on beside the concept "
                         "(default: off)")
    tr.add_argument("--prior-weight", type=float, help="weight of the prior-preservation loss (default: 1.0)")
    tr.add_argument("--num-class-images", type=_positive("--num-class-images"),
                    help="prior-preservation pictures per concept (default: 100)")
    tr.add_argument("--class-prompt", help="their prompt, {cls} the class word (default: 'a photo of a {cls}')")
    tr.add_argument("--preserve", help="output preservation (lora, custom_diffusion, purecc): class (the caption with the "
                    "class word for the token), unrelated (fixed world prompts) or a file of prompts, one per line "
                    "(default: off)")
    tr.add_argument("--preserve-weight", type=float, help="weight of the output-preservation loss (default: 1.0)")
    tr.add_argument("--ico", action="store_true", help="ICO: each training image its own context vectors around "
                    "'<v> <class>' (lora, dreambooth, custom_diffusion, purecc, textual_inversion); dropped at inference "
                    "(default: off)")
    tr.add_argument("--n-ctx", type=int, help="ICO: context vectors before the token (default: 1)")
    tr.add_argument("--n-end", type=int, help="ICO: context vectors after the class word (default: 1)")
    tr.add_argument("--ctx-lr-scale", type=float, help="ICO: the contexts' learning rate over the run's (default: 10)")
    tr.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute activations in the backward pass: less memory, slower steps (default: off)")
    tr.add_argument("--use-8bit-adam", action="store_true", help="bitsandbytes' 8-bit AdamW (default: off)")
    tr.add_argument("--checkpoint-every", type=_at_least_zero("--checkpoint-every"),
                    help="a resumable checkpoint (safetensors, OUT/checkpoints/) every N steps and at the end; 0: none, "
                         "and no --resume (default: 100)")
    tr.add_argument("--keep-checkpoints", type=_positive("--keep-checkpoints"),
                    help="how many of the newest checkpoints are kept (default: 2)")
    tr.add_argument("--ema-decay", type=float, help="EMA of the trained weights, e.g. 0.999; 0: off (default: the "
                                                    "method's: off, concept_centric 0.999)")
    tr.add_argument("--validation-prompt", "--sample-prompt", dest="sample_prompt", action="append", metavar="TEXT",
                    help="a prompt whose grid (4 images, 25 DDIM steps, seeds from --seed) is drawn into OUT/samples/ "
                         "during and after training; repeatable (default: none)")
    tr.add_argument("--validation-every", "--sample-every", dest="sample_every", metavar="N",
                    type=_at_least_zero("--validation-every"),
                    help="draw the validation grid every N steps and at the end; 0: at the end only "
                         "(default: 100, with a --validation-prompt)")
    tr.add_argument("--report-to", help="tensorboard (logs in OUT/logs/) or none; OUT/log.jsonl has every step either "
                                        "way (default: tensorboard where it is installed, else none)")
    tr.add_argument("--export", action="append", help="an extra output format, repeatable: kohya "
                                                      "(lora_kohya.safetensors, kohya / ComfyUI key layout) (default: none)")
    tr.add_argument("--resume", help="'latest' or a checkpoint file (default: start afresh)")
    tr.add_argument("--overwrite", action="store_true", help="replace the run --out already holds (default: off)")
    tr.add_argument("--allow-pickle", action="store_true",
                    help="load a model whose weights are pickles (.bin); a pickle can run code, use trusted files only "
                         "(default: off)")
    tr.add_argument("--rank", type=_positive("--rank"), help="LoRA rank (default: 4; clif, concept_centric 16)")
    tr.add_argument("--alpha", type=float, help="LoRA alpha: the update is scaled by alpha / rank (default: 4; clif, "
                                                "concept_centric 16)")
    tr.add_argument("--train-text-encoder", action="store_true",
                    help="lora: a LoRA of the same rank on the CLIP text encoders' attention (q, k, v, out) too, at "
                         "--lr; saved in pytorch_lora_weights.safetensors and the kohya file (default: off)")
    tr.add_argument("--vectors", type=_positive("--vectors"),
                    help="textual_inversion, clif: embedding vectors per token (default: 1)")
    tr.add_argument("--stage", choices=("1", "2", "3", "both", "all"),
                    help="PureCC, SPF: 1, 2 or both; CLIF: 1, 2, 3 or all (default: both / all)")
    tr.add_argument("--stage1-run", help="PureCC --stage 2: the finished stage-1 run folder to start from (default: none)")
    tr.add_argument("--previous-run", help="CLIF --stage 2|3: the finished run of the stage before (default: none)")
    tr.add_argument("--init-run", help="SPF: an earlier run whose LoRA stays in the model, fixed (learning attributes "
                                       "in turn) (default: none)")
    tr.add_argument("--clip", help="SPF, CLIF: a local CLIP model folder; SPF: none turns its response-enhancement loss "
                                   "off (default: the model's own clip/)")
    tr.add_argument("--dump-pairs", help="CLIF: write the stage-1 pairs (PNG, masks, pairs.jsonl) to this folder and "
                                         "stop (default: off)")
    tr.add_argument("--method-arg", action="append",
                    help="KEY=VALUE for the method's own settings, repeatable, e.g. train_token=false "
                         "(default: the method's; see docs/)")
    tr.set_defaults(func=cmd_train)

    sa = sub.add_parser("sample", help="image grids from a model and runs, with (generalized) classifier-free guidance")
    sa.add_argument("--config", help="a YAML file of settings (guides: list of {adapter, prompt, w}); flags override it")
    sa.add_argument("--model", help="'mini' (default) or a local diffusers model folder: the frozen original")
    sa.add_argument("--adapter", help="a run folder: one guidance term with --prompt and --guidance")
    sa.add_argument("--guide", action="append",
                    help="a guidance term 'adapter=RUN,prompt=TEXT,w=NUMBER' (repeatable; no adapter: the original; "
                         "negative w: a negative prompt; {prompt} in TEXT: each --prompt)")
    sa.add_argument("--unconditional", help="the run whose f(∅) the guidance starts from (default: the frozen original "
                                           "with --guide, the run itself with --adapter)")
    sa.add_argument("--prompt", action="append", help="a grid row's prompt (repeatable)")
    sa.add_argument("--negative-prompt", help="what the guidance pushes away from, in place of the empty prompt, as "
                                              "a diffusers pipeline's negative_prompt (default: none)")
    sa.add_argument("--lora-scale", type=float, help="every run's LoRA update times this, as diffusers' "
                                                     "cross_attention_kwargs={'scale': s} (default: 1)")
    sa.add_argument("--height", type=_positive("--height"), help="picture height in pixels (default: the model's "
                                                                  "native size)")
    sa.add_argument("--width", type=_positive("--width"), help="picture width in pixels (default: the model's "
                                                               "native size)")
    sa.add_argument("--n", type=_positive("--n"), help="images per prompt (default: 4)")
    sa.add_argument("--out", required=True, help="the grid, a .png; each picture is also written beside it as "
                                                 "GRID-ROW-seedSEED.png")
    sa.add_argument("--seed", type=int, help="image k of each row is drawn from seed + k (default: 0)")
    sa.add_argument("--steps", type=_positive("--steps"), help="sampling steps (default 50)")
    sa.add_argument("--guidance", type=float, help="the weight of the one term given by --adapter/--prompt (default 5)")
    sa.add_argument("--scheduler", help="ddim (default), euler or ddpm")
    sa.add_argument("--sampler", help="dci: DCI's concept and auxiliary branches for the early steps (default: the "
                                      "engine's loop)")
    sa.add_argument("--agg-time", type=float, help="dci: the early fraction of the steps with both branches (default 0.3)")
    sa.add_argument("--dci-lambda", type=float, help="dci: λ in [-2, 2], the auxiliary branch's pull (default 0)")
    sa.add_argument("--dci-scale", type=float,
                    help="dci: the constant in front of the pixel softmax (default 500, the authors', made for SD1.x at "
                         "512 px; a model with smaller attention maps needs it smaller in proportion to their pixels)")
    sa.add_argument("--dci-own-guidance", action="store_true",
                    help="dci: guide the auxiliary branch from its own f(∅) (default: the concept branch's, shared)")
    sa.add_argument("--no-token-ok", action="store_true", help="allow prompts without the run's token")
    sa.add_argument("--allow-pickle", action="store_true",
                    help="load a model whose weights are pickles (.bin); a pickle can run code, use trusted files only")
    sa.set_defaults(func=cmd_sample)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True, parser_class=_Parser)
    bm = bench.add_parser("mini", help="MiniBench: methods on the Shapes world's held-out concepts, oracle-scored")
    bm.add_argument("--methods", default="lora,textual_inversion,dreambooth,custom_diffusion",
                    help="budgets (minibench.BUDGETS); BUDGET@KEY=VALUE changes a setting, a row of its own, "
                         "e.g. purecc_authors@base_branch=original")
    bm.add_argument("--concepts", default="dev", help="dev (12), final (4 kept apart), or concept names")
    bm.add_argument("--out", required=True)
    bm.add_argument("--quick", action="store_true",
                    help="a smoke run: 3 concepts, 2 seeds, 80 training steps (per stage), 20 sampling steps")
    bm.add_argument("--seeds", type=_positive("--seeds"))
    bm.add_argument("--sample-steps", type=_positive("--sample-steps"))
    bm.add_argument("--train-steps", type=_positive("--train-steps"))
    _parts_flags(bm)
    bm.set_defaults(func=cmd_bench_mini)
    bd = bench.add_parser("domain", help="MiniBench's domain task: the held-out style retro from its uncaptioned set "
                                         "(trigger LoRA, trigger DreamBooth, concept model + GCFG)")
    bd.add_argument("--methods", default="lora_trigger,dreambooth_trigger,concept_centric")
    bd.add_argument("--out", required=True)
    bd.add_argument("--quick", action="store_true", help="a smoke run: 16 images, 3 prompts, 1 seed, 20 training steps")
    bd.add_argument("--images", type=_positive("--images"), help="training pictures of the domain (default 200)")
    bd.add_argument("--prompts", type=_positive("--prompts"), help="control prompts (default 12)")
    bd.add_argument("--seeds", type=_positive("--seeds"))
    bd.add_argument("--sample-steps", type=_positive("--sample-steps"))
    bd.add_argument("--train-steps", type=_positive("--train-steps"))
    bd.add_argument("--s-c", type=float, default=2.5, help="GCFG weight of the concept model (default 2.5)")
    bd.add_argument("--s-ctrl", type=float, default=2.5, help="GCFG weight of the control prompt (default 2.5)")
    bd.set_defaults(func=cmd_bench_domain)
    bc = bench.add_parser("context", help="MiniBench's context task: ICO and DCI with LoRA and Custom Diffusion, "
                                          "prompts that change the concept's context")
    bc.add_argument("--rows", default=",".join(["lora", "lora_ico", "lora_dci", "lora_ico_dci", "custom_diffusion",
                                                "custom_diffusion_ico", "custom_diffusion_dci", "custom_diffusion_ico_dci"]))
    bc.add_argument("--concepts", default="dev", help="dev (12), or concept names; never tune on final")
    bc.add_argument("--out", required=True)
    bc.add_argument("--quick", action="store_true", help="a smoke run: 3 concepts, 2 seeds, 80 training steps, 20 sampling steps")
    bc.add_argument("--seeds", type=_positive("--seeds"))
    bc.add_argument("--sample-steps", type=_positive("--sample-steps"))
    bc.add_argument("--train-steps", type=_positive("--train-steps"))
    bc.add_argument("--agg-time", type=float, help="DCI rows: the early fraction of the steps (default 0.3)")
    bc.add_argument("--dci-lambda", type=float, help="DCI rows: λ in [-2, 2] (default 0)")
    bc.add_argument("--dci-scale", type=float,
                    help="DCI rows: the constant in front of the pixel softmax (default 500, the authors')")
    _parts_flags(bc)
    bc.set_defaults(func=cmd_bench_context)
    ba = bench.add_parser("attribute", help="MiniBench's attribute task: SPF and LoRA teaching held-out pattern words")
    ba.add_argument("--rows", default="lora,spf,spf_no_text,spf_no_query,spf_no_enhance,spf_no_denoise,spf_incremental")
    ba.add_argument("--words", default="zigzag,gradient", help="the words, in the order the incremental row learns them")
    ba.add_argument("--out", required=True)
    ba.add_argument("--quick", action="store_true",
                    help="a smoke run: 40 pictures per word, 2 seeds, 80 training steps (per stage), 20 sampling steps")
    ba.add_argument("--seeds", type=_positive("--seeds"))
    ba.add_argument("--images", type=_positive("--images"), help="captioned training pictures per word (default 300)")
    ba.add_argument("--sample-steps", type=_positive("--sample-steps"))
    ba.add_argument("--train-steps", type=_positive("--train-steps"))
    ba.set_defaults(func=cmd_bench_attribute)
    bmm = bench.add_parser("multi", help="MiniBench multi-concept: pairs and triples of concepts in one prompt; right, "
                           "swapped, leaked, missing per asked concept, and each concept's fidelity alone")
    bmm.add_argument("--methods", default="lora,custom_diffusion,clif", help="rows: lora, custom_diffusion, clif")
    bmm.add_argument("--groups", default="dev", help="dev (6 groups), or groups of concept names: a+b,c+d+e")
    bmm.add_argument("--out", required=True)
    bmm.add_argument("--quick", action="store_true",
                     help="a smoke run: the first pair, 2 seeds, 40 training steps (per stage), 20 sampling steps")
    bmm.add_argument("--seeds", type=_positive("--seeds"))
    bmm.add_argument("--sample-steps", type=_positive("--sample-steps"))
    bmm.add_argument("--train-steps", type=_positive("--train-steps"), help="steps of each stage, whatever the group")
    _parts_flags(bmm)
    bmm.set_defaults(func=cmd_bench_multi)
    bg = bench.add_parser("guidance", help="what a sampling step of the guidance engine costs against its forwards, "
                          "with 1 to 3 terms, and what batching terms that share weights saves")
    bg.add_argument("--steps", type=_positive("--steps"), default=30, help="timesteps measured per round (after 5 warm-up)")
    bg.add_argument("--batch", type=_positive("--batch"), default=4, help="pictures per step")
    bg.add_argument("--repeats", type=_positive("--repeats"), default=3, help="rounds of every configuration in alternation")
    bg.add_argument("--out", required=True, help="folder for the adapters it trains (two steps each) and guidance_cost.json")
    bg.set_defaults(func=cmd_bench_guidance)

    bs = bench.add_parser("steps", help="seconds per training step and peak memory per method (PureCC: stage 2)")
    bs.add_argument("--methods", default="lora,purecc,purecc_adaptive",
                    help="budgets, the first is the reference; BUDGET@KEY=VALUE changes a setting, e.g. purecc@learner_checkpointing=false")
    bs.add_argument("--concept", default="ember_star")
    bs.add_argument("--steps", type=_positive("--steps"), default=30)
    bs.add_argument("--batch-size", type=_positive("--batch-size"), default=4)
    bs.add_argument("--repeats", type=_positive("--repeats"), default=3,
                    help="rounds of all methods in alternation (the machine's speed drifts; ratios are per round)")
    bs.add_argument("--gradient-checkpointing", action="store_true", help="measure every method with it on")
    bs.add_argument("--out", required=True)
    bs.set_defaults(func=cmd_bench_steps)

    bp = bench.add_parser("peer", help="pristine's LoRA against diffusers' train_dreambooth_lora.py at the same settings: "
                                       "steps/s and peak memory, in alternating rounds")
    bp.add_argument("--script", required=True, help="path of examples/dreambooth/train_dreambooth_lora.py (not part of pristine)")
    bp.add_argument("--python", default=sys.executable,
                    help="a Python that can run the script (default: this one; torchvision's transforms are "
                         "stood in for when it cannot import them)")
    bp.add_argument("--model", help="a diffusers SD folder both train (default: pristine-mini)")
    bp.add_argument("--concept", default="ember_star", help="the development concept whose references both learn")
    bp.add_argument("--steps", type=_positive("--steps"), default=300)
    bp.add_argument("--warmup", type=_at_least_zero("--warmup"), default=10, help="optimizer steps left out of the rate (default: 10)")
    bp.add_argument("--threads", type=_positive("--threads"), default=2)
    bp.add_argument("--rounds", type=_positive("--rounds"), default=5)
    bp.add_argument("--pristine-arg", action="append", metavar="FLAG",
                    help="an extra `pristine train` flag, repeatable; write as --pristine-arg=--method-arg=train_token=false")
    bp.add_argument("--out", required=True, help="folder for the images, both runs, their logs and peer.json")
    bp.set_defaults(func=cmd_bench_peer)

    ev = sub.add_parser("eval", help="CLIP-T, CLIP-I and DINO with metric models from local folders")
    ev.add_argument("--images", help="generated pictures with prompts (metadata.jsonl or .txt beside each)")
    ev.add_argument("--references", help="the subject's real pictures (CLIP-I, DINO)")
    ev.add_argument("--clip", help="a local transformers CLIPModel folder")
    ev.add_argument("--dino", help="a local ViT / DINOv2 model folder")
    ev.add_argument("--token", help="removed from prompts before CLIP-T")
    ev.add_argument("--preset", help="dreambench: 25 prompts x 4 images for --subject, generated from --model/--adapter")
    ev.add_argument("--subject")
    ev.add_argument("--model", default="mini")
    ev.add_argument("--adapter")
    ev.add_argument("--out", help="where the preset's pictures go")
    ev.add_argument("--steps", type=_positive("--steps"), default=50)
    ev.add_argument("--guidance", type=float, default=5.0)
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_eval)

    demo = sub.add_parser("demo", help="the demo on pristine-mini: writes out/demo/index.html")
    demo.add_argument("--out", default="out/demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--train-steps", type=_positive("--train-steps"), default=None, help="steps per method and stage (default 300)")
    demo.add_argument("--sample-steps", type=_positive("--sample-steps"), default=50)
    demo.set_defaults(func=cmd_demo)
    _mark_leaves(parser)
    return parser


# how each resumable command continues after Ctrl-C
RESUME_HINT = {"train": "add --resume latest to the same command to continue from the last checkpoint",
               "mini": "run the same command again to resume"}

# a disk or permission failure while writing: the user's files are intact (every write goes through a
# temporary name), so it is said in one line like any other bad input
WRITE_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied"}


def _quiet_library_loading() -> None:
    """No weight-by-weight loading bars from transformers / diffusers: stderr holds pristine's own
    progress, and a bad input's one line is not buried under them."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when those libraries are imported
    for name in ("transformers", "diffusers"):  # already imported (the API, tests): switch them off now
        if name in sys.modules:
            __import__(f"{name}.utils.logging", fromlist=["disable_progress_bar"]).disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # pristine never fetches: a stray hub call fails fast
    _quiet_library_loading()
    args = None
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        if extra:
            raise UsageError(unknown_argument_message(getattr(args, "_command_parser", parser), extra))
        args.func(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in WRITE_ERRORS:
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(f"error: {WRITE_ERRORS[e.errno]}{where}; files written before are intact (the last checkpoint too); "
              "free space or fix the permission, then run again", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = RESUME_HINT.get(getattr(args, "command", None), "nothing half-written was left")
        print(f"interrupted; {hint}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
