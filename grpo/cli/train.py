"""grpo-train (or `python -m grpo.cli.train`, `torchrun ... -m grpo.cli.train`): the flags
and --config file of grpo.config -> build_trainer -> train; prints the summary as JSON.

With no arguments it runs the embedded demo (config.DEMO): a tiny Qwen2-architecture model
with a character tokenizer gets a short supervised cold start, then learns arithmetic with
GRPO, on the CPU in a few minutes, and reports held-out accuracy before and after.
"""

from __future__ import annotations

import json
import sys

from .. import distributed
from ..build import build_trainer
from ..config import parse_config
from ..files import DirectoryLocked
from ..interrupts import Interrupted, Signals, Stop
from ..trainer import NonFiniteError
from .args import BAD_INPUT, bad_input, failed_write

# Exit statuses besides 0 (done), 1 (the run stopped: non-finite values, a full disk),
# 2 (bad input) and 128 + the signal (130 Ctrl-C, 143 SIGTERM).
IN_USE = 3  # another grpo-train writes the --output-dir

# A failed write never replaces the last checkpoint, so the run goes on from there.
RETRY = (
    "rerun with --resume to continue from the run's last checkpoint (a failed write never "
    "replaces it), or with --overwrite if it has none yet"
)


def main(argv: list[str] | None = None) -> int:
    finished = False
    # A signal during start-up stops it at once: the failed start removes what it created.
    # trainer.train() handles them itself; one after it returns waits here (the run is done).
    signals = Signals(mode="drop")
    try:
        with signals.installed():
            config = parse_config(argv)
            trainer = build_trainer(config)  # joins torchrun's process group, if any
            with signals.phase("hold"):
                summary = trainer.train()
                main_process = distributed.is_main()
                finished = True
    except BAD_INPUT as e:  # bad input: a message, not a traceback
        return bad_input("grpo-train", e)
    except DirectoryLocked as e:
        print(f"grpo-train: error: {e}", file=sys.stderr)
        return IN_USE
    except NonFiniteError as e:  # the run diverged: say so and where the good state is
        print(f"grpo-train: stopped: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:  # Ctrl-C or SIGTERM: the last good state is on disk
        print(f"grpo-train: interrupted: {e}", file=sys.stderr, flush=True)
        return 128 + e.signum
    except Stop as e:
        print(
            f"grpo-train: interrupted: {e} during start-up; nothing was kept: run the same "
            f"command again",
            file=sys.stderr,
            flush=True,
        )
        return 128 + e.signum
    except Exception as e:  # a full disk, a read-only directory: say so, else a traceback
        status = failed_write("grpo-train", e, retry=RETRY, option="--output-dir")
        if status is None:
            raise
        return status
    finally:
        left_group = distributed.shutdown(wait_for_peers=finished)
    if main_process:
        print(json.dumps(summary, indent=2))
        print(f"run directory: {trainer.run_dir}")
    if left_group:  # under torchrun: see distributed.exit_process
        distributed.exit_process(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
