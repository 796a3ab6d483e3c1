"""The error every floor of megapre raises for a bad setting. It lives at the bottom of the
package so that `parallel`, `data` and `model` can all raise it without importing each other;
front ends turn it into a one-line message and exit code 2."""
from __future__ import annotations


class ConfigError(ValueError):
    """A setting (flag, config file value, argument) that cannot work; the message names it and
    says what to do."""
