"""The settings of `python -m train fit`: one flat dataclass, read from a YAML or TOML file, each field also a command
line flag (`--lr`, `--batch-size`, `--random-flip/--no-random-flip`, ...); the command line wins over the file. The
resolved settings are saved beside the checkpoints (`OUTPUT_DIR/config.yaml`), so a run can be repeated from it.

Defaults follow the paper where it speaks (DESIGN.md §2.6: Adam, lr 3e-5, batch 4, 50k steps, N = 4,
λ = 0.1) and are marked "our choice" where it is silent. Relative paths are relative to the working directory.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from idadapter_core.errors import IDAdapterError
from idadapter_core.schedule import NEGATIVE_IDENTITY_MODES

from idadapter_core.weights import atomic_write

MIXED_PRECISION = ("no", "fp16", "bf16")
METHODS = ("idadapter", "inv-adapter")
REFERENCE_FEATURES = ("noised", "inversion")
"""Where Inv-Adapter's training step takes the reference latent at the step's timestep from (train/inv_adapter_step.py)."""
LR_SCHEDULES = ("constant", "cosine")
LOG_WITH = ("tensorboard", "none")
RESOLVED_CONFIG_FILE = "config.yaml"


class ConfigError(IDAdapterError):
    """The training settings are incomplete, of the wrong type, or contradict each other."""


def _option(default, help: str, choices: tuple | None = None, default_factory=None):
    metadata = {"help": help, "choices": choices}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class FitConfig:
    # --- data and output
    method: str = _option("idadapter", "what to train: IDAdapter (MFF, identity token, adapters, K/V) or Inv-Adapter "
                                        "(the EAA only)", METHODS)
    cache: str = _option("", "the training cache written by `python -m train prepare` (required)")
    output_dir: str = _option("", "folder for checkpoints, logs, samples and the resolved config (required)")
    # --- the base model (local files only, never downloaded)
    pretrained: str | None = _option(None, "a diffusers model folder (SD1.5, SD2.1, SDXL)")
    single_file: str | None = _option(None, "a single-file SD checkpoint (.safetensors), instead of --pretrained")
    config_folder: str | None = _option(
        None, "with --single-file: a local diffusers folder of the same model type holding its component configs and "
              "tokenizers (weights not needed)")
    original_config: str | None = _option(None, "with --single-file: the original LDM .yaml config, if needed")
    # --- the frozen encoders
    clip_vision: str = _option("", "a transformers CLIPVisionModelWithProjection folder (required for idadapter)")
    clip_vision_name: str | None = _option(
        None, "the CLIP vision name recorded in the weights (default: the folder's name)")
    insightface_root: str | None = _option(
        None, "folder holding models/<face-model>/*.onnx, for the face-ID loss (required when face_id_weight > 0)")
    face_model: str | None = _option(None, "insightface model pack name (default: the one the cache was made with)")
    face_provider: str = _option("CPU", "onnxruntime provider of the face detector gate")
    face_det_size: int = _option(640, "face detection size of the face-ID loss gate")
    face_min_size: int = _option(
        64, "faces smaller than this (pixels) do not open the face-ID loss gate (our choice)")
    # --- the adapter (DESIGN.md §2.2, §2.3, §2.4; sizes are our choices, [I])
    num_refs: int = _option(4, "N, reference images per sample (DESIGN.md §2.2: 4 is best)")
    mff_width: int = _option(1024, "width of the MFF encoder and of E_r")
    mff_depth: int = _option(2, "attention blocks of the MFF encoder (the paper's two)")
    mff_heads: int = _option(16, "attention heads of the MFF encoder")
    mff_num_queries: int = _option(0, "0 keeps all N*patches+1 tokens as E_r; M > 0 compresses E_r to M learned queries")
    trigger_word: str = _option("sks", "the identifier word replaced by the identity token (DESIGN.md §2.3)")
    class_word: str = _option(
        "person", "class word recorded in the weights (each image's own class word comes from the cache)")
    # --- Inv-Adapter (docs/DESIGN.md §3; our inferences, [I])
    reference_features: str = _option(
        "inversion", "inv-adapter: the reference latent at the step's timestep is taken from its DDIM inversion (as "
                     "Apply Inv-Adapter takes it; each reference inverted once per run, `inversion_steps` UNet calls, "
                     "kept on disk under output_dir/inversions; in the identity miniature it carries the most "
                     "identity: README) or forward-noised (no inversion to run)", REFERENCE_FEATURES)
    inversion_steps: int = _option(50, "inv-adapter with reference_features inversion: DDIM inversion steps (Load "
                                       "Inv-Adapter Reference's default)")
    # --- optimisation (DESIGN.md §2.6)
    seed: int = _option(0, "seed of the adapter's initialisation, the data order, the noise and the dropout")
    max_steps: int = _option(50_000, "optimizer steps to train for")
    batch_size: int = _option(4, "samples per process per micro-step")
    gradient_accumulation_steps: int = _option(1, "micro-steps per optimizer step")
    lr: float = _option(3e-5, "Adam learning rate (the peak, after the warmup)")
    warmup_steps: int = _option(0, "linear learning-rate warmup, in optimizer steps (our choice: none)")
    lr_schedule: str = _option(
        "constant", "learning rate after the warmup: constant (the paper's, DESIGN.md §2.6) or a cosine decay to 0 at "
                    "max_steps (for short runs: the last weights are then not one noisy Adam step among many; the "
                    "identity miniature uses it, README)", LR_SCHEDULES)
    mixed_precision: str = _option("no", "accelerate's mixed precision; the adapter's weights stay float32",
                                   MIXED_PRECISION)
    gradient_checkpointing: bool = _option(False, "recompute UNet (and VAE decoder) activations in the backward pass")
    face_id_weight: float = _option(0.1, "λ of the face-ID loss (DESIGN.md §2.5); 0 turns it off (no VAE decode)")
    identity_dropout: float = _option(
        0.1, "probability that a sample trains without its identity (E_r zeroed, no identity suffix in the prompt), "
             "for classifier-free guidance (our choice, DESIGN.md §2.6 [I])")
    resolution: int = _option(512, "target images: shorter side resized to this, then centre-cropped square")
    random_flip: bool = _option(False, "flip target images horizontally at random (our choice: off)")
    cache_features: bool = _option(
        True, "compute the frozen features (CLIP of references, VAE latents of targets) once and keep them")
    feature_cache_dir: str | None = _option(
        None, "keep the cached features as files in this folder instead of in memory (for datasets too large for RAM)")
    deterministic: bool = _option(
        False, "torch.use_deterministic_algorithms and per-image feature computation: bit-identical resumed runs")
    cpu: bool = _option(False, "train on the CPU even when a GPU is there (with `accelerate launch --multi_gpu`: "
                               "several CPU processes)")
    # --- checkpoints
    checkpoint_every: int = _option(1000, "save a checkpoint every this many optimizer steps")
    keep_checkpoints: int = _option(3, "keep the last this many checkpoints (0 keeps all)")
    resume: str | None = _option(None, "'latest' (the newest checkpoint in output_dir, if any) or a checkpoint folder")
    # --- logging
    log_with: str = _option("tensorboard", "experiment tracker", LOG_WITH)
    log_every: int = _option(10, "log losses and gates every this many optimizer steps")
    sample_every: int = _option(0, "log a sample grid (references | generations) every this many steps (0: never)")
    sample_prompts: list[str] = _option(
        None, "prompts of the sample grid (the identity suffix is appended)",
        default_factory=lambda: ["a portrait photo"])
    sample_identity: str | None = _option(None, "identity shown in the sample grid (default: the cache's first)")
    sample_steps: int = _option(20, "sampling steps (DDIM) of the sample grid")
    sample_guidance: float = _option(5.0, "classifier-free guidance scale of the sample grid")
    identity_in_negative: str = _option(
        NEGATIVE_IDENTITY_MODES[0], "what the negative half of the sample grid's classifier-free guidance gets: the "
        "null identity (IDAdapter: E_r = 0, as identity dropout trains it; Inv-Adapter: the EAA off), so the guidance "
        "scale scales the identity too, or the identity as the positive half", NEGATIVE_IDENTITY_MODES)

    def validate(self) -> None:
        """Raise ConfigError for missing or contradictory settings."""
        required = ("cache", "output_dir", "clip_vision") if self.method == "idadapter" else ("cache", "output_dir")
        for name in required:
            if not getattr(self, name):
                raise ConfigError(f"'{name}' is required: set it in the config file or pass --{_flag(name)}")
        if bool(self.pretrained) == bool(self.single_file):
            raise ConfigError("give the base model either as --pretrained (a diffusers folder) or as --single-file "
                              "(with --config-folder), not both or neither")
        if self.single_file and not self.config_folder:
            raise ConfigError("--single-file needs --config-folder: a local diffusers folder of the same model type "
                              "with its component configs and tokenizers, so nothing is downloaded")
        if self.face_id_weight < 0:
            raise ConfigError(f"face_id_weight must be >= 0, got {self.face_id_weight}")
        if self.method == "idadapter" and self.face_id_weight > 0 and not self.insightface_root:  # Inv-Adapter has none
            raise ConfigError("the face-ID loss (face_id_weight > 0) needs --insightface-root; pass --face-id-weight 0 "
                              "to train without it")
        if not 0 <= self.identity_dropout < 1:
            raise ConfigError(f"identity_dropout must be in [0, 1), got {self.identity_dropout}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        for name in ("num_refs", "max_steps", "batch_size", "gradient_accumulation_steps", "checkpoint_every",
                     "log_every", "resolution", "sample_steps", "mff_width", "mff_depth", "mff_heads", "inversion_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "keep_checkpoints", "sample_every", "mff_num_queries"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.mff_width % self.mff_heads:
            raise ConfigError(f"mff_width {self.mff_width} is not divisible by mff_heads {self.mff_heads}")
        for f in fields(self):
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{f.name} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _field_types() -> dict[str, tuple[type, bool, bool]]:
    """Per field: (scalar type, is a list, may be None)."""
    hints = typing.get_type_hints(FitConfig)
    kinds = {}
    for name, hint in hints.items():
        args = typing.get_args(hint)
        optional = type(None) in args
        if optional:
            hint = next(a for a in args if a is not type(None))
        is_list = typing.get_origin(hint) is list
        kinds[name] = (typing.get_args(hint)[0] if is_list else hint, is_list, optional)
    return kinds


def _coerce(name: str, value, source: str):
    scalar, is_list, optional = _field_types()[name]
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: '{name}' cannot be empty")
    if is_list:
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list):
            raise ConfigError(f"{source}: '{name}' must be a list of {scalar.__name__}, got {value!r}")
        return [_coerce_scalar(name, v, scalar, source) for v in values]
    return _coerce_scalar(name, value, scalar, source)


def _coerce_scalar(name: str, value, scalar: type, source: str):
    if scalar is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif scalar is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif scalar is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif scalar is str:
        if isinstance(value, (str, Path)):
            return str(value)
    raise ConfigError(f"{source}: '{name}' must be {scalar.__name__}, got {value!r}")


def read_config_file(path: str | Path) -> dict:
    """The settings in a .yaml/.yml or .toml file, as a flat dict of known field names (not yet checked)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"{path.name}: unknown config format '{suffix}'; use .yaml, .yml or .toml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path} could not be parsed: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of setting names to values, got a {type(data).__name__}")
    known = {f.name for f in fields(FitConfig)}
    for key in data:
        normalised = str(key).replace("-", "_")
        if normalised not in known:
            close = difflib.get_close_matches(normalised, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{path}: unknown setting '{key}'{hint}")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def resolve_config(config_file: str | Path | None = None, overrides: dict | None = None) -> FitConfig:
    """Defaults, then the file's values, then `overrides` (the command line); checked."""
    values = {}
    if config_file is not None:
        values.update({name: _coerce(name, v, str(config_file)) for name, v in read_config_file(config_file).items()})
    values.update({name: _coerce(name, v, "command line") for name, v in (overrides or {}).items()})
    config = FitConfig(**values)
    config.validate()
    return config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config FILE` and one flag per FitConfig field; flags not given are absent from the parsed namespace,
    so only what the user typed overrides the file."""
    parser.add_argument("--config", type=Path, help="a .yaml or .toml file of settings (flags below override it)")
    kinds = _field_types()
    for f in fields(FitConfig):
        scalar, is_list, optional = kinds[f.name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": f"{f.metadata['help']} (default: {default})"}
        if f.metadata["choices"]:
            kwargs["choices"] = f.metadata["choices"]
        if scalar is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif is_list:
            kwargs["nargs"] = "+"
        else:
            kwargs["type"] = scalar
        parser.add_argument(f"--{_flag(f.name)}", **kwargs)


def config_from_args(args: argparse.Namespace) -> FitConfig:
    overrides = {f.name: getattr(args, f.name) for f in fields(FitConfig) if hasattr(args, f.name)}
    return resolve_config(getattr(args, "config", None), overrides)


def save_config(config: FitConfig, path: str | Path) -> None:
    """The resolved settings as YAML, written atomically."""
    text = yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

