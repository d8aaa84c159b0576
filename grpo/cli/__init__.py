"""The command-line entry points; the library they call is the rest of `grpo`.

    train.py   grpo-train    GRPO (with a supervised cold start): config flags -> build_trainer
    eval.py    grpo-eval     k samples per prompt -> pass@k, cons@k, a JSON report
    sample.py  grpo-sample   rejection sampling -> prompt/completion JSONL for grpo-sft
    sft.py     grpo-sft      supervised fine-tuning (cold start, distillation) -> a model dir
    args.py    the argument groups these commands share, and what they load

Each command module holds only argument parsing, I/O and printing, and `main(argv) -> int`
(the console script, also `python -m grpo.cli.NAME`): bad input is one line on stderr and
exit status 2, not a traceback.
"""
