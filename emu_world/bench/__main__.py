"""``python -m emu_world.bench <benchmark> [key=value ...]``; ``--help`` lists the benchmarks."""

from __future__ import annotations

import json
import sys

from omegaconf import DictConfig

from emu_world.bench import BENCHMARKS, run_benchmark
from emu_world.config import CONFIG_DIR
from emu_world.errors import reports_user_errors

USAGE = "usage: python -m emu_world.bench <benchmark> [key=value ...]"


def usage() -> str:
    lines = [USAGE, "", "benchmarks (each configured by configs/bench/<benchmark>.yaml; "
             "`python -m emu_world.bench <benchmark> --help` shows its settings):"]
    lines += [f"  {name:<12} {text}" for name, (_, text) in BENCHMARKS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import hydra

    argv = sys.argv if argv is None else argv
    if len(argv) >= 2 and argv[1] in ("-h", "--help"):
        print(usage())
        return
    if len(argv) < 2 or argv[1] not in BENCHMARKS:
        got = argv[1] if len(argv) > 1 else "nothing"
        raise SystemExit(f"{USAGE}; benchmarks: {sorted(BENCHMARKS)} (got {got!r}); --help describes them")
    name = argv.pop(1)

    @reports_user_errors
    def entry(cfg: DictConfig) -> None:
        summary = run_benchmark(name, cfg)
        print(json.dumps(summary), flush=True)

    hydra.main(version_base="1.3", config_path=str(CONFIG_DIR / "bench"), config_name=name)(entry)()


if __name__ == "__main__":
    main()
