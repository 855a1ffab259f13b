"""Option checks shared by the criteria's option classes."""

from __future__ import annotations

from dataclasses import dataclass, fields

from winnow.criteria.sampling import BN_MODES


def check_options(options: object) -> None:
    """Validate the common fields of a criterion's options (whichever it has): counts are
    positive integers (``batch_size`` and ``samples`` may be None where the default allows),
    ``seed`` an integer, ``bn_mode`` one of :data:`BN_MODES`; ``ValueError`` naming the field."""
    name = type(options).__name__
    for field in fields(options):
        value = getattr(options, field.name)
        if field.name in ("samples", "batch_size", "chunk", "block_size", "samples_per_class"):
            if value is None and field.name in ("samples", "batch_size"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}.{field.name} must be a positive integer, got {value!r}")
        elif field.name == "seed" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{name}.seed must be an integer, got {value!r}")
        elif field.name == "bn_mode" and value not in BN_MODES:
            raise ValueError(f"unknown bn_mode {value!r}; choose one of {BN_MODES}")


@dataclass(frozen=True)
class Checked:
    """Base of the criteria's option classes: validated with :func:`check_options`."""

    def __post_init__(self) -> None:
        check_options(self)
