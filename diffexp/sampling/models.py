"""Models by name: Hub and local diffusers folders, the exact digits denoiser, and a tiny random UNet.

Every model is called like ``UNet2DModel``: ``model(sample, timestep[, class_labels]).sample`` predicts the noise,
v or the clean sample (its scheduler config's ``prediction_type``), and ``model.config`` has ``sample_size`` and
``in_channels``. Each comes with the scheduler config it was trained with. A class-conditional UNet
(``num_class_embeds``) has ``num_classes`` classes and, if trained with label dropout, a null class for guidance.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, DiTTransformer2DModel, UNet2DModel

from diffexp.config import WEIGHTS_DIR, ModelConfig, ModelSource, Parameterisation, config_dir
from diffexp.errors import DiffexpError
from diffexp.sampling.flow import FLOW_PREDICTION, is_flow
from diffexp.sampling.ideal import DDPM_SCHEDULER_CONFIG, FLOW_SCHEDULER_CONFIG, DigitsIdealDenoiser
from diffexp.sampling.latent import (
    LATENT_PIPELINES,
    NOT_SUPPORTED,
    LatentModel,
    load_latent,
    loading_options,
    pipeline_class,
    quiet_loading,
)
from diffexp.sampling.mmdit import TRANSFORMER_LATENTS

OFFLINE_MODELS = "model=digits-unet (the default), model=digits-ideal, model=tiny, or model=local model.path=DIR"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    scheduler_config: dict[str, Any]
    name: str
    id: str | None = None
    revision: str | None = None
    load_s: float = 0.0
    num_classes: int | None = None  # class-conditional: labels 0 .. num_classes - 1
    null_class: int | None = None  # the label of the unconditional half of guidance
    latent: LatentModel | None = None  # a latent model (SD, DiT): its pipeline, VAE and latent size

    @property
    def kind(self) -> str:
        """pixel, text (prompts: Stable Diffusion) or class (labels: DiT, in latent or pixel space); a
        class-conditional UNet is pixel."""
        if self.latent is None:
            return "class" if isinstance(self.model, DiTTransformer2DModel) else "pixel"
        return self.latent.kind

    def to_pixels(self, x: torch.Tensor, preview: str = "vae") -> torch.Tensor:
        """x or x0 as an image in [-1, 1]: itself for a pixel model, else decoded (or previewed) from latents."""
        if self.latent is None:
            return x
        return self.latent.preview(x) if preview == "latent" else self.latent.decode(x)

    @property
    def prediction_type(self) -> str:
        """epsilon, v_prediction or sample; flow_prediction for a flow-matching model (a FlowMatch config)."""
        return prediction_type_of(self.scheduler_config)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        cfg = self.model.config
        if self.latent is not None:
            return (self.latent.channels, *self.latent.size)
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (cfg.in_channels, size, size)


def prediction_type_of(scheduler_config: dict[str, Any]) -> str:
    """epsilon, v_prediction or sample; flow_prediction for a flow-matching model (a FlowMatch config)."""
    if is_flow(scheduler_config):
        return FLOW_PREDICTION
    return str(scheduler_config.get("prediction_type") or "epsilon")


def is_pixel_dit(source: str, revision: str | None = None) -> bool:
    """Whether ``source`` is a DiTPipeline folder without a VAE (``"vae": [null, null]``): a DiT on pixels, as
    scripts/train.py saves ``network: dit``."""
    try:
        index = DiffusionPipeline.load_config(source, revision=revision)
    except Exception:  # the Hub client raises many types; the pipeline loader reports the failure
        return False
    vae = index.get("vae")
    return index.get("_class_name") == "DiTPipeline" and isinstance(vae, list) and vae[0] is None


def load_pretrained(
    source: str, revision: str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A diffusers pipeline folder or Hub id -> (unet in ``dtype``, scheduler config); a pixel-space DiT folder ->
    (its transformer, scheduler config). Training and sampling both use this."""
    pixel_dit = is_pixel_dit(source, revision)
    extra: dict[str, Any] = {"vae": None} if pixel_dit else {}
    try:
        with quiet_loading():
            pipe = DiffusionPipeline.from_pretrained(source, revision=revision, **extra, **loading_options(dtype))
    except Exception as err:  # the Hub client raises many types; all mean "could not load"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DiffexpError(
            f"Could not load the diffusers model '{source}'{f' at revision {revision}' if revision else ''}: "
            f"{reason[:300]}. If it is a Hub id, this machine may be offline (HF_HUB_OFFLINE is "
            f"{'set' if _offline() else 'not set'}) or the id may be wrong; if it is a folder, it must hold "
            f"model_index.json with unet/ and scheduler/, as DDPMPipeline.save_pretrained writes. "
            f"Offline you can use {OFFLINE_MODELS}."
        ) from None
    unet = getattr(pipe, "transformer" if pixel_dit else "unet", None)
    scheduler = getattr(pipe, "scheduler", None)
    if unet is None or scheduler is None:
        raise DiffexpError(f"The diffusers model '{source}' has no unet and scheduler, which diffexp needs.")
    return unet, dict(scheduler.config)


def tiny_unet(sample_size: int = 16, num_classes: int | None = None) -> UNet2DModel:
    """A small random-weight UNet2DModel (fixed init seed), for tests and smoke runs; with ``num_classes``
    class-conditional, with one more embedding for the null class."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNet2DModel(
            num_class_embeds=None if num_classes is None else num_classes + 1,
            sample_size=sample_size,
            in_channels=3,
            out_channels=3,
            layers_per_block=1,
            block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
        )


def load_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Build or load the model that ``cfg`` names, in eval mode on ``device`` and in ``dtype``."""
    start = time.perf_counter()
    source = ModelSource(cfg.source)
    built_here = {"prediction_type": cfg.prediction_type or "epsilon"}
    if source == ModelSource.ideal:
        if cfg.parameterisation == Parameterisation.flow:
            built_here = {"prediction_type": check_flow_ideal(cfg)}
        model: torch.nn.Module = DigitsIdealDenoiser(cfg.sample_size or 32, cfg.std, **built_here)
        flow = cfg.parameterisation == Parameterisation.flow  # a FlowMatch config says what the model predicts
        scheduler_config, ident = (FLOW_SCHEDULER_CONFIG if flow else DDPM_SCHEDULER_CONFIG | built_here), None
    elif source == ModelSource.random:
        model = tiny_unet(cfg.sample_size or 16, cfg.num_classes)
        scheduler_config, ident = DDPM_SCHEDULER_CONFIG | built_here, None
    elif source == ModelSource.hub:
        if not cfg.id:
            raise DiffexpError("model=hub needs model.id=<a Hub id>, e.g. model.id=google/ddpm-cifar10-32.")
        if (latent := _latent(cfg.id, cfg, device, dtype, cfg.id)) is not None:
            return latent
        model, scheduler_config = load_pretrained(cfg.id, cfg.revision, dtype)
        ident = cfg.id
    elif source == ModelSource.package:
        path = WEIGHTS_DIR / str(cfg.path)
        if not cfg.path or not (path / "model_index.json").is_file():
            shipped = sorted(p.parent.name for p in WEIGHTS_DIR.glob("*/model_index.json"))
            recipe = config_dir() / f"train-{cfg.path}.yaml"
            train = (
                f" Its weights are not trained yet: `python scripts/train.py --config-name {recipe.stem}` trains them "
                f"into outputs/train/{cfg.path}/model (sample it with model=local model.path=that folder)."
                if recipe.is_file()
                else ""
            )
            raise DiffexpError(
                f"No model '{cfg.path}' ships with diffexp; shipped: {', '.join(shipped) or 'none'}.{train}"
            )
        model, scheduler_config = load_pretrained(str(path), dtype=dtype)
        ident = f"diffexp/weights/{cfg.path}"
    else:
        if not cfg.path:
            raise DiffexpError("model=local needs model.path=DIR, a folder saved by DDPMPipeline.save_pretrained.")
        path = Path(cfg.path).expanduser()
        if not path.is_dir():
            raise DiffexpError(f"model.path={cfg.path} is not a folder. {OFFLINE_MODELS} work offline.")
        if (latent := _latent(str(path), cfg, device, dtype, str(path.resolve()))) is not None:
            return latent
        model, scheduler_config = load_pretrained(str(path), dtype=dtype)
        ident = str(path.resolve())
    if cfg.prediction_type and source not in (ModelSource.ideal, ModelSource.random):
        raise DiffexpError(
            f"model.prediction_type={cfg.prediction_type} applies only to digits-ideal and tiny; a trained model's "
            "prediction type is the one in its scheduler config."
        )
    check_no_t5(cfg, True)
    # torch's own cast: diffusers' ModelMixin.to warns on any dtype, and pretrained models already load in it
    model = torch.nn.Module.to(model, device=device, dtype=dtype).eval().requires_grad_(False)
    num_classes, null_class = classes(model, cfg)
    return LoadedModel(
        model, scheduler_config, cfg.name, ident, cfg.revision, time.perf_counter() - start, num_classes, null_class
    )


def _latent(source: str, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, ident: str) -> LoadedModel | None:
    """A latent pipeline (SD, DiT) loaded with its own diffusers class; None for any other pipeline."""
    class_name = pipeline_class(source, cfg.revision)
    if (class_name not in LATENT_PIPELINES and class_name not in NOT_SUPPORTED) or is_pixel_dit(source, cfg.revision):
        return None
    start = time.perf_counter()
    if cfg.prediction_type or cfg.num_classes is not None or cfg.null_class is not None:
        raise DiffexpError(
            "model.prediction_type, model.num_classes and model.null_class do not apply to a latent pipeline: they "
            "come from its scheduler config and its denoiser."
        )
    family = TRANSFORMER_LATENTS.get(str(class_name))
    check_no_t5(cfg, family is None)
    components = family.components(DiffusionPipeline.load_config(source, revision=cfg.revision), cfg) if family else {}
    pipe = load_latent(source, cfg.revision, str(class_name), device, dtype, components)
    kind = LATENT_PIPELINES[str(class_name)]
    latent = (family or LatentModel)(pipe, kind, (0, 0))
    denoiser = latent.denoiser
    latent.set_size(None, None)
    # DiTPipeline: classes 0 .. N-1, the null class N (its label dropout embedding)
    num_classes = int(denoiser.config.num_embeds_ada_norm) if kind == "class" else None
    load_s = time.perf_counter() - start
    return LoadedModel(
        denoiser, dict(pipe.scheduler.config), cfg.name, ident, cfg.revision, load_s, num_classes, num_classes, latent
    )


def check_no_t5(cfg: ModelConfig, no_t5: bool) -> None:
    """``model.t5=false`` on a model without a T5 encoder: refused (it would be ignored)."""
    if no_t5 and not cfg.t5:
        raise DiffexpError(f"model.t5=false applies to SD3 (its optional T5 encoder); {cfg.name} has no T5 encoder.")


def classes(model: torch.nn.Module, cfg: ModelConfig) -> tuple[int | None, int | None]:
    """(num_classes, null_class) of a class-conditional UNet: the config's, else its ``num_class_embeds`` (no null
    class: guidance needs ``model.null_class``); (None, None) for an unconditional model."""
    config = getattr(model, "config", None)
    embeds = getattr(config, "num_class_embeds", None)
    if isinstance(model, DiTTransformer2DModel):  # a pixel-space DiT: classes 0..N-1 and the null class N
        embeds = config.num_embeds_ada_norm + 1
        if cfg.null_class is None and cfg.num_classes in (None, embeds - 1):
            return embeds - 1, embeds - 1
    if embeds is None:
        if cfg.num_classes is not None:
            raise DiffexpError(f"model.num_classes={cfg.num_classes}, but {cfg.name} is not class-conditional.")
        return None, None
    if cfg.source == ModelSource.random and cfg.num_classes is not None:
        return cfg.num_classes, cfg.num_classes  # tiny_unet: the extra embedding is the null class
    num_classes = cfg.num_classes or embeds
    if not 0 < num_classes <= embeds or (cfg.null_class is not None and not 0 <= cfg.null_class < embeds):
        raise DiffexpError(
            f"model.num_classes={cfg.num_classes} / model.null_class={cfg.null_class} do not fit a UNet with "
            f"{embeds} class embeddings."
        )
    return num_classes, cfg.null_class


def _offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def check_flow_ideal(cfg: ModelConfig) -> str:
    """``model.parameterisation``: vp or flow; flow is the velocity (its prediction type is fixed)."""
    if cfg.prediction_type not in (None, FLOW_PREDICTION):
        raise DiffexpError(
            f"model.prediction_type={cfg.prediction_type} does not apply with model.parameterisation=flow: a flow "
            "model predicts the velocity v = eps - x0 (flow_prediction)."
        )
    return FLOW_PREDICTION
