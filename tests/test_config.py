"""Every recipe and config option composes and validates against the dataclasses that consume it.
Recipes are found on disk (recursively), not from a hand-kept list."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from bitnet_train.config import available_recipes, compose_config, config_dir
from bitnet_train.errors import ConfigError
from bitnet_train.model import ModelConfig, QuantConfig
from bitnet_train.schedule import OptimConfig

RECIPES = sorted(p.stem for p in (config_dir() / "recipe").rglob("*.yaml"))
GROUP_OPTIONS = [(g.name, p.stem) for g in sorted(config_dir().iterdir()) if g.is_dir() and g.name != "recipe"
                 for p in sorted(g.glob("*.yaml"))]
MODEL_SOURCE_KEYS = {"init_from", "gguf_file"}


def _validate(cfg):
    from bitnet_train.data import DataConfig

    c = OmegaConf.to_container(cfg, resolve=True)
    QuantConfig.from_dict(c["quant"])
    OptimConfig.from_dict(c["optim"])
    DataConfig(**c["data"])
    model = c["model"]
    assert set(model) - MODEL_SOURCE_KEYS <= set(ModelConfig.__dataclass_fields__), "unknown model keys"
    if not model.get("init_from"):
        ModelConfig(**{**{k: v for k, v in model.items() if k not in MODEL_SOURCE_KEYS}, "vocab_size": 64})
    assert cfg.trainer.max_steps > 0


def test_recipes_are_found():
    assert RECIPES == available_recipes()
    assert {"shakespeare_tiny", "smollm2_135m_1p58"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("quant", ["ternary", "none"])
def test_every_recipe_composes_and_validates(recipe, quant):
    cfg = compose_config([f"recipe={recipe}", f"quant={quant}"])
    assert cfg.name == recipe
    _validate(cfg)


@pytest.mark.parametrize("group,option", GROUP_OPTIONS)
def test_every_group_option_composes(group, option):
    _validate(compose_config([f"{group}={option}"]))


def test_recipe_documents_exist_for_every_recipe():
    docs = Path(config_dir()).parent / "recipes"
    for r in RECIPES:
        assert (docs / f"{r}.md").is_file(), f"recipes/{r}.md missing"


@pytest.mark.parametrize("overrides,needle", [
    (["recipe=nope"], "unknown recipe 'nope'"),
    (["quant=int4"], "unknown quant option 'int4'"),
    (["trainer.max_stepz=3"], "unknown config key 'trainer.max_stepz'"),
    (["modle.hidden_size=3"], "unknown config key"),
])
def test_bad_overrides_give_one_clear_error(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        compose_config(overrides)
