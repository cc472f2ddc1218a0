"""Bad input worded for whoever passed it: the Python API by its parameters' names, a command line by its flags.

The library raises an ``OptionError`` whose message names parameters (``output``, ``overwrite=True``); the command
lines (``sgdrop-zoo``, ``train/main.py``) print ``for_command_line`` instead, which names the flags that set them
(``--output``, ``--overwrite``).
"""
import string
from collections.abc import Callable
from typing import Any, Optional

__all__ = ['OptionError']


class OptionError(ValueError):
    """Bad input, worded with the parameters that fix it.

    Args:
        template: The message; each field is a parameter's name (``{output}``) or one of ``values``, which are never
            part of the template itself, so that a path holding braces is printed as it is.
        switches: The parameters among the fields that are switches: ``overwrite=True`` in the API, ``--overwrite``
            on a command line.
        **values: The message's other fields (paths, names, numbers).
    """

    def __init__(self, template: str, switches: tuple[str, ...] = (), **values: Any):
        self.template, self.switches, self.values = template, switches, values
        super().__init__(self._worded(lambda name: f'{name}=True' if name in switches else name))

    def _worded(self, parameter_name: Callable[[str], str]) -> str:
        fields = {field for _, field, _, _ in string.Formatter().parse(self.template) if field}
        return self.template.format(**{field: parameter_name(field) for field in fields - set(self.values)},
                                    **self.values)

    def for_command_line(self, flags: Optional[dict[str, str]] = None) -> str:
        """The message naming each parameter by its flag: ``flags[name]``, or ``--name`` with hyphens."""
        flags = flags or {}
        return self._worded(lambda name: flags.get(name, '--' + name.replace('_', '-')))
