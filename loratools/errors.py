"""One exception tree for the library.

The CLI turns a LoratoolsError into a single line (file, tensor, what was expected) and an exit code;
library code never prints or exits.
"""
from __future__ import annotations


class LoratoolsError(Exception):
    """Base of every error a user can act on. exit_code 1 = fix the input, 2 = fix the command line."""

    exit_code = 1
    kind = "error"

    def __init__(self, message: str, *, path=None, tensor: str | None = None):
        super().__init__(message)
        self.message = message
        self.path = str(path) if path is not None else None
        self.tensor = tensor

    def one_line(self) -> str:
        """The message as the command line prints it: `FILE: tensor NAME: message`, on one line."""
        parts = []
        if self.path:
            parts.append(self.path)
        if self.tensor:
            parts.append(f"tensor {self.tensor}")
        prefix = ": ".join(parts)
        text = f"{prefix}: {self.message}" if prefix else self.message
        return " ".join(text.split())  # never more than one line

    def to_json(self) -> dict:
        """The error object a --json command prints on stdout."""
        return {
            "error": {
                "type": self.kind,
                "message": self.message,
                "file": self.path,
                "tensor": self.tensor,
                "exit_code": self.exit_code,
            }
        }


class InputError(LoratoolsError):
    """An input file is missing, unreadable, corrupt or of the wrong kind."""

    kind = "input"


class FormatError(InputError):
    """A file is readable but violates its format (safetensors, index, PEFT config)."""

    kind = "format"


class UnsupportedError(InputError):
    """Well-formed input that loratools does not handle (non-LoRA adapters, pickle checkpoints)."""

    kind = "unsupported"


class MismatchError(LoratoolsError):
    """Inputs that are fine alone but do not fit together (adapter vs base shapes, base vs tuned)."""

    kind = "mismatch"


class OutputError(LoratoolsError):
    """The output cannot be written (exists, inside an input, read-only, disk full)."""

    kind = "output"


class ValidationFailed(LoratoolsError):
    """A check ran and the answer was no."""

    kind = "validation"


class UsageError(LoratoolsError):
    """Options that contradict each other or are out of range."""

    exit_code = 2
    kind = "usage"
