"""`r1core` command line.

r1core run [hydra overrides...]        the R1 pipeline (default: r1_zero then r1 on the tiny preset, CPU)
r1core run pipeline=r1 model=small rl.group_size=16
r1core run --multirun rl.group_size=4,8
r1core train [flags]                   the distributed pretraining entry (torchrun -m r1core.train)
r1core plan model=v3 gpus=2048 [...]   memory per GPU and step time of every layout (docs/plan.md)
"""

from __future__ import annotations

import logging
import os
import sys

# Set before torch loads OpenMP: spinning worker threads turn any CPU oversubscription (a second job,
# a laptop's background work) into 10-20x slower steps; passive waiting costs little when idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _run(argv: list[str]) -> None:
    import hydra
    from omegaconf import DictConfig

    from r1core.pipeline.config import ConfigError, register_configs

    register_configs()

    @hydra.main(version_base="1.3", config_path="pkg://r1core.conf", config_name="config")
    def _main(cfg: DictConfig) -> None:
        # megatron-core announces at INFO, on import, which optional backends (Transformer Engine,
        # Megatron-FSDP) it found; Hydra's logging shows INFO, and none of it concerns an r1core user.
        logging.getLogger("megatron").setLevel(logging.WARNING)
        from r1core.parallel.failfast import exit_rank, fail_fast
        from r1core.pipeline.runner import StageFailed, run_pipeline

        log = logging.getLogger("r1core")
        log.setLevel(logging.INFO)
        try:
            # under torchrun, a rank that fails ends the job instead of leaving the others in a collective
            with fail_fast("r1core run", passthrough=(ConfigError, StageFailed)):
                run_pipeline(cfg)
        except ConfigError as e:  # one clear message, no traceback, before any work started
            log.error("%s", e)
            exit_rank(2)
        except StageFailed as e:  # bad input met inside a stage: the stage and the culprit, no traceback
            log.error("%s", e)
            exit_rank(1)
        except KeyboardInterrupt as e:  # Ctrl-C: one line; the manifest and checkpoints let a rerun resume
            log.error("%s", e if str(e) else "interrupted; rerun the same command to resume")
            raise SystemExit(130) from None

    sys.argv = ["r1core run"] + argv
    _main()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        _run(rest)
    elif cmd == "train":
        from r1core.train.__main__ import main as train_main

        train_main(rest)
    elif cmd == "plan":
        from r1core.parallel.plan import main as plan_main

        plan_main(rest)
    else:
        raise SystemExit(f"r1core: unknown command {cmd!r} (run | train | plan); see `r1core --help`")


if __name__ == "__main__":
    main()
