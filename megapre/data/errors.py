"""The error of bad input data: a dataset, tokenizer file or split that cannot be used as the flags
name it. A ConfigError (so a ValueError), because the fix is a flag or a file: every front end
(megapre.pretrain, the data tools, run_cli) prints it as one `prog: error: ...` line, exit 2."""
from __future__ import annotations

from megapre.errors import ConfigError


class DataError(ConfigError):
    """A data file or split that cannot be used; the message names the file (or flag) and the fix."""
