"""Exception types. Library code raises these; only the CLI turns them into messages and exit codes.

Every message is one line that names the parameter or file, the value seen and what is allowed.
Messages speak the library's words: a parameter is named as the Python API names it, in
backticks (`steps`, `batch_size`, `resume=True`, `scale=3`), never as a command-line flag. The
CLI rewrites each backticked name into its flag (`--steps`, `--batch-size`, `--resume`,
`--scale 3`; cfgdiff.cli.options.flag_words), so one message tells a Python user about
parameters and a shell user about flags.
"""


class CfgDiffError(Exception):
    """Base class for every error a user can cause."""


class ConfigError(CfgDiffError):
    """A setting (CLI option, preset field, function argument) is out of range or inconsistent."""


class DataError(CfgDiffError):
    """A dataset is missing, corrupt, fails its checksum or has the wrong layout."""


class CheckpointError(CfgDiffError):
    """A checkpoint is missing, truncated, corrupt or does not match what was asked for."""


class RuntimeFault(CfgDiffError):
    """Training or sampling could not go on: non-finite loss, out of memory, disk full. Exit
    status 1."""


class WriteFault(RuntimeFault):
    """A file could not be written for want of space or permission (files.write_error classes
    the cause by its errno, whatever the writer's exception type). The message names the file;
    nothing partial is left. `path`: the file; `cause`: "space" or "permission"; `reason`: the
    system's words ("No space left on device")."""

    def __init__(self, message: str, path=None, cause: str = "space", reason: str = ""):
        super().__init__(message)
        self.path, self.cause, self.reason = path, cause, reason
