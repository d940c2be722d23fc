"""The configs: every group composes, scheduler files override only what they mean to (the rest inherits the
model's scheduler config), the schema is strict."""

from __future__ import annotations

import pytest
from conftest import ROOT, compose
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from diffexp.catalog import DECLARED, SCHEDULERS, option_signatures, resolve_class
from diffexp.config import unknown_keys


def options_of(node: dict) -> dict:
    """A scheduler node without its declarations (class, stochastic, theory_order ...)."""
    return {k: v for k, v in node.items() if k not in DECLARED}


SCHEDULER_FILES = sorted(p.stem for p in (ROOT / "configs" / "scheduler").glob("*.yaml") if not p.stem.startswith("k-"))
MODEL_FILES = sorted(p.stem for p in (ROOT / "configs" / "model").glob("*.yaml"))


def test_there_is_one_scheduler_file_per_usable_scheduler() -> None:
    assert sorted(SCHEDULERS) == SCHEDULER_FILES


@pytest.mark.parametrize("name", SCHEDULER_FILES)
def test_scheduler_file_values_are_diffusers_defaults(name: str) -> None:
    spec = OmegaConf.to_container(compose(f"scheduler={name}").scheduler, resolve=True)
    assert spec["name"] == name
    options = options_of(spec)
    init, step = option_signatures(resolve_class(name))
    for key, value in options.items():
        param = init.get(key) or step.get(key)
        assert param is not None, f"{name}.{key} is not an option of {resolve_class(name).__name__}"
        if value is not None:  # null: the model's scheduler config decides
            default = param.default
            assert value == (list(default) if isinstance(default, tuple) else default), f"{name}.{key}"


# what a scheduler file may set: step arguments (no model config has them) and what its declarations depend on
EXPLICIT = {"eta", "use_clipped_model_output", "s_churn", "s_tmin", "s_tmax", "s_noise", "order"}
DEFINING = {"solver_order", "algorithm_type", "disable_corrector", "stochastic_sampling"}


@pytest.mark.parametrize("name", SCHEDULER_FILES)
def test_scheduler_files_leave_model_options_unset(name: str) -> None:
    options = options_of(OmegaConf.to_container(compose(f"scheduler={name}").scheduler, resolve=True))
    _, step = option_signatures(resolve_class(name))
    set_here = {k for k, v in options.items() if v is not None}
    assert set_here <= EXPLICIT | DEFINING, f"{name} overrides the model's {set_here - EXPLICIT - DEFINING}"
    assert {k for k in set_here if k not in step} <= DEFINING


SD_LIKE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


@pytest.mark.parametrize("name", ["dpmsolver", "euler", "ddim", "pndm"])
def test_unset_scheduler_options_inherit_the_model_config(name: str) -> None:
    from diffexp.sampling.schedulers import build_scheduler

    spec = OmegaConf.to_container(compose(f"scheduler={name}").scheduler, resolve=True)
    built = build_scheduler(spec.pop("name"), {"_class_name": "PNDMScheduler", **SD_LIKE}, spec)
    config = built.effective_config()["config"]
    assert config["timestep_spacing"] == "leading" and config["steps_offset"] == 1  # recorded as in force
    if name == "pndm":
        assert config["skip_prk_steps"] is True
    overridden = build_scheduler(name, SD_LIKE, {**spec, "timestep_spacing": "trailing"})
    assert overridden.scheduler.config.timestep_spacing == "trailing"


@pytest.mark.parametrize("name", MODEL_FILES)
def test_model_files_compose_into_the_schema(name: str) -> None:
    cfg = compose(f"model={name}")
    assert cfg.model.name == name and not unknown_keys(cfg)


def test_schema_rejects_unknown_keys_and_wrong_types() -> None:
    with pytest.raises(ConfigCompositionException):
        compose("stepz=3")
    with pytest.raises(ConfigCompositionException):
        compose("device=3", "steps=three")
    assert sorted(unknown_keys(compose("+stepz=3", "+model.colour=1"))) == ["model.colour", "stepz"]


def test_run_folder_is_named_for_what_it_holds() -> None:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    def run_dir(*overrides: str) -> str:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            return hydra_compose("run", list(overrides), return_hydra_config=True).hydra.run.dir

    assert run_dir("scheduler=dpmsolver", "scheduler.use_karras_sigmas=true", "steps=20").endswith(
        "-digits-unet-dpmsolver-karras-20"
    )
    assert run_dir("model=digits-ideal", "scheduler=ddim", "steps=5").endswith("-digits-ideal-ddim-5")
    # a name that would make a folder path keeps only [A-Za-z0-9._+-]: the ${safe:...} resolver
    assert run_dir("model.name=a/b", "scheduler=euler", "steps=3").endswith("-a_b-euler-3")
