"""A diffusers guider built from a run's guidance settings: its class, its options checked against the class's
signature, and the layers a perturbation guider acts on, checked against the network.

Layer paths name a ``torch.nn.ModuleList`` of blocks (every block of it) or one block of it (``...attentions.0``);
they become diffusers' ``LayerSkipConfig(indices, fqn)``. A path that matches nothing, or blocks where the guider
would change nothing (PAG on blocks without self-attention), is refused: the guider would silently equal CFG.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch

from diffexp.errors import DiffexpError
from diffexp.guidance_settings import GuidanceSettings
from diffexp.methods import SET_BY_RUN, refuse, why_prediction
from diffexp.sampling.guidance import Guidance, guidance_for
from diffexp.sampling.models import LoadedModel, load_model
from diffexp.sampling.network import Network
from diffexp.sampling.noise import NoiseSchedule
from diffexp.settings import model_config

# perturbation guiders: the parameter that takes the layers, and what each layer skips (diffusers' own choices)
LAYER_OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    # Ahn et al. 2024: self-attention scores replaced by identity (the value projection)
    "PerturbedAttentionGuidance": (
        "perturbed_guidance_config",
        {"skip_attention": False, "skip_attention_scores": True, "skip_ff": False},
    ),
    # SD3.5: the whole block skipped where diffusers knows the block, else its attention
    "SkipLayerGuidance": ("skip_layer_config", {"skip_attention": True, "skip_attention_scores": False}),
    # Karras et al. 2024 without a weak model: the layers' outputs dropped with probability ``dropout``
    "AutoGuidance": ("auto_guidance_config", {}),
}
LAYER_KINDS = {"PerturbedAttentionGuidance": "attention", "SkipLayerGuidance": "block", "AutoGuidance": "block"}
NOT_OPTIONS = {"self", "enabled"}


def guider_class(settings: GuidanceSettings) -> type:
    """The diffusers guider class the settings name, or a refusal."""
    import diffusers.guiders as guiders
    from diffusers.guiders.guider_utils import BaseGuidance

    refuse(settings.method, settings.diffusers_class)
    cls = getattr(guiders, settings.diffusers_class, None)
    if not (isinstance(cls, type) and issubclass(cls, BaseGuidance)):
        raise DiffexpError(
            f"Guidance '{settings.method}' declares diffusers_class: {settings.diffusers_class}, which is no "
            "diffusers guider class (diffusers.guiders)."
        )
    return cls


def check_options(settings: GuidanceSettings) -> dict[str, Any]:
    """The guider's keyword arguments: the file's options, guidance_scale and guidance_rescale; an option the
    class does not take is refused, with the ones it does."""
    cls = guider_class(settings)
    by_run = {*SET_BY_RUN, *(["guidance_scales"] if settings.scale_levels else [])}
    params = {k for k in inspect.signature(cls.__init__).parameters if k not in NOT_OPTIONS | by_run}
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.options}
    unknown = sorted(set(options) - params)
    if unknown:
        raise DiffexpError(
            f"Guidance option(s) {', '.join(f'guidance.{k}' for k in unknown)} are not options of "
            f"{settings.diffusers_class}; it takes: {', '.join(sorted(params))} (or the aliases in "
            f"configs/guidance/{settings.method}.yaml)."
        )
    if settings.weak_model is not None and settings.diffusers_class != "AutoGuidance":
        raise DiffexpError(f"guidance.weak_model applies to autoguidance only, not to {settings.method}.")
    scale = settings.scale + settings.scale_offset
    levels = settings.scale_levels  # FDG: one scale per frequency level
    scales = {"guidance_scales": [scale * f for f in levels]} if levels else {"guidance_scale": scale}
    return {**options, **scales, "guidance_rescale": settings.rescale}


def check_levels(settings: GuidanceSettings, shape: Sequence[int]) -> None:
    """Refuse a sample that FDG's Laplacian pyramid would pad: kornia pads the sides unless one is a power of two
    and both halve evenly at every level, and diffusers' guider then returns the padded size."""
    if not settings.scale_levels:
        return
    h, w = shape[-2:]
    stride = 2 ** (len(settings.scale_levels) - 1)
    if (h & (h - 1) and w & (w - 1)) or h % stride or w % stride:
        raise DiffexpError(
            f"guidance={settings.method} cannot guide samples of {h}x{w}: its Laplacian pyramid of "
            f"{len(settings.scale_levels)} levels (kornia) pads a side unless one side is a power of two and both "
            f"divide by {stride}, and the guided output would then have the padded size. Use fewer levels "
            "(guidance.scale_levels) or another size."
        )


def check_prediction(settings: GuidanceSettings, prediction_type: str, model: str) -> None:
    """Refuse a method whose formula assumes another model output (CFG-Zero* on a non-flow model)."""
    if settings.prediction_types is not None and prediction_type not in settings.prediction_types:
        raise DiffexpError(
            f"guidance={settings.method} cannot guide {model}, which predicts {prediction_type}: it is for "
            f"{', '.join(settings.prediction_types)} models only, because {why_prediction(settings)}."
        )


def layer_configs(module: torch.nn.Module, paths: Sequence[str], kind: str, skip: dict[str, Any]) -> list[Any]:
    """diffusers' LayerSkipConfig of each ModuleList the paths name, or a refusal naming the path."""
    from diffusers.hooks import LayerSkipConfig

    chosen: dict[str, list[int]] = {}
    for path in paths:
        target = module.get_submodule(path) if _has(module, path) else None
        parent, _, last = path.rpartition(".")
        if isinstance(target, torch.nn.ModuleList):
            chosen.setdefault(path, []).extend(range(len(target)))
        elif target is not None and last.isdigit() and isinstance(module.get_submodule(parent), torch.nn.ModuleList):
            chosen.setdefault(parent, []).append(int(last))
        else:
            stacks = [n for n, m in module.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)][:12]
            what = "matches no module" if target is None else "is no block of a torch.nn.ModuleList"
            raise DiffexpError(
                f"guidance.layers: '{path}' {what} of {type(module).__name__}. Name a stack of blocks or one block "
                f"of it, e.g. {', '.join(stacks)}."
            )
    for fqn, indices in chosen.items():
        blocks = [module.get_submodule(f"{fqn}.{i}") for i in indices]
        if kind == "attention" and not any(_self_attention(b) for b in blocks):
            raise DiffexpError(
                f"guidance.layers: '{fqn}' {indices} hold no self-attention, so perturbed-attention guidance would "
                "change nothing there. Name blocks with attention layers."
            )
    return [LayerSkipConfig(indices=sorted(set(i)), fqn=f, **skip) for f, i in chosen.items()]


def _has(module: torch.nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _self_attention(block: torch.nn.Module) -> bool:
    from diffusers.models.attention_processor import Attention

    return any(isinstance(m, Attention) and not m.is_cross_attention for m in block.modules())


def _whole_blocks(module: torch.nn.Module, configs: list[Any]) -> bool:
    """Whether diffusers can skip each named block whole (it knows the block's class), as SLG means."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    for config in configs:
        for i in config.indices:
            try:
                TransformerBlockRegistry.get(type(module.get_submodule(f"{config.fqn}.{i}")))
            except (ValueError, KeyError):
                return False
    return True


def build_guider(settings: GuidanceSettings, module: torch.nn.Module, default_layers: tuple[str, ...] | None) -> Any:
    """The guider of these settings for ``module``; ``default_layers``: the model family's, where none are named."""
    cls = guider_class(settings)
    options = check_options(settings)
    if settings.diffusers_class in LAYER_OPTIONS:
        option, skip = LAYER_OPTIONS[settings.diffusers_class]
        if settings.weak_model is not None:
            options[option] = []  # the weak model's pass needs no hooks
        else:
            paths = settings.layers or default_layers
            if not paths:
                raise DiffexpError(
                    f"guidance={settings.method} needs layers on {type(module).__name__}: set guidance.layers=[...]."
                )
            if settings.diffusers_class == "AutoGuidance":
                skip = {"dropout": options.pop("dropout", None) or 1.0, "skip_attention": True}
            configs = layer_configs(module, paths, LAYER_KINDS[settings.diffusers_class], skip)
            if settings.diffusers_class != "PerturbedAttentionGuidance" and not _whole_blocks(module, configs):
                for c in configs:  # blocks diffusers cannot skip whole (a UNet's attention): their attention
                    c.skip_attention, c.skip_ff = True, False
            options[option] = configs
    logging.getLogger("diffusers.guiders.guider_utils").setLevel(logging.ERROR)  # "experimental" at every build
    try:
        return cls(**options)
    except (ValueError, TypeError) as err:
        what = f"guidance={settings.method}: {settings.diffusers_class}"
        raise DiffexpError(f"{what} refuses its options: {err}") from None


def weak_network(settings: GuidanceSettings, loaded: LoadedModel, device: torch.device, dtype: torch.dtype) -> Any:
    """Autoguidance's weaker network (a Network), checked to be of the model's family; None without one."""
    if settings.weak_model is None or not settings.enabled:
        return None
    weak = load_model(model_config(settings.weak_model), device, dtype)
    mine = (loaded.kind, loaded.num_classes, loaded.prediction_type, tuple(loaded.sample_shape))
    theirs = (weak.kind, weak.num_classes, weak.prediction_type, tuple(weak.sample_shape))
    if mine != theirs:
        raise DiffexpError(
            f"guidance.weak_model={settings.weak_model} is not of {loaded.name}'s family: (kind, classes, prediction, "
            f"sample shape) {theirs} against {mine}. Autoguidance needs a weaker model of the same family."
        )
    return Network(weak.model)


def guidance_of(
    settings: GuidanceSettings,
    loaded: LoadedModel,
    family: Any,
    schedule: NoiseSchedule,
    timesteps: tuple[float, ...],
    weak: Network | None = None,
) -> Guidance:
    """The guidance object of a run: the guider of its method for the model (``family``: its adapter class, which
    declares the default layers), or none where it does not guide."""
    if not settings.enabled:
        return Guidance(settings)
    check_prediction(settings, loaded.prediction_type, loaded.name)
    check_levels(settings, loaded.sample_shape)
    kind = LAYER_KINDS.get(settings.diffusers_class, "block")
    guider = build_guider(settings, loaded.model, family.default_layers(kind, loaded.model))
    return guidance_for(settings, schedule, guider, timesteps, weak)
