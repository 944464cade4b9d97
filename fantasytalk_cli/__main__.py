"""`python -m fantasytalk_cli ...`: the form `accelerate launch -m fantasytalk_cli train ...` uses."""

from fantasytalk_cli.cli import main

if __name__ == "__main__":
    main()
