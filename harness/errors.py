"""Errors the CLI turns into a one-line message: exit code 2 for bad input, 1 for a broken environment."""


class UsageError(ValueError):
    """Bad input from the user (a name, a file, a budget): printed as one line, exit code 2."""


def choices_error(kind: str, value: object, valid) -> UsageError:
    """Build the standard 'unknown X: Y (valid: a, b, c)' error."""
    return UsageError(f"unknown {kind} {value!r} (valid: {', '.join(sorted(map(str, valid)))})")


def missing_dependency(package: str, needed_by: str, install: str | None = None) -> UsageError:
    """The one-line error for an optional package that is not installed but was asked for."""
    return UsageError(f"{needed_by} needs the {package} package, which is not installed "
                      f"(pip install {install or package})")


class EnvironmentFailure(RuntimeError):
    """A file or disk the harness needs is unusable (a corrupt manifest, an unreadable image, a
    directory it cannot write): printed as one line naming the file and what to do, exit code 1."""


class RunError(RuntimeError):
    """Code a run called (a method adapter, most often a plugin's) raised while the run trained or was
    evaluated: printed as one line naming the run, the exception and where it was raised, exit code 1."""
