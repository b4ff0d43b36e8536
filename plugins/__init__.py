"""Built-in dataset plugins of midms, installed as the package `midms_plugins`.

Each subpackage registers one object under the `midms.datasets` entry-point group (see
`midms_cli.data.plugin` for the protocol; `midms datasets` lists them).
"""
