"""`python -m midms_cli` runs the command-line tool (also under torchrun)."""

from midms_cli.cli.app import main

if __name__ == "__main__":
    main()
