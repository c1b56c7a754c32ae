"""What is computed from a capture: propagation through time and the causes of the gain."""

from gradwatch._analysis.quantities.module import (
    QuantityOptions,
    estimated_from_actual,
    fused_quantities,
    stepwise_quantities,
    to_host,
)

__all__ = [
    "QuantityOptions",
    "estimated_from_actual",
    "fused_quantities",
    "stepwise_quantities",
    "to_host",
]
