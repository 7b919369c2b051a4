"""`python -m bitnet_train recipe=NAME key=value ...` — a Hydra application.

    python -m bitnet_train recipe=shakespeare_tiny trainer.max_steps=100        # one run
    python -m bitnet_train recipe=shakespeare_tiny --cfg job                    # print the composed config
    python -m bitnet_train -m recipe=shakespeare_tiny optim.lr=1e-3,3e-3        # a sweep: one run dir per job
    python -m bitnet_train --help                                                # recipes and config groups

Plain `key=value` runs compose the config with Hydra's compose API (one-line errors, today's
run-directory layout). Anything for Hydra's own command line (--cfg, --info, --help, -m, shell
completion, hydra.* or hydra/launcher=... overrides) goes through @hydra.main, after the same
one-line validation of the overrides (a sweep's first value of each swept key). The run directory
is run_dir= when given, else Hydra's output directory: hydra.run.dir (default
runs/<name>-<quant>/<stamp>, as without Hydra) or, in a sweep, hydra.sweep.dir/<job number>.
"""

from __future__ import annotations

import sys

from .cli_errors import run_cli

HYDRA_PREFIXES = ("hydra.", "hydra/", "+hydra", "++hydra", "~hydra")


def _split(argv: list[str]):
    """(Hydra's parsed flags, the overrides, whether Hydra's command line is asked for)."""
    from hydra._internal.utils import get_args_parser

    args, rest = get_args_parser().parse_known_args(argv)
    overrides = list(args.overrides) + [r for r in rest if not r.startswith("-")]
    hydra_cli = len(overrides) != len(argv) or any(o.startswith(HYDRA_PREFIXES) for o in overrides)
    return args, overrides, hydra_cli


def _validation_overrides(overrides: list[str]) -> list[str]:
    """The job overrides to compose once for validation: hydra.* dropped, each sweep at its first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from .errors import ConfigError

    out, parser, parsed = [], OverridesParser.create(), []
    for line in overrides:
        if line.startswith(HYDRA_PREFIXES):
            continue
        try:
            parsed += parser.parse_overrides([line])
        except HydraException as e:
            raise ConfigError(f"override {line!r} does not parse: {str(e).splitlines()[0]}") from None
    for o in parsed:
        if o.is_sweep_override():
            first = next(iter(o.sweep_string_iterator()), None)
            if first is None:
                raise ConfigError(f"the sweep {o.input_line!r} has no values")
            prefix = o.input_line[:len(o.input_line) - len(o.input_line.lstrip("+~"))]
            out.append(f"{prefix}{o.key_or_group}={first}")
        else:
            out.append(o.input_line)
    return out


def _hydra_app(argv: list[str], overrides: list[str]) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from .config import _schema_override, config_dir
    from .errors import BitNetError

    @hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
    def task(cfg) -> None:
        from .train import run

        if not cfg.run_dir:
            with open_dict(cfg):
                cfg.run_dir = HydraConfig.get().runtime.output_dir
        try:
            run(cfg)
        except BitNetError as e:  # as without Hydra: one line, not Hydra's traceback
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(getattr(e, "exit_code", 2)) from None

    flags = [a for a in argv if a not in set(overrides)]
    # Hydra wants the overrides last; dataclass fields a group's YAML leaves out are set with ++ (as compose_config does)
    saved = sys.argv
    sys.argv = [saved[0] if saved else "bitnet_train", *flags, *(_schema_override(o) for o in overrides)]
    try:
        task()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def main(argv: list[str] | None = None) -> int:
    from .extras import require

    argv = sys.argv[1:] if argv is None else list(argv)
    code = run_cli(lambda: require("train", "training (python -m bitnet_train)"))
    if code:
        return code
    from .config import compose_config

    args, overrides, hydra_cli = _split(argv)
    if not hydra_cli:
        def go():
            from .train import run

            run(compose_config(argv))

        return run_cli(go)
    if not (args.help or args.hydra_help or args.shell_completion or args.info):
        code = run_cli(lambda: compose_config(_validation_overrides(overrides)))
        if code:
            return code
    return _hydra_app(argv, overrides)


if __name__ == "__main__":
    sys.exit(main())
