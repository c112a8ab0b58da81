"""`python -m rcm_core.run`: the no-Ray embedded default (toy data, teacher, distillation, step-count table)."""
from rcm_core.run.pipeline import cli_main

if __name__ == "__main__":
    cli_main()
