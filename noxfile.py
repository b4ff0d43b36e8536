"""Developer sessions: `nox -s tests` runs the suite, `nox -s lint` runs ruff."""

import nox

nox.options.sessions = ["lint", "tests"]
# CPU build first: an unpinned torch would pull a multi-GB CUDA build.
TORCH = "torch==2.13.0"


@nox.session
def tests(session: nox.Session) -> None:
    session.install(TORCH)
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "midms_cli", "plugins", "tests", "benchmarks", "noxfile.py")
