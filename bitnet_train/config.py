"""Hydra composition for `python -m bitnet_train`: finds configs/, turns Hydra's errors into
one-line ConfigErrors (unknown recipe, unknown key, bad value)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from .errors import ConfigError


def config_dir() -> Path:
    """configs/ ships inside the package (wheel) or beside it (source checkout, editable)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise ConfigError(f"configs/train.yaml not found next to {here}")


def available_recipes() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "recipe").rglob("*.yaml"))


def compose_config(overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(config_name="train", overrides=[_schema_override(o) for o in overrides])
    except HydraException as e:
        raise ConfigError(_explain(e, overrides)) from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad configuration: {e}".splitlines()[0]) from None


def _schema_fields() -> dict[str, set[str]]:
    """Config groups whose keys are defined by a dataclass: every field may be overridden, also
    one the group's YAML leaves at its default."""
    from .data import DataConfig
    from .model import ModelConfig, QuantConfig
    from .schedule import OptimConfig

    def names(cls):
        return set(cls.__dataclass_fields__)

    return {
        "data": names(DataConfig) - {"seed"},
        "quant": names(QuantConfig),
        "optim": names(OptimConfig),
        "model": names(ModelConfig) | {"init_from", "gguf_file"},
    }


def _schema_override(override: str) -> str:
    """`group.field=value` -> `++group.field=value` for a dataclass field the group's YAML may lack."""
    key, sep, value = override.partition("=")
    group, dot, field = key.partition(".")
    if sep and dot and not key.startswith(("+", "~")) and field in _schema_fields().get(group, ()):
        return f"++{key}={value}"
    return override


def _explain(e: Exception, overrides: list[str]) -> str:
    msg = str(e)
    if e.__cause__ is not None:
        msg += "\n" + str(e.__cause__)
    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+~") == "recipe" and f"recipe/{value}" in msg:
            return f"unknown recipe {value!r}; available: {', '.join(available_recipes())}"
    if "not in struct" in msg:
        key = msg.split("'")[1] if "'" in msg else "?"
        return f"unknown config key {key!r} (use +{key}=... only to add a new key on purpose)"
    if "Could not find '" in msg:
        missing = msg.split("Could not find '")[1].split("'")[0]  # e.g. quant/foo
        group, _, option = missing.rpartition("/")
        options = sorted(p.stem for p in (config_dir() / group).glob("*.yaml")) if group else []
        return f"unknown {group or 'config'} option {option!r}; available: {', '.join(options)}"
    return msg.splitlines()[0]
