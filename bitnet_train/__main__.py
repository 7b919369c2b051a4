"""`python -m bitnet_train recipe=NAME key=value ...`"""

from __future__ import annotations

import sys

from .cli_errors import run_cli


def main(argv: list[str] | None = None) -> int:
    from .extras import require

    argv = sys.argv[1:] if argv is None else argv
    code = run_cli(lambda: require("train", "training (python -m bitnet_train)"))
    if code:
        return code
    from .config import compose_config

    if argv and argv[0] in ("-h", "--help"):
        from .config import available_recipes

        print(__doc__.strip())
        print("recipes: " + ", ".join(available_recipes()))
        print("config groups: model, quant, data, optim, trainer, logger, callbacks (see configs/)")
        return 0

    def go():
        from .train import run

        run(compose_config(argv))

    return run_cli(go)


if __name__ == "__main__":
    sys.exit(main())
