"""Exception types. Library code raises these; only the CLI turns them into messages and exit codes.

Every message is one line that names the argument or file, the value seen and what is allowed.
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
    """Training could not go on: non-finite loss, out of memory, disk full. Exit status 1."""
